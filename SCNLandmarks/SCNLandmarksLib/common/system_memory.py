"""How much memory this process can still get, so that work too large for it is refused up front.

The system's free memory is not the whole answer: in a container, on a cluster node or under a
batch scheduler the process lives in a memory control group (cgroup) whose limit is usually far
below the machine's memory, and crossing it kills the process without a message. So the answer
is the smaller of the system's ``MemAvailable`` and the headroom left under every memory limit of
the process's control group and of the groups above it (cgroup v2 or v1).

Linux only; elsewhere the answer is None (unknown) and callers let the work through.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["memory_available_bytes"]

# cgroup v1 writes "no limit" as a huge number (the largest page-aligned 64-bit value).
_NO_LIMIT_FROM = 2**60


def memory_available_bytes(*, root: Path = Path("/")) -> int | None:
    """Bytes of memory this process can still allocate now, or None where unknown.

    Args:
        root: the file system root that holds ``proc`` and ``sys`` (another folder only in tests).
    """
    known = [value for value in (_system_available_bytes(root), _cgroup_headroom_bytes(root)) if value is not None]
    return min(known) if known else None


def _system_available_bytes(root: Path) -> int | None:
    try:
        for line in (root / "proc/meminfo").read_text(encoding="ascii").splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _cgroup_headroom_bytes(root: Path) -> int | None:
    """The smallest limit-minus-use over the process's memory cgroup and its ancestors; None: no limit."""
    try:
        membership = (root / "proc/self/cgroup").read_text(encoding="ascii").splitlines()
    except OSError:
        return None
    headrooms = []
    for line in membership:
        hierarchy, _, rest = line.partition(":")
        controllers, _, group = rest.partition(":")
        if hierarchy == "0" and controllers == "":
            mount, files = root / "sys/fs/cgroup", ("memory.max", "memory.current", "file", "shmem")
        elif "memory" in controllers.split(","):
            mount, files = root / "sys/fs/cgroup/memory", (
                "memory.limit_in_bytes", "memory.usage_in_bytes", "total_cache", "total_shmem")
        else:
            continue
        headrooms += [h for h in (_headroom(folder, *files) for folder in _group_folders(mount, group)) if h is not None]
    return min(headrooms) if headrooms else None


def _group_folders(mount: Path, group: str) -> list[Path]:
    """The group's folder and those above it, up to the mount point.

    Inside a container the group's path often names a folder of the host that is not mounted;
    then the mount point itself is the container's group.
    """
    parts = [part for part in group.strip("/").split("/") if part and part != ".."]
    folders = [mount.joinpath(*parts[:depth]) for depth in range(len(parts), -1, -1)]
    return [folder for folder in folders if folder.is_dir()]


def _headroom(folder: Path, limit_file: str, usage_file: str, cache_key: str, shared_key: str) -> int | None:
    try:
        limit_text = (folder / limit_file).read_text(encoding="ascii").strip()
        if limit_text == "max" or int(limit_text) >= _NO_LIMIT_FROM:
            return None
        usage = int((folder / usage_file).read_text(encoding="ascii").strip())
    except (OSError, ValueError):
        return None
    # File cache is given back before the limit is enforced, except shared memory (tmpfs), which
    # the usage counts as cache but cannot be dropped.
    stat = folder / "memory.stat"
    reclaimable = max(0, _stat_value(stat, cache_key) - _stat_value(stat, shared_key))
    return max(0, int(limit_text) - max(0, usage - reclaimable))


def _stat_value(path: Path, key: str) -> int:
    try:
        for line in path.read_text(encoding="ascii").splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    except (OSError, ValueError):
        return 0
    return 0
