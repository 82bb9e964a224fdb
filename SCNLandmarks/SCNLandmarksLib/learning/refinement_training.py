"""Training the local refinement stage on crops around the true landmarks.

The global stage is frozen here (train it first with :func:`~SCNLandmarksLib.learning.training.train_model`).
Each step draws a batch of crops: a random case, one of its placed landmarks, a crop centre
offset from the truth the way the global stage errs (mostly a few mm, sometimes more), a random
rotation and scale of the crop, and an intensity shift and scale. The crop's own landmark
channel is trained towards a normalised Gaussian at the true position (cross-entropy).
Validation runs the whole two-stage detection on held-out cases, reusing the frozen global
stage's estimates, so its error is what a user would see.

bfloat16 autocast is used wherever the hardware computes it, CPUs included: on CPUs with
AVX512-BF16 it trains this network 2-3 times faster than float32 (``scripts/benchmark.py --cases
local-2d``).
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from ..imaging.augmentation import random_linear
from ..inference.detection import AS_IS, Detector
from ..common.device import bfloat16_is_native, describe_device, resolve_device
from ..inference.evaluation import point_errors
from ..data.landmarks import Landmarks
from ..models.model import LandmarkModel
from ..imaging.preprocess import PreparedImage
from ..common.progress import ProgressCallback
from ..models.refinement import (
    RefinementNetwork,
    build_refiner,
    RefinerConfig,
    crop_target,
    crop_transform,
    prepare_for_refiner,
    refine_positions,
    refinement_loss,
)
from .distributed import distributed_from_environment
from .step_loop import StepLoop, refuse_to_start, restore, resume_state
from .training import aligned_positions, split_cases, warmup_cosine
from ..data.training_case import TrainingCase

__all__ = ["RefinerTrainingConfig", "RefinerTrainingResult", "attach_refiner", "train_refiner"]

log = logging.getLogger(__name__)

# Crops per training step where the crops are small enough (2D).
DEFAULT_BATCH_SIZE = 32


@dataclass
class RefinerTrainingConfig:
    """How to train the local stage; stored with the model for provenance.

    Attributes:
        iterations: optimiser steps.
        batch_size: crops per step (default: 32, or fewer where the crops are large, see
            :attr:`~SCNLandmarksLib.models.refinement.RefinerConfig.crops_at_once`: 8 for 3D crops of 64 voxels a side).
        learning_rate: peak AdamW learning rate (warm-up, then cosine decay).
        final_learning_rate_fraction: learning rate at the end, relative to the peak.
        weight_decay: decoupled weight decay of conv weights.
        offset_mm: standard deviation of the crop centre's offset from the truth, per axis (mm).
        far_offset_share: share of crops whose offset is drawn uniformly over most of the
            crop instead, so that large global errors are learned too.
        rotation_rad: crop rotation range (+-).
        scale: isotropic crop scale range (+-, relative).
        axis_scale: per-axis crop scale range (+-, relative).
        intensity_shift: shift of the normalised intensity (+-).
        intensity_scale: relative scale of the normalised intensity (+-).
        corrected_weight: how much more often a point a person corrected is drawn than one
            they accepted as detected (stronger evidence of where the model errs).
        train_body: train the whole network; False trains the output heads only (few cases).
        freeze_batch_norm: keep the batch-norm statistics as they are (fine-tuning).
        validation_fraction: share of cases held out when no validation cases are given.
        validate_every: steps between validations (0: only at the end).
        seed: seeds the split and the crops.
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``.
        mixed_precision: bfloat16 autocast where the device computes bfloat16 natively (CPUs with
            AVX512-BF16 or AMX, bf16 GPUs); float32 elsewhere, where bfloat16 is emulated and slower.
        checkpoint_every: steps between checkpoints.
        time_budget_s: stop (successfully) after this many seconds.
        progress_every: steps between progress reports.
    """

    iterations: int = 6000
    batch_size: int | None = None
    learning_rate: float = 2e-3
    final_learning_rate_fraction: float = 0.02
    weight_decay: float = 1e-4
    offset_mm: float = 2.5
    far_offset_share: float = 0.2
    rotation_rad: float = 0.25
    scale: float = 0.15
    axis_scale: float = 0.05
    intensity_shift: float = 0.25
    intensity_scale: float = 0.25
    corrected_weight: float = 3.0
    train_body: bool = True
    freeze_batch_norm: bool = False
    validation_fraction: float = 0.1
    validate_every: int = 500
    seed: int = 0
    device: str = "auto"
    mixed_precision: bool = True
    checkpoint_every: int = 500
    time_budget_s: float | None = None
    progress_every: int = 10

    def __post_init__(self) -> None:
        if self.iterations < 1 or (self.batch_size is not None and self.batch_size < 1):
            msg = f"Refiner training needs at least one step and one crop per step, got {self.iterations} and {self.batch_size}"
            raise ValueError(msg)
        if not 0 <= self.far_offset_share <= 1:
            msg = f"far_offset_share must be in [0, 1], got {self.far_offset_share}"
            raise ValueError(msg)

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass
class RefinerTrainingResult:
    """What a finished local-stage training produced (see :class:`~SCNLandmarksLib.learning.training.TrainingResult`)."""

    model: LandmarkModel
    output: Path
    iterations: int
    history: list[dict[str, float | int | None]]
    best_validation_mre_mm: float | None
    seconds: float
    device: str


def attach_refiner(model: LandmarkModel, config: RefinerConfig | None = None, **settings: object) -> LandmarkModel:
    """``model`` with a freshly initialised local stage (``config``, or defaults updated by ``settings``)."""
    if config is None:
        config = RefinerConfig(dimension=model.dimension, num_landmarks=len(model.landmark_names), **settings)  # type: ignore[arg-type]
    if config.num_landmarks != len(model.landmark_names) or config.dimension != model.dimension:
        msg = (
            f"A {config.dimension}D refiner for {config.num_landmarks} landmarks does not fit a "
            f"{model.dimension}D model with {len(model.landmark_names)} landmarks"
        )
        raise ValueError(msg)
    model.refiner = build_refiner(config)
    return model


@dataclass
class _CropCase:
    name: str
    image: PreparedImage
    positions: np.ndarray  # (N, D) LPS mm, NaN where missing, model channel order
    placed: np.ndarray  # channel indices of placed landmarks
    odds: np.ndarray  # probability of drawing each placed landmark


def _crop_cases(cases: Sequence[TrainingCase], model: LandmarkModel, corrected_weight: float) -> list[_CropCase]:
    config = model.refiner.config  # type: ignore[union-attr]
    prepared = []
    for number, case in enumerate(cases):
        label = case.name or f"case {number + 1}"
        positions = aligned_positions(case, model.landmark_names)
        placed = np.flatnonzero(np.isfinite(positions).all(axis=1))
        if placed.size == 0:
            msg = f"{label} has no placed landmarks; it cannot teach the model anything"
            raise ValueError(msg)
        try:
            image = prepare_for_refiner(case.image, config, model.intensity)
        except ValueError as error:
            msg = f"{label}: {error}"
            raise ValueError(msg) from error
        corrected = case.landmarks.reordered(model.landmark_names).corrected
        weights = np.ones(placed.size)
        if corrected is not None:
            weights[corrected[placed]] = corrected_weight
        prepared.append(_CropCase(label, image, positions, placed, weights / weights.sum()))
    return prepared


def _draw_batch(
    cases: list[_CropCase], config: RefinerConfig, settings: RefinerTrainingConfig, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Crops ``(B, 1, ...)``, their landmark channels ``(B,)`` and the truth in crop index ``(B, D)``."""
    dim = config.dimension
    # Keep the truth well inside the crop so that its target is never cut off.
    limit = config.half_extent_mm - 4.0 * config.target_sigma_mm
    crops, channels, truths = [], [], []
    for _ in range(settings.batch_size):
        case = cases[int(rng.integers(len(cases)))]
        channel = int(rng.choice(case.placed, p=case.odds))
        if rng.random() < settings.far_offset_share:
            offset = rng.uniform(-0.8 * limit, 0.8 * limit, size=dim)
        else:
            offset = rng.normal(0.0, settings.offset_mm, size=dim)
        offset = np.clip(offset, -limit, limit)
        linear = random_linear(dim, rng, rotation_rad=settings.rotation_rad, scale=settings.scale,
                               axis_scale=settings.axis_scale)
        transform = crop_transform(case.image.base, case.positions[channel] + offset, config, linear=linear)
        shift = rng.uniform(-settings.intensity_shift, settings.intensity_shift)
        scale = 1.0 + rng.uniform(-settings.intensity_scale, settings.intensity_scale)
        crops.append(case.image.sample(transform, shift=shift, scale=scale))
        channels.append(channel)
        truths.append(transform.physical_to_grid(case.positions[channel][None])[0])
    return np.stack(crops)[:, None], np.asarray(channels), np.asarray(truths, dtype=np.float32)


def _trainable_parameters(network: RefinementNetwork, settings: RefinerTrainingConfig) -> list[dict[str, object]]:
    heads = network.head_parameter_names()
    decayed, undecayed = [], []
    for name, parameter in network.named_parameters():
        trainable = settings.train_body or name in heads
        parameter.requires_grad_(trainable)
        if trainable:
            is_conv_weight = name.endswith("weight") and parameter.ndim > 1
            (decayed if is_conv_weight else undecayed).append(parameter)
    return [
        {"params": decayed, "weight_decay": settings.weight_decay},
        {"params": undecayed, "weight_decay": 0.0},
    ]


def _set_mode(network: RefinementNetwork, *, training: bool, freeze_batch_norm: bool) -> None:
    network.train(training)
    if training and freeze_batch_norm:
        for module in network.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.eval()


def train_refiner(
    cases: Sequence[TrainingCase],
    model: LandmarkModel,
    *,
    output: str | Path,
    config: RefinerTrainingConfig | None = None,
    validation_cases: Sequence[TrainingCase] | None = None,
    checkpoint: str | Path | None = None,
    resume: bool = False,
    progress: ProgressCallback | None = None,
    should_cancel: Callable[[], bool] | None = None,
    overwrite: bool = False,
) -> RefinerTrainingResult:
    """Train the local stage of ``model`` (attach one first with :func:`attach_refiner`) and write the model.

    The global stage is not changed. Arguments, file safety, cancel and resume behave as in
    :func:`~SCNLandmarksLib.learning.training.train_model`; the best validation state is kept.

    Raises:
        TrainingCancelled: ``should_cancel`` returned True (nothing is written but the checkpoint).
        ValueError: the model has no local stage, or the cases are unusable.
        FileExistsError: ``output`` exists and ``overwrite`` is False.
    """
    settings = config or RefinerTrainingConfig()
    output = Path(output)
    refuse_to_start(output, cases, overwrite=overwrite, checkpoint=None if checkpoint is None else Path(checkpoint),
                    resume=resume)
    if model.refiner is None:
        msg = "This model has no refinement stage to train; attach one with attach_refiner(model) first"
        raise ValueError(msg)
    device = resolve_device(settings.device)
    torch.manual_seed(settings.seed)
    if validation_cases is None:
        training_cases, validation_cases = split_cases(list(cases), settings.validation_fraction, settings.seed)
    else:
        training_cases, validation_cases = list(cases), list(validation_cases)
    crop_cases = _crop_cases(training_cases, model, settings.corrected_weight)
    network = model.refiner
    refiner_config = network.config
    if settings.batch_size is None:
        settings = replace(settings, batch_size=min(DEFAULT_BATCH_SIZE, refiner_config.crops_at_once))
    model.to(device)
    model.network.eval()
    run = distributed_from_environment(device)
    run.broadcast_state(network)
    optimizer = torch.optim.AdamW(_trainable_parameters(network, settings), lr=settings.learning_rate)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(
        settings.iterations, warmup_fraction=0.03, final_fraction=settings.final_learning_rate_fraction))
    checkpoint = Path(checkpoint) if checkpoint is not None else None
    saved = resume_state(checkpoint, resume)
    if saved is not None and (saved.get("stage") != "refiner"
                              or saved.get("refiner_config") != json.dumps(refiner_config.to_dict())):
        msg = f"The checkpoint {checkpoint} belongs to another training (not this model's refinement stage)"
        raise ValueError(msg)
    resumed = restore(saved, {"network": network, "optimizer": optimizer, "scheduler": scheduler}, checkpoint)
    start_iteration, history, best_mre, best_state = resumed.iteration, resumed.history, resumed.best_mre, resumed.best_state
    if saved is not None:
        log.info("Resuming the refinement stage from %s at iteration %d", checkpoint, start_iteration)

    # The global stage is frozen: its estimates on the validation cases are computed once.
    global_detector = Detector(model, device=device, refine=False, readings=AS_IS)
    validation = []
    for case in validation_cases:
        estimates = global_detector.detect(case.image).positions
        truth = case.landmarks.reordered(model.landmark_names)
        validation.append((prepare_for_refiner(case.image, refiner_config, model.intensity), estimates, truth))

    def validate() -> float | None:
        nonlocal best_mre, best_state
        if not validation or not run.is_main:
            return None
        was_training = network.training
        network.eval()
        errors = []
        for prepared, estimates, truth in validation:
            refined = refine_positions(network, prepared, estimates, device=device).positions
            errors.append(point_errors(Landmarks(truth.names, refined), truth))
        _set_mode(network, training=was_training, freeze_batch_norm=settings.freeze_batch_norm)
        values = np.concatenate(errors)
        mre = float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")
        if best_mre is None or (np.isfinite(mre) and mre < best_mre):
            best_mre = mre
            best_state = {k: v.detach().cpu().clone() for k, v in network.state_dict().items()}
        return mre

    def checkpoint_state(iteration: int) -> dict[str, object]:
        return {
            "stage": "refiner",
            "refiner_config": json.dumps(refiner_config.to_dict()),
            "network": network.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "iteration": iteration,
            "history": json.dumps(history),
            "best_mre": best_mre,
            "best_state": best_state or {},
        }

    if start_iteration == 0 and validation:
        initial = validate()
        history.append({"iteration": 0, "loss": None, "validation_mre_mm": initial})
    _set_mode(network, training=True, freeze_batch_norm=settings.freeze_batch_norm)
    rng = np.random.default_rng([settings.seed, start_iteration] + ([run.seed_offset()] if run.active else []))
    loop = StepLoop("train refinement", settings.iterations, start_iteration, settings.time_budget_s,
                    settings.validate_every, settings.progress_every, settings.checkpoint_every, checkpoint,
                    progress, should_cancel, history, distributed=run)
    use_autocast = settings.mixed_precision and bfloat16_is_native(device)
    iteration = start_iteration
    while iteration < settings.iterations:
        loop.stop_if_cancelled(iteration, lambda: checkpoint_state(iteration))
        crops, channels, truths = _draw_batch(crop_cases, refiner_config, settings, rng)
        crops_t = torch.from_numpy(crops).to(device)
        targets = crop_target(torch.from_numpy(truths).to(device), refiner_config)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_autocast):
            member_logits = network.member_logits(crops_t)
        loss = refinement_loss(member_logits, torch.from_numpy(channels).to(device), targets)
        if not torch.isfinite(loss):
            msg = f"Training diverged at iteration {iteration} (the loss is not a number); lower the learning rate. No model file was written."
            raise FloatingPointError(msg)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        run.average_gradients(network.parameters())
        optimizer.step()
        scheduler.step()
        iteration += 1
        if loop.after_step(iteration, float(loss.detach()), validate, lambda: checkpoint_state(iteration)):
            break
    loop.finish(iteration, validate())
    if best_state is not None:
        network.load_state_dict(best_state)
    for parameter in network.parameters():
        parameter.requires_grad_(True)
    network.eval()
    seconds = loop.elapsed_s
    model.info = {**copy.deepcopy(model.info), "refiner_training": loop.record(
        iteration, cases=[c.name for c in crop_cases], validation_cases=[c.name for c in validation_cases],
        config=settings.to_dict(), best_mre=best_mre, seconds=seconds, device=describe_device(device))}
    loop.write(model, output, overwrite=overwrite)
    return RefinerTrainingResult(model, output, iteration, history, best_mre, seconds, describe_device(device))
