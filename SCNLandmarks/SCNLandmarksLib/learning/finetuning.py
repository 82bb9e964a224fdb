"""Fine-tuning on a user's own corrected cases: one recipe for the CLI, the worker and Slicer.

The recipe is chosen from what the cases are:

* **Same landmarks, two-stage model**: only the local refinement stage learns (gently: a low
  learning rate, its batch-norm statistics kept); the global SCN, which places every
  landmark robustly, stays as it is. When the cases look unlike the model's training images (their
  mean expected error is at least ``UNLIKE_TRAINING_RATIO`` times the validation images'; another
  device), the global stage learns first (a higher learning rate), then the local stage.
* **Same landmarks, global-only model**: the global stage learns at a low learning rate.
* **A new landmark set** (an explicit choice): new output heads; the global stage learns, then
  the local stage if the model has one.

When the global stage of a two-stage model learns the same landmarks, the cross-validation also
chooses how far the new model trusts its local stage (``LOCAL_TRUST_CHOICES``): on images that have lost the fine detail it reads
(blur, noise), placing a point where the local stage is unsure does worse than the global stage.
On cases unlike the training images the new model's expected errors are learned again from the
folds' held-out cases (each read by a model that did not train on it): the starting model's error
model describes images the user does not have (on two simulated devices it marked 46 % and 71 % of
the fine-tuned model's points for checking, and expected them 28-59 % further off than they were;
scripts/experiments/device_flags.py).

Whether it helped is judged on the user's own cases, never on one case: with three or more,
k-fold cross-validation trains the recipe on all folds but one and measures the starting and
the new model on the fold left out, with the same global estimates; the new model is written
only when its cross-validated error is lower (or when asked to keep it anyway). The report
states both errors, side by side. Landmarks are matched by name; a missing point is missing.

Time: every training run of the procedure (one per fold, one on all cases) has a completed
learning-rate schedule. A few probe steps measure this machine's speed first, and the steps are
fitted so that the whole procedure ends within its time: by default the recipe's steps, fewer where
they would not fit in ``DEFAULT_TIME_LIMIT_S``; with a time budget, as many as fit in it; with a
number of iterations, exactly those (shortened only to fit a budget given too). A probe of a few
steps misjudges a machine whose speed wanders, so once the first run is timed, the runs still to
come are fitted again to the time left (the report gives each fold's steps).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from typing import TYPE_CHECKING

import numpy as np

from ..common.progress import Progress, ProgressCallback

if TYPE_CHECKING:  # torch-heavy; imported where used so that the defaults load without torch
    from ..data.landmarks import Landmarks
    from ..models.model import LandmarkModel
    from ..data.training_case import TrainingCase
    from ..models.quality import ErrorModel

    # What a fold's model read on its held-out cases: detections and their signals, per trust choice.
    Readings = dict[str, tuple[list[Landmarks], list[dict[str, np.ndarray]]]]

__all__ = ["FineTuneReport", "case_landmark_set", "fine_tune", "plan_landmarks", "suggested_iterations"]

log = logging.getLogger(__name__)

DEFAULT_ITERATIONS = 200
MAX_FOLDS = 3
LOCAL_LEARNING_RATE = 5e-4
# When the local stage learns alone (images like the training images), ten cases hold little that
# the training images did not: on the 15 validation images (3 folds of 10 fine-tuning / 5 held-out)
# every recipe raised the held-out error, the less the gentler it was: lr 5e-4 +0.127 mm, 1.5e-4
# +0.052 mm (+0.037 with frozen batch-norm statistics), 5e-5 with frozen statistics +0.011 +/- 0.015
# mm (scripts/experiments/finetune_recipe.py). So alone it learns gently, its statistics kept; beside
# a global stage that learns (another device, new landmarks) it follows at LOCAL_LEARNING_RATE.
GENTLE_LOCAL_LEARNING_RATE = 5e-5
# Crops per step for the whole local stage: an ensemble of M networks gives each network
# LOCAL_BATCH_SIZE // M of them, so a step costs the same and 10 cases still fine-tune in about
# 3 minutes on 2 cores.
LOCAL_BATCH_SIZE = 16
GLOBAL_LEARNING_RATE = 5e-5
# Cases from another device: the global stage must move further. Chosen on the 15 validation images
# through the simulated device (3 folds of 10 / 5, 90 steps per stage, the local stage at 5e-4;
# held-out change: global 5e-5 -0.372 +/- 0.109 mm, 2e-4 -0.472 +/- 0.088 mm with no image worse,
# 5e-4 -0.480 +/- 0.078 mm with one worse; scripts/experiments/finetune_recipe.py --other-device).
UNLIKE_GLOBAL_LEARNING_RATE = 2e-4
# The whole procedure (probe, folds, final run, detections) ends within this by default: 10 cases in
# under 5 minutes on a 2-core CPU, whatever its speed (the recipe's 200 steps took 330 s on a 2-core
# AMD EPYC; scripts/experiments/promise_loop.py).
DEFAULT_TIME_LIMIT_S = 270.0
# Fewer steps than this teach nothing worth checking; a budget that cannot hold them is exceeded.
MIN_FITTED_STEPS = 20
PROBE_STEPS = 8
# Steps ran slower later in the procedure than in the probe (simulated other device, 2-core AMD
# EPYC: 0.24 -> 0.30 s per global step, 0.30 -> 0.41 s per local step from the first to the last
# run), so the steps are fitted to this share of the time left.
SPEED_MARGIN = 0.8
# A training run stops at this many times the time its fitted steps should take: a slower spell
# (another program taking the cores) must not run on unbounded.
RUN_CEILING = 1.5
# On the same machine the probe also judged steps a quarter slower than the runs then went (0.37
# and 0.39 s against 0.27 and 0.33 s; a 10-case fine-tune used 181 s of its 270): the whole first
# run is the better measure. The runs after it still went up to a sixth slower than it (fitted to
# 90 % of the time left, a fine-tune took 282 s of its 270), so they are fitted again to this share.
TIMED_RUN_MARGIN = 0.85
# New output heads start near zero and must move much further than a body that only adapts.
NEW_LANDMARKS_LEARNING_RATE = 2e-4
# Cases whose mean expected error is this many times the validation images' look unlike the training
# images: the global stage learns too (simulated other device: 60 % of the gap closed against 49 %
# with the local stage alone; scripts/experiments/device_stages.py).
UNLIKE_TRAINING_RATIO = 1.5
# How far a model whose two stages both learned may trust its local stage: the refiner's
# ``min_peak_fraction`` as trained, raised, or never (the global stage's points, the local stage
# still read for the expected error). On the simulated other device, both stages trained 400 steps
# on 10 of its cases, 140 other device images: as trained (0.2) 1.583 mm, 0.5 1.510 mm, never
# 1.501 mm (scripts/experiments/device_limits.py); on usual images as trained is best. The
# cross-validation on the user's cases chooses.
LOCAL_TRUST_CHOICES = (None, 0.5, math.inf)


def suggested_iterations(num_cases: int) -> int:
    """Steps per training run that suit this many cases (few cases: short, against over-fitting)."""
    if num_cases <= 10:
        return DEFAULT_ITERATIONS
    if num_cases <= 30:
        return 300
    return 500


@dataclass
class FineTuneReport:
    """What a fine-tuning did and whether it helped.

    Attributes:
        verdict: ``"better"`` (cross-validated error lower than the starting model's),
            ``"not better"``, or ``"unchecked"`` (fewer than 3 cases, or a new landmark set
            the starting model cannot be measured on).
        output: the model file written, or None when the starting model was kept.
        start_error_mm: cross-validated mean error of the starting model on the cases (mm).
        new_error_mm: the same for the fine-tuned recipe (mm).
        folds: number of cross-validation folds (0: none).
        stages: what was trained: ``["local"]``, ``["global"]`` or ``["global", "local"]``.
        cases: the case names used.
        seconds: wall time of the whole procedure.
        message: one sentence for the user.
        per_fold: ``[{"start_mm", "new_mm", "held_out": [names], "steps"}]``.
        landmarks: the landmark names of the fine-tuned model, in channel order.
        steps_per_run: optimiser steps of each stage in the run on all cases (the folds' are in
            ``per_fold``: under a time limit the first fold's may differ).
    """

    verdict: str
    output: Path | None
    start_error_mm: float | None
    new_error_mm: float | None
    folds: int
    stages: list[str]
    cases: list[str]
    seconds: float
    message: str
    per_fold: list[dict[str, object]] = field(default_factory=list)
    landmarks: list[str] = field(default_factory=list)
    steps_per_run: int = 0

    @property
    def kept_new_model(self) -> bool:
        return self.output is not None

    def to_dict(self) -> dict[str, object]:
        return {
            "verdict": self.verdict, "output": None if self.output is None else str(self.output),
            "start_error_mm": self.start_error_mm, "new_error_mm": self.new_error_mm, "folds": self.folds,
            "stages": self.stages, "cases": self.cases, "seconds": self.seconds, "message": self.message,
            "per_fold": self.per_fold, "landmarks": self.landmarks, "steps_per_run": self.steps_per_run,
        }


def case_landmark_set(cases: Sequence[TrainingCase]) -> tuple[list[str], list[str]]:
    """All landmark names of the cases (first appearance order) and their descriptions."""
    names: list[str] = []
    descriptions: list[str] = []
    for case in cases:
        for name, description in zip(case.landmarks.names, case.landmarks.descriptions):
            if name not in names:
                names.append(name)
                descriptions.append(description)
    return names, descriptions


def plan_landmarks(model: LandmarkModel, cases: Sequence[TrainingCase], *, new_landmarks: bool,
                   seed: int = 0) -> LandmarkModel:
    """The model to start from for these cases: itself, or adapted to the cases' landmark set (new heads from ``seed``).

    Raises:
        ValueError: the cases name landmarks the model does not know and ``new_landmarks`` is False.
    """
    from .training import adapt_to_landmarks

    names, descriptions = case_landmark_set(cases)
    unknown = [n for n in names if n not in model.landmark_names]
    if not unknown:
        return model
    if not new_landmarks:
        shown = ", ".join(unknown[:5]) + (" ..." if len(unknown) > 5 else "")
        msg = (
            f"The cases name {len(unknown)} landmarks that are not in the model ({shown}). Points the model "
            "has but a case lacks count as missing; to learn a different landmark set, ask for new "
            "landmarks explicitly (CLI: --new-landmarks)."
        )
        raise ValueError(msg)
    return adapt_to_landmarks(model, names, descriptions, seed=seed)


def _folds(count: int, seed: int) -> list[np.ndarray]:
    if count < 3:
        return []
    order = np.random.default_rng(seed).permutation(count)
    return [np.sort(part) for part in np.array_split(order, min(MAX_FOLDS, count))]


def _detect_all(model: LandmarkModel, cases: Sequence[TrainingCase], device: str, *,
                signals: list[dict[str, np.ndarray]] | None = None) -> list[Landmarks]:
    """The model's detection on every case, in case order; each case's signals appended to ``signals`` if given."""
    from ..inference.detection import Detector

    detector = Detector(model, device=device)
    found = []
    for case in cases:
        found.append(detector.detect(case.image))
        if signals is not None:
            signals.append(dict(detector.last_signals))
    return found


def _trust_readings(model: LandmarkModel, cases: Sequence[TrainingCase], device: str) -> Readings:
    """``model``'s detections and signals with its local stage trusted as each of ``LOCAL_TRUST_CHOICES`` says.

    Keys are the choices as text (``"as trained"``, ``"0.5"``, ``"inf"``). ``model`` is a fold's
    throwaway model: its local stage's setting is changed in place.
    """
    refiner = model.refiner
    trained = refiner.config  # type: ignore[union-attr]
    readings: Readings = {}
    for choice in LOCAL_TRUST_CHOICES:
        refiner.config = trained if choice is None else replace(trained, min_peak_fraction=choice)  # type: ignore[union-attr]
        signals: list[dict[str, np.ndarray]] = []
        readings[_trust_label(choice)] = (_detect_all(model, cases, device, signals=signals), signals)
    refiner.config = trained  # type: ignore[union-attr]
    return readings


def _refit_error_model(model: LandmarkModel, held_out: Sequence[tuple[Sequence[TrainingCase], Readings]],
                       label: str) -> ErrorModel | None:
    """An error model fitted on the folds' held-out readings (``label``'s), or None where it cannot be.

    On cases unlike the training images the model's own error model describes images it no longer
    sees: the folds' held-out cases, read by models that did not train on them, are the validation
    images of the new model. Same signals as the model's error model; the default threshold flags
    ``DEFAULT_FLAG_FRACTION`` of the held-out points.
    """
    from ..inference.evaluation import point_errors
    from ..models.quality import ErrorModel
    from .quality_fitting import DEFAULT_FLAG_FRACTION

    if model.error_model is None:
        return None
    names = list(model.landmark_names)
    signals: list[dict[str, np.ndarray]] = []
    errors = []
    for cases, readings in held_out:
        found, case_signals = readings[label]
        signals.extend(case_signals)
        errors.extend(point_errors(f, case.landmarks.reordered(names)) for f, case in zip(found, cases))
    use = list(model.error_model.signals)
    if not signals or any(name not in s for s in signals for name in use):
        return None
    try:
        return ErrorModel.fit({name: np.stack([s[name] for s in signals]) for name in use}, np.stack(errors), use=use,
                              flag_fraction=DEFAULT_FLAG_FRACTION,
                              fitted_on=f"held-out detections of {len(signals)} fine-tuning cases (cross-validation)")
    except ValueError as error:
        log.info("Error model not fitted again: %s", error)
        return None


def _choose_trust(per_fold: list[dict[str, object]]) -> float | None:
    """The ``LOCAL_TRUST_CHOICES`` entry with the lowest cross-validated error (None: as trained).

    The chosen reading becomes each fold's "new" error, so the verdict judges the model as it will
    detect. Ties keep the earlier, more trusting choice.
    """
    def error(choice: float | None) -> float:
        label = _trust_label(choice)
        return float(np.nanmean([np.nanmean(f["local_trust_cases_mm"][label]) for f in per_fold]))  # type: ignore[index]

    best = min(LOCAL_TRUST_CHOICES, key=error)
    for fold in per_fold:
        cases = fold["local_trust_cases_mm"][_trust_label(best)]  # type: ignore[index]
        fold["new_cases_mm"], fold["new_mm"] = cases, float(np.nanmean(cases))
    return best


def _trust_label(choice: float | None) -> str:
    return "as trained" if choice is None else str(choice)


def _unlike_training_images(model: LandmarkModel, detections: Sequence[Landmarks]) -> tuple[float, float] | None:
    """``(mean expected error on the cases, on the validation images)`` when the cases look unlike
    the training images (another device, another protocol), else None.

    The error model's expected error rises where the local stage no longer finds the crisp
    structures it learned; on images like the training ones it matches the validation mean
    (bundled model ``08ac2de1...``, with squared terms: 0.98 mm on test1 151-160 against 0.97 mm;
    2.55 mm on a simulated blurred, noisy device, 2.17 mm on a noisy one, whose points are 1.65 and
    1.34 mm off; ``3023e673...``, the same without squared terms: 0.97 against 0.96 mm, 6.97 and
    4.70 mm; ``f95260da...``, fitted on the validation images alone: 0.99 against 0.98 mm, 6.2 and
    5.6 mm on other test1 cases).
    """
    errors = model.error_model
    reference = None if errors is None else errors.validation_mean_mm
    if not reference:
        return None
    values = [found.expected_errors for found in detections]
    mean = float(np.nanmean([np.nanmean(v) for v in values if v is not None and np.isfinite(v).any()] or [np.nan]))
    return (mean, reference) if np.isfinite(mean) and mean >= UNLIKE_TRAINING_RATIO * reference else None


def _case_errors(detections: Sequence[Landmarks], cases: Sequence[TrainingCase]) -> list[float]:
    """Mean point error of each case's detection, mm (NaN for a case without comparable points)."""
    from ..inference.evaluation import point_errors

    means = []
    for found, case in zip(detections, cases):
        errors = point_errors(found, case.landmarks)
        means.append(float(np.nanmean(errors)) if np.isfinite(errors).any() else float("nan"))
    return means


def _paired_uncertainty(per_fold: Sequence[dict[str, object]]) -> float | None:
    """Standard error (mm) of the mean per-case difference new - start: how sure the verdict is."""
    differences = np.array([n - s for f in per_fold for s, n in zip(f["start_cases_mm"], f["new_cases_mm"])],  # type: ignore[arg-type]
                           dtype=float)
    differences = differences[np.isfinite(differences)]
    if differences.size < 2:
        return None
    return float(differences.std(ddof=1) / np.sqrt(differences.size))


def _probe_speed(train: Callable[[int, ProgressCallback], object]) -> tuple[float, float]:
    """``(seconds to set a run up, seconds per step)`` of ``train(count, progress)`` on this machine.

    The rate is the median time between steps: the first step carries one-off costs (allocation,
    kernel choice) and a single slow step (measured: a 10-case fine-tune fitted 74 steps where the
    same machine had fitted 179) must not halve the training.
    """
    stamps: list[float] = []

    def record(event: Progress) -> None:
        if event.stage != "validate":
            stamps.append(time.monotonic())

    began = time.monotonic()
    train(PROBE_STEPS, record)
    total = time.monotonic() - began
    step = float(np.median(np.diff(stamps))) if len(stamps) > 1 else total / PROBE_STEPS
    return max(0.0, total - step * PROBE_STEPS), step


def _steps_that_fit(seconds: float, speeds: Sequence[tuple[float, float]]) -> int:
    """Steps per stage so that one run of every stage, ``speeds = [(setup s, s per step)]``, takes ``seconds``."""
    setup = sum(s for s, _ in speeds)
    per_step = sum(p for _, p in speeds)
    return max(MIN_FITTED_STEPS, int((seconds - setup) / per_step)) if per_step > 0 else MIN_FITTED_STEPS


def _timed_speeds(speeds: dict[str, tuple[float, float]], run_s: float, steps: int) -> dict[str, tuple[float, float]]:
    """The probe's ``{stage: (setup s, s per step)}`` scaled so that a run of ``steps`` takes ``run_s``.

    Set-up and steps scale together: the probe's split between them is an estimate too, and a run
    shorter than the estimated set-up must not read as steps that cost nothing.
    """
    probed_s = sum(setup + step * steps for setup, step in speeds.values())
    scale = run_s / probed_s if probed_s > 0 else 1.0
    return {stage: (setup * scale, step * scale) for stage, (setup, step) in speeds.items()}


class _Stepper:
    """Turns the trainings' own progress into one bar over the whole procedure."""

    def __init__(self, total: int, progress: ProgressCallback | None) -> None:
        self.total = total
        self.finished = 0
        self.progress = progress
        self.started = time.monotonic()

    def callback(self, label: str) -> ProgressCallback:
        def report(event: Progress) -> None:
            if self.progress is None or event.stage == "validate":
                return
            elapsed = time.monotonic() - self.started
            done = self.finished + event.done
            eta = elapsed / done * (self.total - done) if done else None
            self.progress(Progress("fine-tune", done, self.total, elapsed, eta, loss=event.loss, message=label))

        return report


def fine_tune(
    cases: Sequence[TrainingCase],
    model: LandmarkModel | str | Path,
    *,
    output: str | Path,
    iterations: int | None = None,
    time_budget_s: float | None = None,
    new_landmarks: bool = False,
    keep_worse: bool = False,
    stages: Sequence[str] | None = None,
    device: str = "auto",
    seed: int = 0,
    progress: ProgressCallback | None = None,
    should_cancel: Callable[[], bool] | None = None,
) -> FineTuneReport:
    """Fine-tune ``model`` on ``cases``, check it by cross-validation and write it if it is better.

    Args:
        cases: the user's cases (points they corrected are drawn more often).
        model: the starting model or its file; it is never changed.
        output: the new model file (never overwritten).
        iterations: optimiser steps of each training run (default: :func:`suggested_iterations`,
            fewer where they would not fit in ``DEFAULT_TIME_LIMIT_S`` on this machine).
        time_budget_s: wall-time budget of the whole procedure, in seconds: without
            ``iterations``, each run takes as many steps as fit; with it, at most that many.
        new_landmarks: the cases define a different landmark set (new output heads).
        keep_worse: write the new model even when it is not better.
        stages: what to train, ``"global"`` and/or ``"local"`` in that order (default: the
            recipe's choice, see the module docstring).
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``.
        seed: seeds the folds and the trainings.
        progress: called with a :class:`~SCNLandmarksLib.common.progress.Progress` over the whole procedure.
        should_cancel: polled every step; True stops with ``TrainingCancelled`` (nothing written).

    Raises:
        ValueError: no cases, unknown landmarks without ``new_landmarks``, bad settings.
        FileExistsError: ``output`` exists, or another fine-tuning is writing it.
        TrainingCancelled: cancelled.
    """
    from ..models.model_file import load_model

    started = time.monotonic()
    output = Path(output)
    if output.exists():
        msg = f"The new model file {output} already exists; models are never overwritten"
        raise FileExistsError(msg)
    if not cases:
        msg = "Fine-tuning needs at least one case"
        raise ValueError(msg)
    if iterations is not None and iterations < 1:
        msg = f"The number of iterations must be at least 1, got {iterations}"
        raise ValueError(msg)
    if time_budget_s is not None and time_budget_s <= 0:
        msg = f"The time budget must be more than 0 seconds, got {time_budget_s}"
        raise ValueError(msg)
    start = load_model(model) if isinstance(model, (str, Path)) else model
    if isinstance(model, (str, Path)) and Path(model).resolve() == output.resolve():
        msg = "The fine-tuned model must be saved under a new name, not over the model it starts from"
        raise ValueError(msg)
    with _reserved(output):
        return _fine_tune(cases, model, start, output, iterations, time_budget_s, new_landmarks, keep_worse, stages,
                          device, seed, progress, should_cancel, started)


@contextlib.contextmanager
def _reserved(output: Path) -> Iterator[None]:
    """Hold the output name for the whole fine-tuning: a second run with the same name is refused at once.

    Under ``torchrun`` process 0 holds it (the one that writes).
    """
    if int(os.environ.get("RANK", "0")) != 0:
        yield
        return
    reservation = output.with_name(output.name + ".reserved")
    try:
        descriptor = os.open(reservation, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        msg = (f"Another fine-tuning is already writing {output} (its reservation {reservation.name} exists); "
               "choose another name, or delete that file if no fine-tuning is running")
        raise FileExistsError(msg) from None
    os.close(descriptor)
    try:
        yield
    finally:
        reservation.unlink(missing_ok=True)


def _fine_tune(  # noqa: PLR0913 - the arguments of fine_tune, checked
    cases: Sequence[TrainingCase],
    model: LandmarkModel | str | Path,
    start: LandmarkModel,
    output: Path,
    iterations: int | None,
    time_budget_s: float | None,
    new_landmarks: bool,
    keep_worse: bool,
    chosen_stages: Sequence[str] | None,
    device: str,
    seed: int,
    progress: ProgressCallback | None,
    should_cancel: Callable[[], bool] | None,
    started: float,
) -> FineTuneReport:
    from ..common.device import resolve_device
    from .distributed import distributed_from_environment
    from .refinement_training import RefinerTrainingConfig, train_refiner
    from .step_loop import write_trained_model
    from .training import TrainingConfig, train_model

    base = plan_landmarks(start, cases, new_landmarks=new_landmarks, seed=seed)
    changed_set = base is not start
    stages = ["global"] if changed_set or base.refiner is None else []
    if base.refiner is not None:
        stages.append("local")
    if chosen_stages is not None:
        unknown = [stage for stage in chosen_stages if stage not in ("global", "local")]
        if unknown or not chosen_stages or (changed_set and "global" not in chosen_stages):
            msg = f"Stages must be 'global' and/or 'local' (a new landmark set needs 'global'); got {list(chosen_stages)}"
            raise ValueError(msg)
        if "local" in chosen_stages and base.refiner is None:
            msg = "This model has no local refinement stage to fine-tune"
            raise ValueError(msg)
        stages = [stage for stage in ("global", "local") if stage in chosen_stages]
    note = ""
    global_rate = NEW_LANDMARKS_LEARNING_RATE if changed_set else GLOBAL_LEARNING_RATE
    folds = [] if changed_set else _folds(len(cases), seed)
    recipe_chooses = chosen_stages is None and stages == ["local"]
    # The starting model's detections serve the device check and every fold's "before" (once each).
    start_found: list[Landmarks] | None = None
    detection_s = 0.0  # detecting every case once; the folds' held-out cases add up to the same again
    if folds or recipe_chooses:
        began = time.monotonic()
        start_found = _detect_all(start, cases, device)
        detection_s = time.monotonic() - began
    unlike = None
    if recipe_chooses:
        unlike = _unlike_training_images(start, start_found)  # type: ignore[arg-type]
        if unlike is not None:
            stages = ["global", "local"]
            global_rate = UNLIKE_GLOBAL_LEARNING_RATE
            note = (f"Your images look unlike the model's training images (expected error {unlike[0]:.1f} mm against "
                    f"{unlike[1]:.1f} mm on its validation images), so both stages learn. ")
            log.info(note)
    runs = len(folds) + 1
    # The global stage learning the same landmarks beside a local stage: the folds also judge how far
    # to trust the local stage (whether it learned too or not).
    choose_trust = bool(folds) and not changed_set and "global" in stages and base.refiner is not None
    held_out_readings = len(LOCAL_TRUST_CHOICES) if choose_trust else 1
    steps = iterations or suggested_iterations(len(cases))
    limit_s = time_budget_s if time_budget_s is not None else (None if iterations is not None else DEFAULT_TIME_LIMIT_S)
    # The most steps a run may take: a budget alone takes as many as fit. So does a new landmark set
    # under the default limit: its heads start from nothing, and on the hands (6 cases) the
    # recipe's 200 steps per stage gave 2.21 mm in 110 s where 600 gave 0.99 mm
    # (scripts/experiments/promise_loop.py --scenarios hand --hand-folds 1,2,3).
    fill_budget = iterations is None and (time_budget_s is not None or changed_set)
    most_steps = None if fill_budget else steps
    distributed = distributed_from_environment(resolve_device(device))
    keep_statistics = "global" not in stages
    local_rate = GENTLE_LOCAL_LEARNING_RATE if keep_statistics else LOCAL_LEARNING_RATE
    local_recipe = {"learning_rate": local_rate, "batch_norm_statistics": "kept" if keep_statistics else "follow the cases"}
    ceilings: dict[str, float | None] = dict.fromkeys(stages)
    speeds: dict[str, tuple[float, float]] = {}

    def fit(seconds_per_run: float, measured: dict[str, tuple[float, float]]) -> int:
        """Steps per run that fit ``seconds_per_run`` at the ``measured`` speeds; also bounds each stage's time."""
        fitted = _steps_that_fit(seconds_per_run, list(measured.values()))
        # Under torchrun each process measured its own speed; all must run the same steps.
        fitted = distributed.smallest(fitted if most_steps is None else min(most_steps, fitted))
        for stage, (setup_s, step_s) in measured.items():
            ceilings[stage] = RUN_CEILING * (setup_s + fitted * step_s)
        return fitted

    def train_stage(stage: str, model: LandmarkModel, train_cases: Sequence[TrainingCase], target: Path, count: int,
                    report: ProgressCallback | None) -> LandmarkModel:
        if stage == "global":
            config = TrainingConfig(
                iterations=count, learning_rate=global_rate,
                device=device, seed=seed, validate_every=0, validation_fraction=0.0, time_budget_s=ceilings[stage],
                checkpoint_every=0, progress_every=1,
            )
            return train_model(train_cases, model, output=target, config=config, validation_cases=[],
                               progress=report, should_cancel=should_cancel).model
        config = RefinerTrainingConfig(
            iterations=count, learning_rate=local_rate, freeze_batch_norm=keep_statistics,
            batch_size=max(1, min(LOCAL_BATCH_SIZE, model.refiner.config.crops_at_once)  # type: ignore[union-attr]
                           // model.refiner.config.members),  # type: ignore[union-attr]
            device=device, seed=seed, validate_every=0, checkpoint_every=0, time_budget_s=ceilings[stage],
            progress_every=1,
        )
        return train_refiner(train_cases, model, output=target, config=config, validation_cases=[],
                             progress=report, should_cancel=should_cancel).model

    with tempfile.TemporaryDirectory(prefix="scn-finetune-") as scratch:
        if limit_s is not None:
            if progress is not None:
                progress(Progress("fine-tune", 0, None, time.monotonic() - started, None,
                                  message="measuring this computer's training speed"))
            speeds = {stage: _probe_speed(lambda count, report, stage=stage: train_stage(  # noqa: B023 - called at once
                stage, copy.deepcopy(base), cases, Path(scratch) / f"probe-{stage}.scn.pt", count, report))
                for stage in stages}
            # What is left once the probe ran and the folds' held-out cases are detected again.
            room_s = limit_s - (time.monotonic() - started) - (held_out_readings * detection_s if folds else 0.0)
            steps = fit(SPEED_MARGIN * room_s / runs, speeds)
        stepper = _Stepper(steps * runs * len(stages), progress)

        def train(train_cases: Sequence[TrainingCase], label: str, destination: Path) -> LandmarkModel:
            trained = copy.deepcopy(base)
            for stage in stages:
                trained = train_stage(stage, trained, train_cases, destination.with_name(f"{stage}-{destination.name}"),
                                      steps, stepper.callback(f"{label}: {stage} stage"))
                stepper.finished += steps
            return trained

        per_fold: list[dict[str, object]] = []
        fold_readings: list[tuple[list[TrainingCase], Readings]] = []
        for number, held_out in enumerate(folds):
            held_out_set = set(held_out.tolist())
            training = [c for i, c in enumerate(cases) if i not in held_out_set]
            testing = [cases[i] for i in held_out]
            fold_steps, began = steps, time.monotonic()
            fold_model = train(training, f"fold {number + 1} of {len(folds)}", Path(scratch) / f"fold{number}.scn.pt")
            run_s = time.monotonic() - began
            start_cases = _case_errors([start_found[i] for i in held_out], testing)  # type: ignore[index]
            readings = _trust_readings(fold_model, testing, device) if choose_trust else {}
            fold_readings.append((testing, readings))
            trust = {label: _case_errors(found, testing) for label, (found, _) in readings.items()}
            new_cases = trust.get(_trust_label(None)) or _case_errors(_detect_all(fold_model, testing, device), testing)
            per_fold.append({
                "held_out": [c.name for c in testing], "steps": fold_steps,
                "start_mm": float(np.nanmean(start_cases)), "new_mm": float(np.nanmean(new_cases)),
                "start_cases_mm": start_cases, "new_cases_mm": new_cases,
                **({"local_trust_cases_mm": trust} if trust else {}),
            })
            if number == 0 and limit_s is not None:
                # The first run, timed whole, corrects the probe's speeds for the runs still to come.
                speeds = _timed_speeds(speeds, run_s, fold_steps)
                left = runs - 1
                room_s = (limit_s - (time.monotonic() - started)
                          - held_out_readings * detection_s * (len(folds) - 1) / len(folds))
                steps = fit(TIMED_RUN_MARGIN * room_s / left, speeds)
                stepper.total = stepper.finished + steps * left * len(stages)
        uncertainty = None
        trust_choice = _choose_trust(per_fold) if choose_trust else None
        # Cases unlike the training images: the expected errors are learned again on them.
        refitted = _refit_error_model(start, fold_readings, _trust_label(trust_choice)) if unlike and choose_trust else None
        if per_fold:
            start_error = float(np.nanmean([f["start_mm"] for f in per_fold]))  # type: ignore[misc]
            new_error = float(np.nanmean([f["new_mm"] for f in per_fold]))  # type: ignore[misc]
            verdict = "better" if new_error < start_error else "not better"
            uncertainty = _paired_uncertainty(per_fold)
        else:
            start_error = new_error = None
            verdict = "unchecked"
        written: Path | None = None
        if verdict != "not better" or keep_worse:
            final = train(list(cases), "all cases", Path(scratch) / "final.scn.pt")
            if trust_choice is not None:
                final.refiner.config = replace(final.refiner.config, min_peak_fraction=trust_choice)  # type: ignore[union-attr]
            if refitted is not None:
                final.error_model = refitted
            parent = Path(model).name if isinstance(model, (str, Path)) else final.info.get("parent_model", "")
            final.info = {**final.info, "parent_model": parent,
                          "fine_tune": {"verdict": verdict, "start_error_mm": start_error, "new_error_mm": new_error,
                                        "folds": len(folds), "stages": stages, "steps_per_run": steps,
                                        "cases": [c.name for c in cases],
                                        **({"global_learning_rate": global_rate} if "global" in stages else {}),
                                        **({"local_recipe": local_recipe} if "local" in stages else {}),
                                        **({"local_trust": _trust_label(trust_choice)} if choose_trust else {}),
                                        **({"error_model": refitted.fitted_on} if refitted is not None else {})}}
            # Under torchrun every process trained the same model; process 0 writes it.
            # A full disk keeps a rescue copy elsewhere and says where (write_trained_model).
            written = write_trained_model(final, output, overwrite=False) if int(os.environ.get("RANK", "0")) == 0 else output
    seconds = time.monotonic() - started
    message = note + _message(verdict, start_error, new_error, len(folds), written, changed_set)
    if trust_choice is not None and written is not None:
        message += (" On your cases the global stage placed points better than an unsure local stage, so the new "
                    + ("model keeps the global stage's points." if math.isinf(trust_choice) else
                       f"model uses the local stage only where it is sure (peak at least {trust_choice:g} of its trained peak)."))
    if refitted is not None and written is not None:
        message += (f" Its expected errors were learned again on your cases (each read by a model that did not train "
                    f"on it): points expected more than {refitted.check_above_mm:.1f} mm off are marked for checking.")
    recipe_steps = iterations or suggested_iterations(len(cases))
    if steps < recipe_steps:
        message += (f" Each training run took {steps} steps instead of {recipe_steps}, to end within "
                    f"{limit_s / 60:.1f} minutes on this computer.")
    if uncertainty is not None and start_error is not None and abs(new_error - start_error) < 2 * uncertainty:
        # Measured: with 10 cases, which 3-4 cases a fold holds out decides much of the verdict
        # (scripts/experiments/review_first.py); say so rather than sound sure.
        message += (f" The difference is within what {len(cases)} cases can tell apart (+/-{uncertainty:.2f} mm); "
                    "more corrected cases make this check reliable.")
    log.info(message)
    return FineTuneReport(verdict, written, start_error, new_error, len(folds), stages, [c.name for c in cases],
                          seconds, message, per_fold, list(base.landmark_names), steps)


def _message(verdict: str, start: float | None, new: float | None, folds: int, written: Path | None, changed: bool) -> str:
    if verdict == "unchecked":
        reason = "a new landmark set cannot be compared with the starting model" if changed else (
            "fewer than 3 cases leave none to check on")
        return f"Fine-tuned model written to {written}; not checked: {reason}."
    numbers = f"{folds}-fold cross-validated error on your cases: starting model {start:.2f} mm, fine-tuned {new:.2f} mm"
    if verdict == "better":
        return f"{numbers}. The fine-tuned model is better; written to {written}."
    if written is not None:
        return f"{numbers}. The fine-tuned model is NOT better; written to {written} as you asked."
    return f"{numbers}. The fine-tuned model is not better, so the starting model is kept (no new file written)."

