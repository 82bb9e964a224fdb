"""Memory available to this process: the system's free memory and its control group's limits."""

from __future__ import annotations

from pathlib import Path

from SCNLandmarksLib.common.system_memory import memory_available_bytes

GIB = 2**30


def _write(root: Path, relative: str, text: str) -> None:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="ascii")


def _system(root: Path, available_gib: float, *, cgroup: str) -> None:
    _write(root, "proc/meminfo", f"MemTotal: 33554432 kB\nMemAvailable: {int(available_gib * 2**20)} kB\n")
    _write(root, "proc/self/cgroup", cgroup)


def test_without_a_cgroup_limit_the_system_free_memory_counts(tmp_path: Path) -> None:
    _system(tmp_path, 20, cgroup="0::/user.slice/session\n")
    _write(tmp_path, "sys/fs/cgroup/user.slice/session/memory.max", "max\n")
    _write(tmp_path, "sys/fs/cgroup/user.slice/session/memory.current", str(5 * GIB))
    assert memory_available_bytes(root=tmp_path) == 20 * GIB


def test_a_cgroup_v2_limit_below_the_free_memory_decides_and_file_cache_is_not_counted_as_used(tmp_path: Path) -> None:
    _system(tmp_path, 20, cgroup="0::/job.slice/run\n")
    group = "sys/fs/cgroup/job.slice/run"
    _write(tmp_path, f"{group}/memory.max", str(4 * GIB))
    _write(tmp_path, f"{group}/memory.current", str(3 * GIB))
    # 1.5 GiB of file cache, active or not, of which 0.5 GiB is shared memory that cannot be dropped.
    _write(tmp_path, f"{group}/memory.stat", f"anon {GIB + GIB // 2}\nfile {GIB + GIB // 2}\nshmem {GIB // 2}\n")
    assert memory_available_bytes(root=tmp_path) == 2 * GIB


def test_the_tightest_limit_among_the_groups_above_decides(tmp_path: Path) -> None:
    _system(tmp_path, 20, cgroup="0::/job.slice/run\n")
    _write(tmp_path, "sys/fs/cgroup/job.slice/run/memory.max", "max")
    _write(tmp_path, "sys/fs/cgroup/job.slice/run/memory.current", str(GIB))
    _write(tmp_path, "sys/fs/cgroup/job.slice/memory.max", str(3 * GIB))
    _write(tmp_path, "sys/fs/cgroup/job.slice/memory.current", str(2 * GIB))
    assert memory_available_bytes(root=tmp_path) == GIB


def test_a_container_whose_group_path_is_not_mounted_reads_the_mount_point(tmp_path: Path) -> None:
    _system(tmp_path, 20, cgroup="0::/kubepods/pod7/abc\n")
    _write(tmp_path, "sys/fs/cgroup/memory.max", str(6 * GIB))
    _write(tmp_path, "sys/fs/cgroup/memory.current", str(GIB))
    assert memory_available_bytes(root=tmp_path) == 5 * GIB


def test_cgroup_v1_limits_are_read_and_its_huge_no_limit_value_is_ignored(tmp_path: Path) -> None:
    _system(tmp_path, 20, cgroup="5:cpu,cpuacct:/\n4:memory:/docker/abc\n")
    _write(tmp_path, "sys/fs/cgroup/memory/memory.limit_in_bytes", "9223372036854771712")
    _write(tmp_path, "sys/fs/cgroup/memory/memory.usage_in_bytes", str(GIB))
    assert memory_available_bytes(root=tmp_path) == 20 * GIB

    _write(tmp_path, "sys/fs/cgroup/memory/docker/abc/memory.limit_in_bytes", str(8 * GIB))
    _write(tmp_path, "sys/fs/cgroup/memory/docker/abc/memory.usage_in_bytes", str(7 * GIB))
    _write(tmp_path, "sys/fs/cgroup/memory/docker/abc/memory.stat", f"cache {GIB}\ntotal_cache {GIB}\ntotal_shmem 0\n")
    assert memory_available_bytes(root=tmp_path) == 2 * GIB


def test_nothing_readable_means_unknown(tmp_path: Path) -> None:
    assert memory_available_bytes(root=tmp_path) is None
    _write(tmp_path, "proc/meminfo", "MemTotal: garbage\n")
    assert memory_available_bytes(root=tmp_path) is None


def test_this_machine_gives_a_plausible_answer() -> None:
    meminfo = Path("/proc/meminfo")
    if not meminfo.exists():
        assert memory_available_bytes() is None
        return
    available = memory_available_bytes()
    assert available is not None and 0 <= available <= 2**50


def test_a_group_over_its_limit_has_no_headroom_rather_than_less_than_none(tmp_path: Path) -> None:
    _system(tmp_path, 20, cgroup="0::/\n")
    _write(tmp_path, "sys/fs/cgroup/memory.max", str(GIB))
    _write(tmp_path, "sys/fs/cgroup/memory.current", str(2 * GIB))
    assert memory_available_bytes(root=tmp_path) == 0

