"""Training under PyTorch's distributed engine: real ``torchrun`` runs of 2 processes (gloo, CPU).

Select them with ``pytest -k distributed``. Each launches two Python processes that import torch,
so each takes some seconds on a 2-core machine.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from engine_fixtures import TINY_TRAIN_ARGS, write_annotated_folder

ENGINE = Path(__file__).resolve().parents[1] / "SCNLandmarks"
TINY = [*TINY_TRAIN_ARGS]

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="this torch has no distributed support")


def _environment() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ENGINE), str(Path(__file__).parent)]),
            "OMP_NUM_THREADS": "1"}


# Seen about once in ten launches on this 2-core machine, also before any of our code ran (a
# process aborting with no output of its own): torch's two-process start-up, not the engine.
TORCH_START_UP_ABORT = "terminate called without an active exception"


def _torchrun(arguments: list[str], *, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    """Run ``torchrun`` with 2 processes; a launch that died of the start-up abort above is tried
    again (twice at most), any other failure is returned as it is."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *arguments]
    for _ in range(3):
        result = subprocess.run(command, capture_output=True, text=True, env=_environment(), timeout=timeout, check=False)
        if result.returncode == 0 or TORCH_START_UP_ABORT not in result.stderr or "Wrote " in result.stdout:
            return result
    return result


@pytest.fixture(scope="module")
def annotated(tmp_path_factory):
    return write_annotated_folder(tmp_path_factory.mktemp("annotated"), 4, seed=21)


SCRIPT = textwrap.dedent('''
    import os, sys, torch
    from engine_fixtures import synthetic_cases, tiny_model
    from SCNLandmarksLib.learning.training import TrainingConfig, train_model

    out = sys.argv[1]
    rank = int(os.environ["RANK"])
    torch.manual_seed(100 + rank)  # different initial weights: training must start from process 0's
    model = tiny_model(["L1", "L2", "L3", "L4"])
    start = {k: v.clone() for k, v in model.network.named_parameters()}
    die_at = int(sys.argv[2]) if len(sys.argv) > 2 else None
    steps = iter(range(1000))

    def should_cancel():
        step = next(steps)
        if die_at is not None and rank == 1 and step == die_at:
            os._exit(3)  # a process dies in the middle of training
        return False

    config = TrainingConfig(iterations=6, batch_size=1, device="cpu", validate_every=0, checkpoint_every=0)
    result = train_model(synthetic_cases(4, seed=21), model, output=os.path.join(out, "model.scn.pt"), config=config,
                         validation_cases=[], should_cancel=should_cancel)
    torch.save({"start": start, "end": dict(model.network.named_parameters())}, os.path.join(out, f"rank{rank}.pt"))
''')


def test_distributed_training_keeps_every_process_identical_and_writes_once(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    result = _torchrun([str(script), str(tmp_path)])
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "model.scn.pt").is_file()
    assert sorted(p.name for p in tmp_path.glob("*.scn.pt*")) == ["model.scn.pt"]  # one writer, no leftovers
    first, second = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert any(not torch.equal(first["start"][k], second["start"][k]) for k in first["start"])  # they began apart
    for name, value in first["end"].items():
        assert torch.equal(value, second["end"][name]), name  # and ended identical
    assert any(not torch.equal(first["start"][k], first["end"][k]) for k in first["end"])  # it trained


def test_distributed_run_fails_clearly_when_a_process_dies(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    started = time.monotonic()
    result = _torchrun([str(script), str(tmp_path), "3"], timeout=300)
    assert result.returncode != 0
    assert time.monotonic() - started < 240  # no hang
    assert "exitcode" in result.stderr or "failed" in result.stderr.lower()
    assert not (tmp_path / "model.scn.pt").exists()


def test_distributed_cli_resumes_a_checkpoint_written_by_one_process(tmp_path, annotated):
    model = tmp_path / "m.scn.pt"
    checkpoint = tmp_path / "m.ckpt"
    steps = [*TINY, "--iterations", "100000", "--checkpoint", str(checkpoint), "--checkpoint-every", "1"]
    single = subprocess.Popen([sys.executable, "-m", "SCNLandmarksLib.running.cli", "train", "--images", str(annotated),
                               "--output", str(model), *steps], env=_environment(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not checkpoint.exists():
        assert time.monotonic() < deadline and single.poll() is None, single.stderr.read() if single.poll() else ""
        time.sleep(0.1)
    single.send_signal(signal.SIGINT)  # Ctrl-C: stops cleanly, keeps the checkpoint
    _, error = single.communicate(timeout=120)
    assert single.returncode == 130, error
    saved = torch.load(checkpoint, weights_only=True)["iteration"]
    resume = [*TINY, "--iterations", str(int(saved) + 4), "--checkpoint", str(checkpoint), "--resume"]
    result = _torchrun(["-m", "SCNLandmarksLib.running.cli", "train", "--images", str(annotated), "--output", str(model), *resume])
    assert result.returncode == 0, result.stderr[-3000:]
    assert model.is_file() and not checkpoint.exists()
    assert result.stdout.count("Wrote ") == 1  # process 0 reports, the other stays silent


def test_distributed_finetune_runs_unchanged_under_torchrun(tmp_path, annotated):
    start = tmp_path / "start.scn.pt"
    single = subprocess.run([sys.executable, "-m", "SCNLandmarksLib.running.cli", "train", "--images", str(annotated),
                             "--output", str(start), *TINY, "--iterations", "2"],
                            capture_output=True, text=True, env=_environment(), timeout=240, check=False)
    assert single.returncode == 0, single.stderr[-2000:]
    tuned = tmp_path / "tuned.scn.pt"
    result = _torchrun(["-m", "SCNLandmarksLib.running.cli", "finetune", "--from-model", str(start), "--images", str(annotated),
                        "--output", str(tuned), "--iterations", "2", "--device", "cpu", "--keep-worse"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert tuned.is_file() and not tuned.with_name(tuned.name + ".reserved").exists()
    assert result.stdout.count("cross-validated error on your cases") == 1  # one report, from process 0
