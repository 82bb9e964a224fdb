"""The bundled default model: listed, intact, loadable, and right on the bundled sample."""

import numpy as np

from SCNLandmarksLib.models.catalog import bundled_models_folder, default_model, read_catalog, verify_sha256
from SCNLandmarksLib.data.dataset import read_landmark_names
from SCNLandmarksLib.inference.detection import Detector
from SCNLandmarksLib.inference.evaluation import point_errors
from SCNLandmarksLib.imaging.image_io import read_image
from SCNLandmarksLib.data.landmark_io import read_landmark_csv
from SCNLandmarksLib.models.model_file import load_model

RESOURCES = bundled_models_folder().parent
SAMPLE = RESOURCES / "Sample" / "isbi2015_151.jpg"
NAMES = RESOURCES / "LandmarkSets" / "isbi2015_cephalometric.txt"


def test_default_model_matches_its_catalog_entry_and_landmark_set():
    path = default_model()
    assert path is not None and path.is_file()
    entry = next(e for e in read_catalog() if e.default)
    verify_sha256(path, entry.sha256)
    model = load_model(path)
    names, _ = read_landmark_names(NAMES)
    assert model.landmark_names == names and model.dimension == 2
    assert (RESOURCES / "Models" / "cephalometric_isbi2015.md").is_file()


def test_default_model_on_the_sample_against_the_senior_annotation(data_dir):
    names, _ = read_landmark_names(NAMES)
    truth = read_landmark_csv(data_dir / "isbi2015" / "landmarks" / "senior.csv", dimension=2, names=names)["151"]
    found = Detector(default_model(), device="cpu").detect(read_image(SAMPLE, spacing=(0.1, 0.1)))
    errors = point_errors(found, truth)
    # Measured 1.77 mm mean on this image against the senior doctor (1.01 mm against the mean of both
    # doctors, which the local stage learned); the card gives 1.63 mm against senior on all of test1.
    assert np.mean(errors) < 2.5, f"mean error {np.mean(errors):.2f} mm on the sample"
    assert found.confidences is not None and np.median(found.confidences) > 0.3


def test_default_model_flags_a_landmark_it_cannot_see():
    """The sample as it is, then with one landmark's surroundings hidden (filled with the median grey)."""
    import dataclasses

    image = read_image(SAMPLE, spacing=(0.1, 0.1))
    detector = Detector(default_model(), device="cpu")
    assert detector.check_threshold_mm is not None and detector.check_threshold_mm > 0.5
    found = detector.detect(image)
    assert found.expected_errors is not None and np.isfinite(found.expected_errors).all()
    assert found.check.mean() < 0.5  # a usual image: most points need no check
    rows, columns = np.mgrid[0 : image.array.shape[0], 0 : image.array.shape[1]]
    for name in ("upper_lip", "articulare"):
        row = found.names.index(name)
        x, y = image.geometry.physical_to_index(found.positions[row : row + 1])[0]
        hidden = image.array.copy()
        hidden[np.hypot(columns - x, rows - y) * 0.1 < 6.0] = np.median(hidden)  # 6 mm around the point
        again = detector.detect(dataclasses.replace(image, array=hidden))
        assert not found.check[row] and again.check[row], (
            f"{name}: expected error {found.expected_errors[row]:.2f} mm as it is, "
            f"{again.expected_errors[row]:.2f} mm hidden (threshold {detector.check_threshold_mm:.2f} mm)")
        assert again.expected_errors[row] > 1.5 * found.expected_errors[row]
