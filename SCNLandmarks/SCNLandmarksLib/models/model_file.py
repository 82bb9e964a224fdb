"""Model files: safe to load, checked, written atomically.

A model file (``*.scn.pt``) is a PyTorch zip archive holding only plain data: a format tag,
a JSON description (network settings, input grid, intensity mapping, landmark names and
definitions, the local refinement stage when there is one, provenance) and a dictionary of
tensors. Format 2 added the optional refinement stage; format-1 files (global stage only)
still load and detect. It is read with
``torch.load(weights_only=True)``, which refuses to execute pickled code, and the weights
are checked against a SHA-256 stored at save time.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from pathlib import Path

import torch

from ..common.atomic import atomic_write_bytes
from ..common.errors import ModelFileError
from ..imaging.grid import GridSpec
from .heatmaps import HeatmapTargets
from ..imaging.intensity import IntensityConfig
from .model import LandmarkModel
from .model_header import (
    FORMAT_TAG,
    FORMAT_VERSION,
    MODEL_SUFFIX,
    ModelDescription,
    check_archive,
    check_description,
    check_format,
    read_header,
)
from .network import NetworkConfig, build_network
from .quality import ErrorModel
from .refinement import RefinerConfig, build_refiner
from .shape_model import ShapeModel

__all__ = ["FORMAT_TAG", "MODEL_SUFFIX", "ModelDescription", "load_model", "read_model_description", "save_model"]



def _check_tensors(path: Path, state: dict[str, torch.Tensor]) -> None:
    """Refuse tensors that claim more data than they hold (a few bytes expanded to gigabytes) or
    that are not finite numbers (a model that would place every point nowhere)."""
    for name, tensor in state.items():
        if tensor.untyped_storage().nbytes() < tensor.numel() * tensor.element_size() or not tensor.is_contiguous():
            msg = f"{path} is damaged: its tensor {name} does not hold the data its shape claims"
            raise ModelFileError(msg)
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            msg = f"{path} is damaged: its weights {name} hold values that are not finite numbers (NaN or infinite)"
            raise ModelFileError(msg)


def _check_shapes(path: Path, config: NetworkConfig, refiner_config: RefinerConfig | None,
                  state: dict[str, torch.Tensor]) -> None:
    """Compare the networks the description makes with the weights, before memory is given to them.

    The networks are built on PyTorch's ``meta`` device (shapes, no data), so a description that
    declares a huge network is refused instead of allocated.
    """
    try:
        with torch.device("meta"):
            parts = [("network.", build_network(config))]
            if refiner_config is not None:
                parts.append(("refiner.", build_refiner(refiner_config)))
    except (IndexError, ValueError, RuntimeError, TypeError) as error:
        msg = f"{path} has an invalid description: its network cannot be built ({error})"
        raise ModelFileError(msg) from error
    for prefix, module in parts:
        for name, tensor in module.state_dict().items():
            stored = state.get(prefix + name)
            if stored is None or tuple(stored.shape) != tuple(tensor.shape):
                msg = f"{path} is damaged: its weights do not fit the network it describes ({prefix + name})"
                raise ModelFileError(msg)


def _weights_digest(state: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def describe(model: LandmarkModel, *, half_precision: bool = False) -> ModelDescription:
    """The description a model file holds for ``model``."""
    return ModelDescription(
        network=model.config.to_dict(),
        grid_size=tuple(model.grid.size),
        grid_spacing=None if model.grid.spacing is None else tuple(model.grid.spacing),
        intensity=model.intensity.to_dict(),
        landmark_names=tuple(model.landmark_names),
        landmark_definitions=tuple(model.landmark_descriptions),
        gamma=float(model.targets.gamma),
        sigma_weight=float(model.sigma_weight),
        half_precision=half_precision,
        refiner=None if model.refiner is None else model.refiner.config.to_dict(),
        shape_model=None if model.shape_model is None else model.shape_model.to_dict(),
        error_model=None if model.error_model is None else model.error_model.to_dict(),
        info=dict(model.info),
    )


def format_version_for(model: LandmarkModel) -> int:
    """The oldest file format that holds everything ``model`` has (an older reader refuses newer ones)."""
    squared = model.error_model is not None and model.error_model.squared_weights is not None
    return FORMAT_VERSION if squared else 2


def save_model(model: LandmarkModel, path: str | Path, *, overwrite: bool = False, half_precision: bool = False) -> Path:
    """Write ``model`` to ``path`` atomically (a reader never sees a half-written file).

    Args:
        model: the model to save.
        path: destination, conventionally ending in ``.scn.pt``.
        overwrite: replace an existing file; by default an existing file is an error,
            so a user's model is never replaced by accident.
        half_precision: store weights as float16 (half the size; loaded back as float32).
    """
    path = Path(path)
    state: dict[str, torch.Tensor] = {}
    modules = [("network.", model.network), ("targets.", model.targets)]
    if model.refiner is not None:
        modules.append(("refiner.", model.refiner))
    for prefix, module in modules:
        for name, tensor in module.state_dict().items():
            tensor = tensor.detach().cpu()
            # Batch-norm statistics stay float32: their variances can underflow in half precision.
            keep = name.endswith(("sigmas", "running_mean", "running_var"))
            if half_precision and tensor.is_floating_point() and not keep:
                tensor = tensor.half()
            state[prefix + name] = tensor.clone()
    description = json.dumps(describe(model, half_precision=half_precision).to_dict())
    payload = {
        "format": FORMAT_TAG,
        "format_version": format_version_for(model),
        "description": description,
        "description_sha256": hashlib.sha256(description.encode()).hexdigest(),
        "weights_sha256": _weights_digest(state),
        "state": state,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    # Serialised in memory: torch names the archive's inner folder after the file it writes
    # to, so saving straight to a random temporary name would make identical models differ.
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return atomic_write_bytes(path, buffer.getvalue(), overwrite=overwrite)


def _read_payload(path: Path) -> dict[str, object]:
    check_archive(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for damaged or unsafe files
        text = str(error)
        if "weights_only" in text or "Unsupported global" in text or "Unpickler" in text:
            msg = f"{path} contains Python objects, not only weights; it is refused because loading it could run code"
        else:
            msg = f"{path} could not be read as a model file; it is damaged or truncated ({type(error).__name__})"
        raise ModelFileError(msg) from error
    return check_format(path, payload)


def read_model_description(path: str | Path) -> ModelDescription:
    """The description of a model file (landmarks, grid, provenance) without building the network.

    Read without torch (see :mod:`.model_header`) and checked against its SHA-256 (files written
    before it had one are read as they are).
    """
    return read_header(path)


def load_model(path: str | Path, *, device: torch.device | str = "cpu") -> LandmarkModel:
    """Load and check a model file.

    Raises:
        ModelFileError: missing, truncated, foreign, unsafe or damaged file, each with its reason.
    """
    path = Path(path)
    payload = _read_payload(path)
    state = payload.get("state")
    if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
        msg = f"{path} has no weights block"
        raise ModelFileError(msg)
    _check_tensors(path, state)
    if payload.get("weights_sha256") != _weights_digest(state):
        msg = f"{path} is damaged: its weights do not match the checksum written when it was saved"
        raise ModelFileError(msg)
    values = check_description(path, str(payload.get("description", "")), payload.get("description_sha256"))
    description = ModelDescription.from_dict(values, source=path)
    if not all(math.isfinite(value) for value in (description.gamma, description.sigma_weight)):
        msg = f"{path} has an invalid description: its heatmap settings are not finite numbers"
        raise ModelFileError(msg)
    try:
        config = NetworkConfig.from_dict(description.network)
        grid = GridSpec(size=description.grid_size, spacing=description.grid_spacing)
        intensity = IntensityConfig(**description.intensity)
        names, descriptions = list(description.landmark_names), list(description.landmark_definitions)
        refiner_config = None if description.refiner is None else RefinerConfig.from_dict(description.refiner)
        shape_model = None if description.shape_model is None else ShapeModel.from_dict(description.shape_model)
        error_model = None if description.error_model is None else ErrorModel.from_dict(description.error_model)
    except (KeyError, TypeError, ValueError) as error:
        msg = f"{path} has an incomplete or invalid description ({error})"
        raise ModelFileError(msg) from error
    _check_shapes(path, config, refiner_config, state)
    network = build_network(config)
    refiner = None if refiner_config is None else build_refiner(refiner_config)
    targets = HeatmapTargets(config.num_landmarks, config.dimension, initial_sigma=1.0, gamma=description.gamma)
    try:
        network.load_state_dict(
            {k[len("network.") :]: v.float() for k, v in state.items() if k.startswith("network.")}, strict=True
        )
        targets.load_state_dict({k[len("targets.") :]: v.float() for k, v in state.items() if k.startswith("targets.")}, strict=True)
        refiner_state = {k[len("refiner.") :]: v for k, v in state.items() if k.startswith("refiner.")}
        if refiner is not None:
            floats = {k: v.float() if v.is_floating_point() else v for k, v in refiner_state.items()}
            refiner.load_state_dict(floats, strict=True)
        elif refiner_state:
            msg = f"{path} is damaged: it holds refinement weights but describes no refinement stage"
            raise ModelFileError(msg)
    except RuntimeError as error:
        msg = f"{path} is damaged: its weights do not fit the network it describes"
        raise ModelFileError(msg) from error
    if len(names) != config.num_landmarks:
        msg = f"{path} names {len(names)} landmarks for a network with {config.num_landmarks} outputs"
        raise ModelFileError(msg)
    if refiner_config is not None and refiner_config.num_landmarks != config.num_landmarks:
        msg = f"{path} has a refinement stage for {refiner_config.num_landmarks} landmarks but {config.num_landmarks} landmarks"
        raise ModelFileError(msg)
    network.eval()
    if refiner is not None:
        refiner.eval()
    model = LandmarkModel(
        network=network,
        targets=targets,
        grid=grid,
        intensity=intensity,
        landmark_names=names,
        landmark_descriptions=descriptions,
        sigma_weight=description.sigma_weight,
        info=dict(description.info),
        refiner=refiner,
        shape_model=shape_model,
        error_model=error_model,
    )
    for part, count in (("shape model", None if shape_model is None else shape_model.num_landmarks),
                        ("error model", None if error_model is None else error_model.landmark_offsets.size)):
        if count is not None and count != len(names):
            msg = f"{path} has a {part} for {count} landmarks but {len(names)} landmarks"
            raise ModelFileError(msg)
    return model.to(torch.device(device) if isinstance(device, str) else device)
