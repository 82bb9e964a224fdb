"""The fine-tuning worker as a real subprocess on the CPU, and the stored-cases layout it reads."""

from __future__ import annotations

import json
import os
import sys
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from SCNLandmarksLib.data import cases as case_store
from SCNLandmarksLib.imaging.grid import GridSpec
from SCNLandmarksLib.models.model import create_model
from SCNLandmarksLib.models.model_file import load_model, read_model_description, save_model
from SCNLandmarksLib.models.network import NetworkConfig
from SCNLandmarksLib.running.process import (
    EXIT_CANCELLED,
    EXIT_ERROR,
    BackgroundProcess,
    progress_from_event,
    worker_command,
    worker_environment,
)
from SCNLandmarksLib.data.synthetic import make_synthetic_case

NAMES = ["L1", "L2", "L3"]


def tiny_model():
    config = NetworkConfig(dimension=2, num_landmarks=3, filters=8, levels=2, spatial_downsample=4, spatial_kernel=3)
    return create_model(config, grid=GridSpec(size=(32, 32)), landmark_names=list(NAMES))


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> dict[str, Path]:
    """A starting model and three stored synthetic 2D cases (one with a missing point)."""
    root = tmp_path_factory.mktemp("worker")
    model_path = save_model(tiny_model(), root / "start.scn.pt")
    folder = root / "cases"
    for seed in range(3):
        image, landmarks = make_synthetic_case(
            dimension=2, size=(40, 36), spacing=(0.8, 1.1), origin=(5.0, -7.0), direction=0.2,
            num_landmarks=3, seed=seed, num_missing=1 if seed == 2 else 0,
        )
        landmarks.corrected = np.array([seed == 0, False, False])
        case_store.write_case(folder, f"patient {seed}", image, landmarks, metadata={"source": "synthetic"})
    return {"root": root, "model": model_path, "cases": folder}


def _run(arguments: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        worker_command(arguments), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=worker_environment(),
    )


def _events(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


# --------------------------------------------------------------------------- cases layout


def test_cases_round_trip_keeps_geometry_missing_and_corrected(workspace):
    infos = case_store.list_cases(workspace["cases"])
    assert [info.name for info in infos] == ["patient 0", "patient 1", "patient 2"]
    assert all(info.error is None and info.dimension == 2 for info in infos)
    assert infos[0].corrected_names == ["L1"] and infos[0].num_corrected == 1
    assert infos[2].num_missing == 1 and infos[2].num_defined == 2
    assert infos[0].metadata == {"source": "synthetic"}

    expected_image, expected = make_synthetic_case(
        dimension=2, size=(40, 36), spacing=(0.8, 1.1), origin=(5.0, -7.0), direction=0.2,
        num_landmarks=3, seed=0,
    )
    image, landmarks = case_store.read_case(infos[0].folder)
    np.testing.assert_allclose(image.array, expected_image.array, atol=1e-6)
    assert image.geometry.direction == pytest.approx(expected_image.geometry.direction)
    np.testing.assert_allclose(landmarks.positions, expected.positions, atol=1e-6)
    assert landmarks.corrected.tolist() == [True, False, False]
    training = case_store.read_training_cases(workspace["cases"], ["patient 2"])
    assert training[0].name == "patient 2" and training[0].landmarks.missing.sum() == 1


def test_case_names_are_unique_safe_and_removal_is_complete(tmp_path):
    image, landmarks = make_synthetic_case(dimension=2, size=(16, 16), num_landmarks=2, seed=3)
    first = case_store.write_case(tmp_path, "a/b:c", image, landmarks)
    second = case_store.write_case(tmp_path, "a/b:c", image, landmarks)
    assert first.name == "a_b_c" and second.name == "a_b_c-2"
    with pytest.raises(FileExistsError):
        case_store.write_case(tmp_path, "a_b_c", image, landmarks, unique=False)
    landmarks.positions[:] = np.nan
    with pytest.raises(ValueError, match="missing"):
        case_store.write_case(tmp_path, "empty", image, landmarks)
    case_store.remove_case(tmp_path, "a_b_c")
    assert [c.name for c in case_store.list_cases(tmp_path)] == ["a_b_c-2"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    with pytest.raises(FileNotFoundError):
        case_store.remove_case(tmp_path, "../a_b_c-2")
    with pytest.raises(ValueError, match="no training cases|No training case"):
        case_store.read_training_cases(tmp_path / "nothing")


def test_damaged_case_is_listed_with_its_problem(tmp_path):
    image, landmarks = make_synthetic_case(dimension=2, size=(16, 16), num_landmarks=2, seed=4)
    info = case_store.write_case(tmp_path, "ok", image, landmarks)
    (info.folder / case_store.IMAGE_FILE).unlink()
    listed = case_store.list_cases(tmp_path)
    assert listed[0].error is not None and "image.nrrd" in listed[0].error
    with pytest.raises(ValueError, match="cannot be used"):
        case_store.read_training_cases(tmp_path)


# --------------------------------------------------------------------------- worker


def test_finished_run_reports_progress_and_writes_a_loadable_model(workspace):
    output = workspace["root"] / "tuned-ft001.scn.pt"
    before = workspace["model"].read_bytes()
    process = _run([
        "finetune", "--cases", str(workspace["cases"]), "--from-model", str(workspace["model"]),
        "--output", str(output), "--iterations", "4", "--device", "cpu", "--keep-worse",
    ])
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr
    events = _events(stdout)  # every stdout line is one JSON object
    kinds = [e["event"] for e in events]
    assert kinds[0] == "started" and kinds[-1] == "done"
    progress = [e for e in events if e["event"] == "progress"]
    # Three cases: three cross-validation runs and the final one, 4 steps each, as one bar.
    assert [p["done"] for p in progress] == list(range(1, 17))
    assert all(p["total"] == 16 and 0 < p["fraction"] <= 1 and p["loss"] is not None for p in progress)
    done = events[-1]
    assert done["output"] == str(output) and done["folds"] == 3 and done["stages"] == ["global"]
    assert done["verdict"] in ("better", "not better") and done["start_error_mm"] > 0 and done["new_error_mm"] > 0
    assert "starting model" in done["message"]
    model = load_model(output)
    assert model.landmark_names == NAMES
    assert sorted(read_model_description(output)["info"]["training"]["cases"]) == ["patient 0", "patient 1", "patient 2"]
    assert workspace["model"].read_bytes() == before


def test_terminate_after_first_progress_line_cancels_without_output(workspace):
    output = workspace["root"] / "cancelled.scn.pt"
    before = workspace["model"].read_bytes()
    process = _run([
        "finetune", "--cases", str(workspace["cases"]), "--from-model", str(workspace["model"]),
        "--output", str(output), "--iterations", "100000", "--device", "cpu",
    ])
    assert process.stdout is not None
    lines = []
    for line in process.stdout:
        lines.append(line)
        if json.loads(line)["event"] == "progress":
            process.terminate()
            break
    rest, stderr = process.communicate(timeout=60)
    events = _events("".join(lines) + rest)
    assert process.returncode == EXIT_CANCELLED, stderr
    assert events[-1]["event"] == "cancelled"
    assert "no model file" in events[-1]["message"]
    assert not output.exists()
    assert not list(output.parent.glob(".tmp-*"))
    assert workspace["model"].read_bytes() == before


def test_background_process_cancel_and_events(workspace):
    output = workspace["root"] / "bg-cancelled.scn.pt"
    seen: list[dict] = []
    finished: list[BackgroundProcess] = []
    job = BackgroundProcess(
        worker_command([
            "finetune", "--cases", str(workspace["cases"]), "--from-model", str(workspace["model"]),
            "--output", str(output), "--time-budget", "300", "--device", "cpu",
        ]),
        on_event=seen.append,
        on_finished=finished.append,
    ).start()
    deadline = time.monotonic() + 90
    while not any(e["event"] == "progress" for e in seen):
        assert time.monotonic() < deadline and job.returncode is None, job.stderr_tail
        job.poll()
        time.sleep(0.05)
    first = next(e for e in seen if e["event"] == "progress")
    assert first["total"] is None and 0 <= first["fraction"] < 0.5 and first["eta_s"] <= 300
    job.cancel(grace_s=30)
    assert job.wait(timeout=60) == EXIT_CANCELLED
    assert finished == [job] and not job.is_running()
    assert not job.cancel_file.exists()
    outcome = job.outcome()
    assert outcome.status == "cancelled" and "previous model is unchanged" in outcome.message
    assert outcome.output is None and not output.exists()
    progress = progress_from_event(first)
    assert progress.total is None and progress.fraction == pytest.approx(first["fraction"])


def test_errors_exit_2_with_a_readable_message(workspace, tmp_path):
    existing = tmp_path / "exists.scn.pt"
    existing.write_bytes(b"user data")
    job = BackgroundProcess(worker_command([
        "finetune", "--cases", str(workspace["cases"]), "--from-model", str(workspace["model"]),
        "--output", str(existing), "--iterations", "2",
    ])).start()
    assert job.wait(timeout=60) == EXIT_ERROR
    outcome = job.outcome()
    assert outcome.status == "failed" and "already exists" in outcome.message
    assert existing.read_bytes() == b"user data"

    damaged = tmp_path / "damaged.scn.pt"
    damaged.write_bytes(b"not a model")
    process = _run(["finetune", "--cases", str(workspace["cases"]), "--from-model", str(damaged),
                    "--output", str(tmp_path / "new.scn.pt")])
    stdout, _ = process.communicate(timeout=60)
    assert process.returncode == EXIT_ERROR
    assert _events(stdout)[-1] == {"event": "error", "message": _events(stdout)[-1]["message"]}
    assert "not an SCNLandmarks model file" in _events(stdout)[-1]["message"]

    process = _run(["finetune", "--cases", str(workspace["cases"])])
    stdout, _ = process.communicate(timeout=60)
    assert process.returncode == EXIT_ERROR
    assert "Invalid worker arguments" in _events(stdout)[-1]["message"]


def test_landmarks_from_cases_gives_the_model_new_heads(workspace, tmp_path, capsys):
    """In-process run (fast): cases named L1..L3, a model named A..C."""
    import signal

    from SCNLandmarksLib.running import worker

    other = tmp_path / "abc.scn.pt"
    config = NetworkConfig(dimension=2, num_landmarks=3, filters=8, levels=2, spatial_downsample=4, spatial_kernel=3)
    save_model(create_model(config, grid=GridSpec(size=(32, 32)), landmark_names=["A", "B", "C"]), other)
    import torch

    handler = signal.getsignal(signal.SIGINT)
    threads = torch.get_num_threads()
    common = ["finetune", "--cases", str(workspace["cases"]), "--from-model", str(other), "--iterations", "2",
              "--device", "cpu", "--threads", "1"]

    assert worker.main([*common, "--output", str(tmp_path / "refused.scn.pt")]) == EXIT_ERROR
    error = _events(capsys.readouterr().out)[-1]
    assert error["event"] == "error" and "not in the model" in error["message"]
    assert not (tmp_path / "refused.scn.pt").exists()

    assert worker.main([*common, "--output", str(tmp_path / "new.scn.pt"), "--landmarks-from-cases",
                        "--case", "patient 0", "--case", "patient 2"]) == 0
    events = _events(capsys.readouterr().out)
    assert events[0]["cases"] == ["patient 0", "patient 2"] and events[-1]["landmarks"] == NAMES
    assert load_model(tmp_path / "new.scn.pt").landmark_names == NAMES
    assert signal.getsignal(signal.SIGINT) is handler  # in-process use leaves signal handling alone
    torch.set_num_threads(threads)  # --threads is meant for the worker's own process


@pytest.mark.skipif(os.name == "nt", reason="process groups are a POSIX test; Windows ends the tree with taskkill /T")
def test_cancel_stops_a_worker_behind_a_launcher_that_ignores_it(tmp_path):
    """Like PythonSlicer: a launcher that dies on SIGTERM while its child, the real worker, ignores it."""
    pid_file = tmp_path / "child.pid"
    child = ("import os, signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
             f"open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(120)")
    launcher = tmp_path / "launcher.py"
    launcher.write_text(f"import subprocess, sys\nsubprocess.run([sys.executable, '-c', {child!r}])\n")
    job = BackgroundProcess([sys.executable, str(launcher)]).start()
    deadline = time.monotonic() + 30
    while not (pid_file.exists() and pid_file.read_text()):
        assert time.monotonic() < deadline, job.stderr_tail
        time.sleep(0.05)
    child_pid = int(pid_file.read_text())
    job.cancel(grace_s=0.5)
    started = time.monotonic()
    assert job.wait(timeout=20) is not None
    assert time.monotonic() - started < 15

    def running(pid: int) -> bool:
        try:
            state = Path(f"/proc/{pid}/status").read_text()
        except FileNotFoundError:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return False
            return True
        return "\nState:\tZ" not in state  # a zombie has ended; only its parent has not collected it

    deadline = time.monotonic() + 10
    while running(child_pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not running(child_pid), "the worker behind the launcher was left running"
