"""Training and fine-tuning, with validation, checkpoints, resume, progress and cancel.

Optimiser choice (why not the paper's): the SCN code trains with SGD + Nesterov momentum 0.99
at lr 1e-6 on a *summed* L2 loss for 30 000 iterations; its step size is tied to the loss
scale and it starts very slowly because both heatmap layers begin near zero. Adam is
invariant to that scale and leaves the near-zero start quickly, so we use AdamW (decoupled
weight decay on conv weights only; biases and sigmas undecayed) with a short warm-up and a
cosine decay, the same summed loss, and the paper's gradient-norm clip of 1e4.
"""

from __future__ import annotations

import copy
import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..imaging.augmentation import AugmentationConfig, random_intensity, random_transform
from ..inference.detection import AS_IS, Detector
from ..common.device import bfloat16_is_native, describe_device, resolve_device
from ..inference.evaluation import point_errors
from ..models.heatmaps import heatmap_loss
from ..models.model import LandmarkModel
from ..models.network import build_network
from ..imaging.preprocess import PreparedImage, prepare_image
from ..common.progress import ProgressCallback
from ..models.refinement import RefinementNetwork, RefinerConfig, build_refiner
from ..data.training_case import TrainingCase
from .distributed import distributed_from_environment
from .step_loop import StepLoop, refuse_to_start, restore, resume_state

__all__ = ["TrainingConfig", "TrainingResult", "adapt_to_landmarks", "train_model"]

log = logging.getLogger(__name__)


@dataclass
class TrainingConfig:
    """How to train; stored with the model for provenance.

    Attributes:
        iterations: optimiser steps.
        batch_size: images per step.
        learning_rate: peak AdamW learning rate.
        sigma_learning_rate_factor: the sigmas learn this many times faster than the weights.
        weight_decay: decoupled weight decay of conv weights.
        warmup_fraction: share of the iterations with a linear learning-rate warm-up.
        final_learning_rate_fraction: learning rate at the end, relative to the peak.
        grad_clip_norm: global gradient-norm clip.
        validation_fraction: share of the cases held out for validation when no
            validation cases are given (at least one case once there are 4 or more).
        validate_every: iterations between validations (0: only at the end).
        seed: seeds the split, the augmentation and the initialisation.
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``.
        mixed_precision: bfloat16 autocast where the device computes bfloat16 natively (CPUs with
            AVX512-BF16 or AMX, bf16 GPUs); float32 elsewhere, where bfloat16 is emulated and slower.
        num_workers: background processes preparing augmented samples.
        checkpoint_every: iterations between checkpoints (0: none except on cancel).
        time_budget_s: stop (successfully) after this many seconds of training.
        progress_every: iterations between progress reports.
        augmentation: augmentation ranges.
    """

    iterations: int = 20_000
    batch_size: int = 1
    learning_rate: float = 1e-4
    sigma_learning_rate_factor: float = 10.0
    weight_decay: float = 1e-4
    warmup_fraction: float = 0.02
    final_learning_rate_fraction: float = 0.01
    grad_clip_norm: float = 1e4
    validation_fraction: float = 0.1
    validate_every: int = 1000
    seed: int = 0
    device: str = "auto"
    mixed_precision: bool = True
    num_workers: int = 0
    checkpoint_every: int = 1000
    time_budget_s: float | None = None
    progress_every: int = 10
    augmentation: AugmentationConfig = field(default_factory=AugmentationConfig)

    def __post_init__(self) -> None:
        if self.iterations < 1:
            msg = f"Training needs at least one iteration, got {self.iterations}"
            raise ValueError(msg)
        if self.batch_size < 1:
            msg = f"Batch size must be at least 1, got {self.batch_size}"
            raise ValueError(msg)
        if not 0 <= self.validation_fraction < 1:
            msg = f"Validation fraction must be in [0, 1), got {self.validation_fraction}"
            raise ValueError(msg)
        if isinstance(self.augmentation, dict):
            self.augmentation = AugmentationConfig.from_dict(self.augmentation)

    def to_dict(self) -> dict[str, object]:
        values = asdict(self)
        values["augmentation"] = self.augmentation.to_dict()
        return values


@dataclass
class TrainingResult:
    """What a finished training produced.

    Attributes:
        model: the trained model (best validation state when validating).
        output: the model file written.
        iterations: steps done (fewer than planned when a time budget ended training).
        history: ``[{"iteration", "loss", "validation_mre_mm"}, ...]``.
        best_validation_mre_mm: best validation mean radial error, or None without validation.
        seconds: wall time of the training loop.
        device: the device used, in words.
    """

    model: LandmarkModel
    output: Path
    iterations: int
    history: list[dict[str, float | int | None]]
    best_validation_mre_mm: float | None
    seconds: float
    device: str


@dataclass
class _PreparedCase:
    name: str
    image: PreparedImage
    positions: np.ndarray  # (N, D) LPS mm, NaN where missing, in model channel order


def adapt_to_landmarks(
    model: LandmarkModel, names: Sequence[str], descriptions: Sequence[str] | None = None, *, seed: int = 0,
) -> LandmarkModel:
    """A copy of ``model`` for another landmark set: new output heads, the rest of the body reused.

    Landmarks whose names the model already knows keep their head weights and sigma, so
    adapting to the same set is a no-op and adding landmarks keeps what was learned. The new
    heads start from ``seed``, not from whatever state earlier work in the process left the
    random generator in: with a few cases their start weighs (one hand fold, 6 cases, gave 0.97
    and 1.22 mm in two runs before the heads were seeded).
    """
    names = list(names)
    descriptions = list(descriptions) if descriptions is not None else [""] * len(names)
    if names == model.landmark_names:
        return copy.deepcopy(model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _adapted(model, names, descriptions)


def _adapted(model: LandmarkModel, names: list[str], descriptions: list[str]) -> LandmarkModel:
    config = type(model.config).from_dict({**model.config.to_dict(), "num_landmarks": len(names)})
    network = build_network(config)
    old_state = model.network.state_dict()
    new_state = network.state_dict()
    heads = network.head_parameter_names()
    old_index = {n: i for i, n in enumerate(model.landmark_names)}
    for key, value in old_state.items():
        if key not in heads:
            new_state[key] = value.clone()
            continue
        # Heads: copy the rows (or input columns) of landmarks both sets share.
        target = new_state[key]
        channel_axis = 1 if key.endswith("spatial.hidden.0.conv.weight") else 0
        for new_i, name in enumerate(names):
            if name in old_index:
                target.select(channel_axis, new_i).copy_(value.select(channel_axis, old_index[name]))
    network.load_state_dict(new_state)
    targets = copy.deepcopy(model.targets)
    initial = float(model.targets.sigmas.detach().mean())
    sigmas = torch.full((len(names),), initial)
    for new_i, name in enumerate(names):
        if name in old_index:
            sigmas[new_i] = model.targets.sigmas.detach()[old_index[name]]
    targets.sigmas = torch.nn.Parameter(sigmas)
    return LandmarkModel(
        network=network,
        targets=targets,
        grid=model.grid,
        intensity=model.intensity,
        landmark_names=names,
        landmark_descriptions=descriptions,
        sigma_weight=model.sigma_weight,
        info={"adapted_from_landmarks": list(model.landmark_names)},
        refiner=None if model.refiner is None else _adapt_refiner(model.refiner, model.landmark_names, names),
    )


def _adapt_refiner(refiner: RefinementNetwork, old_names: Sequence[str], names: Sequence[str]) -> RefinementNetwork:
    """The local stage for another landmark set: same body, head rows of shared landmarks kept."""
    config = RefinerConfig.from_dict({**refiner.config.to_dict(), "num_landmarks": len(names)})
    adapted = build_refiner(config)
    heads = adapted.head_parameter_names()
    state = adapted.state_dict()
    old_index = {n: i for i, n in enumerate(old_names)}
    for key, value in refiner.state_dict().items():
        if key not in heads:
            state[key] = value.clone()
            continue
        for new_i, name in enumerate(names):
            if name in old_index:
                state[key][new_i] = value[old_index[name]]
    adapted.load_state_dict(state)
    return adapted


def aligned_positions(case: TrainingCase, names: list[str]) -> np.ndarray:
    """The case's landmark positions ``(N, D)`` LPS mm in the order of ``names`` (NaN where missing)."""
    case_names = case.landmarks.names
    unknown = [n for n in case_names if n not in names]
    if unknown:
        label = case.name or "a training case"
        msg = (
            f"{label} has {len(case_names)} landmarks but the model has {len(names)}; "
            f"these are not in the model: {', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}. "
            "To learn a different landmark set, fine-tune with new landmark names (new output heads)."
        )
        raise ValueError(msg)
    return case.landmarks.reordered(names).positions


def _prepare_cases(cases: Sequence[TrainingCase], model: LandmarkModel) -> list[_PreparedCase]:
    prepared = []
    for number, case in enumerate(cases):
        label = case.name or f"case {number + 1}"
        if case.landmarks.dimension != model.dimension:
            msg = f"{label} has {case.landmarks.dimension}D landmarks but the model is {model.dimension}D"
            raise ValueError(msg)
        positions = aligned_positions(case, model.landmark_names)
        if not np.isfinite(positions).all(axis=1).any():
            msg = f"{label} has no placed landmarks; it cannot teach the model anything"
            raise ValueError(msg)
        try:
            image = prepare_image(case.image, grid=model.grid, intensity=model.intensity, dimension=model.dimension)
        except ValueError as error:
            msg = f"{label}: {error}"
            raise ValueError(msg) from error
        prepared.append(_PreparedCase(label, image, positions))
    return prepared


def _make_sample(
    case: _PreparedCase, augmentation: AugmentationConfig, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    transform = random_transform(case.image.base, augmentation, rng, image_extent_mm=case.image.extent_along_grid_mm)
    shift, scale = random_intensity(augmentation, rng)
    array = case.image.sample(transform, shift=shift, scale=scale)
    positions = transform.physical_to_grid(case.positions)
    valid = np.isfinite(positions).all(axis=1)
    return array[None], positions.astype(np.float32), valid


class _SampleStream(torch.utils.data.IterableDataset):
    """Endless augmented samples; every worker draws from its own seeded generator."""

    def __init__(self, cases: list[_PreparedCase], augmentation: AugmentationConfig, seed: int) -> None:
        self.cases = cases
        self.augmentation = augmentation
        self.seed = seed

    def __iter__(self):  # noqa: ANN204
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else 0
        rng = np.random.default_rng([self.seed, worker])
        while True:
            case = self.cases[int(rng.integers(len(self.cases)))]
            yield _make_sample(case, self.augmentation, rng)


def split_cases(cases: Sequence[TrainingCase], fraction: float, seed: int) -> tuple[list[TrainingCase], list[TrainingCase]]:
    """``(training, validation)``: a seeded share held out, at least one case once there are 4 or more."""
    count = len(cases)
    held_out = int(round(count * fraction)) if count >= 4 else 0
    if fraction > 0 and count >= 4:
        held_out = max(held_out, 1)
    order = np.random.default_rng(seed).permutation(count)
    validation = [cases[i] for i in order[:held_out]]
    training = [cases[i] for i in order[held_out:]]
    return training, validation


def _parameter_groups(model: LandmarkModel, config: TrainingConfig) -> list[dict[str, object]]:
    decayed, undecayed = [], []
    for name, parameter in model.network.named_parameters():
        (decayed if name.endswith("weight") else undecayed).append(parameter)
    return [
        {"params": decayed, "weight_decay": config.weight_decay, "lr": config.learning_rate},
        {"params": undecayed, "weight_decay": 0.0, "lr": config.learning_rate},
        {"params": [model.targets.sigmas], "weight_decay": 0.0,
         "lr": config.learning_rate * config.sigma_learning_rate_factor},
    ]


def warmup_cosine(iterations: int, *, warmup_fraction: float, final_fraction: float) -> Callable[[int], float]:
    """Learning-rate factor per step: linear warm-up, then cosine decay to ``final_fraction`` of the peak."""
    warmup = max(1, int(iterations * warmup_fraction))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, iterations - warmup)
        return final_fraction + (1 - final_fraction) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def validation_mre(model: LandmarkModel, cases: Sequence[TrainingCase], device: torch.device) -> float:
    """Mean radial error in mm of the model on un-augmented cases (NaN when nothing could be measured)."""
    was_training = model.network.training
    # Validation images are read as they are: an untrained model has no orientation to trust.
    detector = Detector(model, device=device, readings=AS_IS)
    errors = [point_errors(detector.detect(case.image), case.landmarks) for case in cases]
    model.network.train(was_training)
    values = np.concatenate(errors) if errors else np.array([np.nan])
    return float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")


def train_model(
    cases: Sequence[TrainingCase],
    model: LandmarkModel,
    *,
    output: str | Path,
    config: TrainingConfig | None = None,
    validation_cases: Sequence[TrainingCase] | None = None,
    checkpoint: str | Path | None = None,
    resume: bool = False,
    progress: ProgressCallback | None = None,
    should_cancel: Callable[[], bool] | None = None,
    overwrite: bool = False,
) -> TrainingResult:
    """Train ``model`` on ``cases`` and write the result to ``output``.

    ``model`` is a fresh model from :func:`~SCNLandmarksLib.models.model.create_model` (training
    from scratch) or a loaded one (fine-tuning; use :func:`adapt_to_landmarks` first for
    another landmark set). It is trained in place.

    Args:
        cases: annotated images; landmarks are matched to the model's by name.
        model: the model to train.
        output: model file to write when training finishes. It is written once, at the end,
            atomically: a failed or cancelled run leaves any existing file as it was.
        config: training settings (defaults: :class:`TrainingConfig`).
        validation_cases: held-out cases; by default ``config.validation_fraction`` of ``cases``.
        checkpoint: file for periodic checkpoints (also written on cancel) to resume from.
        resume: continue from ``checkpoint`` when it exists.
        progress: called with a :class:`~SCNLandmarksLib.common.progress.Progress` now and then.
        should_cancel: polled every iteration; returning True stops with :class:`TrainingCancelled`.
        overwrite: allow replacing an existing ``output`` file.

    Raises:
        TrainingCancelled: ``should_cancel`` returned True.
        ValueError: unusable cases or settings, with the reason.
        FileExistsError: ``output`` exists and ``overwrite`` is False.
    """
    config = config or TrainingConfig()
    output = Path(output)
    refuse_to_start(output, cases, overwrite=overwrite, checkpoint=None if checkpoint is None else Path(checkpoint),
                    resume=resume)
    device = resolve_device(config.device)
    torch.manual_seed(config.seed)
    if validation_cases is None:
        training_cases, validation_cases = split_cases(list(cases), config.validation_fraction, config.seed)
    else:
        training_cases, validation_cases = list(cases), list(validation_cases)
    prepared = _prepare_cases(training_cases, model)
    _prepare_cases(validation_cases, model)  # fail early on a bad validation case
    log.info("Training on %d cases, validating on %d, device %s", len(prepared), len(validation_cases), describe_device(device))

    model.to(device)
    model.network.train()
    run = distributed_from_environment(device)
    run.broadcast_state(model.network)
    run.broadcast_state(model.targets)
    optimizer = torch.optim.AdamW(_parameter_groups(model, config))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(
        config.iterations, warmup_fraction=config.warmup_fraction, final_fraction=config.final_learning_rate_fraction))
    checkpoint = Path(checkpoint) if checkpoint is not None else None
    saved = resume_state(checkpoint, resume)
    resumed = restore(saved, {"network": model.network, "targets": model.targets, "optimizer": optimizer,
                              "scheduler": scheduler}, checkpoint)
    start_iteration, history, best_mre, best_state = resumed.iteration, resumed.history, resumed.best_mre, resumed.best_state
    if saved is not None:
        log.info("Resuming from %s at iteration %d", checkpoint, start_iteration)

    def checkpoint_state(iteration: int) -> dict[str, object]:
        return {
            "network": model.network.state_dict(),
            "targets": model.targets.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "iteration": iteration,
            "history": json.dumps(history),
            "best_mre": best_mre,
            "best_state": best_state or {},
            "config": json.dumps(config.to_dict()),
        }

    def snapshot() -> dict[str, object]:
        return {
            "network": {k: v.detach().cpu().clone() for k, v in model.network.state_dict().items()},
            "targets": {k: v.detach().cpu().clone() for k, v in model.targets.state_dict().items()},
        }

    def validate(iteration: int) -> float | None:
        nonlocal best_mre, best_state
        if not validation_cases or not run.is_main:
            return None
        mre = validation_mre(model, validation_cases, device)
        if best_mre is None or (np.isfinite(mre) and mre < best_mre):
            best_mre, best_state = mre, snapshot()
        return mre

    stream = _SampleStream(prepared, config.augmentation, config.seed + start_iteration + run.seed_offset())
    loader = torch.utils.data.DataLoader(
        stream, batch_size=config.batch_size, num_workers=config.num_workers,
        persistent_workers=config.num_workers > 0, pin_memory=device.type == "cuda",
    )
    use_autocast = config.mixed_precision and bfloat16_is_native(device)
    loop = StepLoop("train", config.iterations, start_iteration, config.time_budget_s, config.validate_every,
                    config.progress_every, config.checkpoint_every, checkpoint, progress, should_cancel, history,
                    distributed=run)
    iteration = start_iteration
    batches = iter(loader)
    try:
        while iteration < config.iterations:
            loop.stop_if_cancelled(iteration, lambda: checkpoint_state(iteration))
            images, positions, valid = next(batches)
            images, positions, valid = images.to(device), positions.to(device), valid.to(device)
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_autocast):
                predicted = model.network(images)
            targets = model.targets(positions, tuple(images.shape[2:]))
            loss = heatmap_loss(predicted.float(), targets, valid, model.targets.sigmas, sigma_weight=model.sigma_weight)
            if not torch.isfinite(loss):
                msg = (
                    f"Training diverged at iteration {iteration} (the loss is not a number); "
                    "lower the learning rate. No model file was written."
                )
                raise FloatingPointError(msg)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            run.average_gradients([*model.network.parameters(), model.targets.sigmas])
            torch.nn.utils.clip_grad_norm_(
                list(model.network.parameters()) + [model.targets.sigmas], config.grad_clip_norm
            )
            optimizer.step()
            scheduler.step()
            iteration += 1
            if loop.after_step(iteration, float(loss.detach()), lambda: validate(iteration),
                               lambda: checkpoint_state(iteration)):
                break
    finally:
        del batches, loader
    loop.finish(iteration, validate(iteration))
    if best_state is not None:
        model.network.load_state_dict(best_state["network"])
        model.targets.load_state_dict(best_state["targets"])
    seconds = loop.elapsed_s
    model.network.eval()
    model.info = {**{k: v for k, v in model.info.items() if k != "training"}, "training": loop.record(
        iteration, cases=[c.name for c in prepared], validation_cases=[c.name for c in validation_cases],
        config=config.to_dict(), best_mre=best_mre, seconds=seconds, device=describe_device(device))}
    loop.write(model, output, overwrite=overwrite)
    return TrainingResult(model, output, iteration, history, best_mre, seconds, describe_device(device))
