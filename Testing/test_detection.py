"""Detection: bad input is explained; large 3D volumes are tiled; results are in LPS with confidences."""

import numpy as np
import pytest

from engine_fixtures import as_single_slice, tiny_model
from SCNLandmarksLib.inference.detection import Detector, _tile_starts
from SCNLandmarksLib.imaging.geometry import ImageGeometry
from SCNLandmarksLib.imaging.grid import GridSpec
from SCNLandmarksLib.imaging.image import Image
from SCNLandmarksLib.data.synthetic import make_synthetic_case


def image_2d(array: np.ndarray) -> Image:
    geometry = ImageGeometry(size=array.shape[::-1], spacing=(1.0, 1.0), origin=(0.0, 0.0), direction=(1.0, 0.0, 0.0, 1.0))
    return Image(array, geometry)


@pytest.fixture(scope="module")
def detector_2d():
    return Detector(tiny_model(["A", "B"]), device="cpu")


def test_bad_images_are_explained(detector_2d):
    volume, _ = make_synthetic_case(dimension=3, size=16, num_landmarks=2)
    with pytest.raises(ValueError, match="expects a 2D image but this image is 3D"):
        detector_2d.detect(volume)
    with pytest.raises(ValueError, match="same intensity"):
        detector_2d.detect(image_2d(np.full((40, 40), 7.0)))
    noisy = np.random.default_rng(0).normal(size=(40, 40))
    noisy[3, 4] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        detector_2d.detect(image_2d(noisy))
    with pytest.raises(ValueError, match="cuda|GPU"):
        Detector(tiny_model(["A"]), device="cuda") if not __import__("torch").cuda.is_available() else (_ for _ in ()).throw(ValueError("GPU"))


def test_a_gpu_torch_cannot_compute_on_is_left_for_the_cpu_or_named(monkeypatch, caplog):
    """A GPU that torch sees but has no kernels for (a newer GPU than the build, an old driver): "auto"
    uses the CPU and says why; asking for the GPU gives one clear sentence, not a failure deep in a run."""
    import torch

    from SCNLandmarksLib.common import device

    if torch.cuda.is_available() and device.cuda_problem() is None:
        pytest.skip("this machine computes on its GPU")
    # As on such a machine: torch reports a GPU, and the first computation there fails.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(device, "_CUDA_PROBLEMS", {})
    with caplog.at_level("WARNING"):
        assert Detector(tiny_model(["A"]), device="auto").device == torch.device("cpu")
    assert "torch cannot compute on it" in caplog.text and "using the CPU" in caplog.text
    with pytest.raises(ValueError, match="GPU is present but torch cannot compute on it .*choose device 'cpu'"):
        Detector(tiny_model(["A"]), device="cuda")
    with pytest.raises(ValueError, match="torch cannot compute on it"):
        Detector(tiny_model(["A"]), device="cuda:1")  # the GPU asked for is the one checked
    assert set(device._CUDA_PROBLEMS) == {"cuda", "cuda:1"}  # checked once per GPU


def test_a_full_gpu_is_checked_again_and_named_as_full(monkeypatch):
    import torch

    from SCNLandmarksLib.common import device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(device, "_CUDA_PROBLEMS", {})
    calls = []

    def full(*args, **kwargs):  # noqa: ANN002, ANN003
        calls.append(1)
        raise RuntimeError("CUDA error: out of memory\nmore lines")

    monkeypatch.setattr(torch, "ones", full)
    with pytest.raises(ValueError, match=r"full or busy now \(CUDA error: out of memory\); try again later"):
        device.resolve_device("cuda")
    assert device.resolve_device("auto") == torch.device("cpu") and len(calls) == 2  # not remembered


def test_heatmaps_that_do_not_fit_in_memory_are_refused_with_the_sizes(detector_2d, monkeypatch):
    from SCNLandmarksLib.inference import detection

    image, _ = make_synthetic_case(dimension=2, size=48, num_landmarks=2)
    detector_2d.detect(image)  # fits
    monkeypatch.setattr(detection, "memory_available_bytes", lambda: 1000)  # 1 kB free
    with pytest.raises(MemoryError, match=r"2 heatmaps of \d+ x \d+ voxels need about .* GB, 0.0 GB are free"):
        detector_2d.detect(image)


def test_a_single_slice_is_refused_by_a_3d_model():
    """A radiograph (a volume of one slice in Slicer) given to a model of volumes: said, not detected on."""
    slab = as_single_slice(make_synthetic_case(dimension=2, size=48, num_landmarks=2)[0])
    with pytest.raises(ValueError, match="expects a 3D volume but this image is a single slice.*choose a model for 2D"):
        Detector(tiny_model(["A", "B"], dimension=3, grid=GridSpec(size=(16, 16, 16))), device="cpu").detect(slab)


def test_single_slice_volume_is_accepted_by_a_2d_model(detector_2d):
    image, _ = make_synthetic_case(dimension=2, size=48, num_landmarks=2)
    volume = as_single_slice(image, thickness_mm=3.0, z_mm=5.0)
    flat = detector_2d.detect(image)
    from_volume = detector_2d.detect(volume)
    np.testing.assert_allclose(from_volume.positions, flat.positions, atol=1e-6)
    assert flat.confidences is not None and ((flat.confidences >= 0) & (flat.confidences <= 1)).all()


def test_tiles_overlap_and_cover_the_volume():
    assert _tile_starts(64, 64) == [0]
    starts = _tile_starts(100, 32)
    assert starts[0] == 0 and starts[-1] == 68
    assert all(b - a <= 16 for a, b in zip(starts, starts[1:]))


def test_large_3d_volume_is_processed_in_tiles_on_the_full_grid():
    model = tiny_model(["A", "B"], dimension=3, grid=GridSpec(size=(16, 16, 16), spacing=(2.0, 2.0, 2.0)))
    volume, _ = make_synthetic_case(dimension=3, size=(40, 30, 24), spacing=(1.5, 1.2, 2.5), origin=(-20.0, 5.0, 40.0),
                                    direction=(0.2, 0.1, -0.3), num_landmarks=2)
    detector = Detector(model, device="cpu")
    heatmaps, grid = detector.heatmaps(volume)
    # The detection grid covers the whole volume at the model's spacing (more than one tile).
    assert heatmaps.shape[0] == 2 and max(grid.size) > 16
    assert all(s % model.config.size_divisor == 0 for s in grid.size)
    assert np.isfinite(heatmaps).all()
    result = detector.detect(volume)
    assert result.positions.shape == (2, 3) and np.isfinite(result.positions).all()



def test_a_thin_slab_is_padded_to_the_training_field_of_view_of_a_fixed_spacing_model():
    """A 12-slice slab at 2 mm gives 6 grid voxels along z, fewer than reflect padding allows."""
    model = tiny_model(["A", "B"], dimension=3, grid=GridSpec(size=(32, 32, 32), spacing=(2.0, 2.0, 2.0)),
                       padding_mode="reflect")
    slab, _ = make_synthetic_case(dimension=3, size=(40, 36, 12), spacing=(1.5, 1.5, 1.0), origin=(-20.0, 5.0, 40.0),
                                  direction=(0.2, 0.1, -0.3), num_landmarks=2)
    detector = Detector(model, device="cpu")
    heatmaps, grid = detector.heatmaps(slab)
    assert min(grid.size) >= 32 and heatmaps.shape[1:] == tuple(grid.size)[::-1]
    assert np.isfinite(detector.detect(slab).positions).all()


@pytest.mark.parametrize("requested", [True, False, None])
def test_bfloat16_runs_both_stages_in_bfloat16_and_defaults_to_what_the_hardware_does(requested, monkeypatch):
    import torch

    from SCNLandmarksLib.inference import detection
    from SCNLandmarksLib.learning.refinement_training import attach_refiner

    monkeypatch.setattr(detection, "bfloat16_is_native", lambda device: True)
    model = attach_refiner(tiny_model(["A", "B"]), patch_size=16, spacing_mm=1.0, filters=(4, 8), target_sigma_mm=1.0)
    seen: dict[str, set] = {"global": set(), "local": set()}
    first_conv = lambda module: next(m for m in module.modules() if isinstance(m, torch.nn.Conv2d))  # noqa: E731
    first_conv(model.network).register_forward_hook(lambda m, i, output: seen["global"].add(output.dtype))
    first_conv(model.refiner).register_forward_hook(lambda m, i, output: seen["local"].add(output.dtype))
    image, _ = make_synthetic_case(dimension=2, size=48, num_landmarks=2)
    landmarks = Detector(model, device="cpu", bfloat16=requested, readings=detection.AS_IS).detect(image)
    expected = torch.float32 if requested is False else torch.bfloat16  # None: the (patched) hardware says yes
    assert seen == {"global": {expected}, "local": {expected}}
    assert np.isfinite(landmarks.positions).all()
