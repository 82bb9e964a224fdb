"""Smoke tests on the real data where it is available (SCN_DATA_DIR or ../shared/data).

A short CPU training on the one AFIDs MR volume, with augmentation, must find that
volume's own 32 landmarks within a few millimetres. This does not measure accuracy on
unseen subjects (one volume cannot); it checks that reading NIfTI + RAS .fcsv, 3D
sampling, training and detection agree in physical space on real anatomy.
"""

import os

import numpy as np
import pytest
import torch

from engine_fixtures import tiny_config
from SCNLandmarksLib.inference.detection import Detector
from SCNLandmarksLib.inference.evaluation import point_errors
from SCNLandmarksLib.imaging.grid import GridSpec
from SCNLandmarksLib.imaging.image_io import read_image
from SCNLandmarksLib.data.landmark_io import read_landmarks
from SCNLandmarksLib.models.model import create_model
from SCNLandmarksLib.learning.training import TrainingConfig, train_model
from SCNLandmarksLib.data.training_case import TrainingCase

ITERATIONS = int(os.environ.get("SCN_SMOKE_ITERATIONS", "300"))


@pytest.mark.realdata
@pytest.mark.slow
def test_short_cpu_training_on_afids_volume_finds_its_landmarks(data_dir, tmp_path):
    folder = data_dir / "afids_mni"
    if not folder.is_dir():
        pytest.skip(f"{folder} is absent")
    torch.manual_seed(0)
    image = read_image(folder / "T1w.nii.gz")
    truth = read_landmarks(folder / "groundtruth.fcsv")
    assert len(truth) == 32 and image.dimension == 3
    # 24 filters, not 16: PyTorch's CPU heuristic sends batch-1 3D convs with N*C*D*H <= 20480
    # to its slow im2col path (10x slower here); 24 x 32 x 32 takes the oneDNN path.
    config = tiny_config(len(truth), dimension=3, filters=24, spatial_downsample=4, spatial_kernel=3,
                         heatmap_init_std=1e-3)
    model = create_model(config, grid=GridSpec(size=(32, 32, 32), spacing=(6.0, 6.0, 6.0)),
                         landmark_names=truth.names, landmark_descriptions=truth.descriptions, initial_sigma=1.5)
    result = train_model([TrainingCase(image, truth, "MNI152NLin2009cAsym")], model, output=tmp_path / "afids.scn.pt",
                         config=TrainingConfig(iterations=ITERATIONS, learning_rate=2e-3, device="cpu",
                                               validation_fraction=0.0, progress_every=50))
    errors = point_errors(Detector(result.output, device="cpu").detect(image), truth)
    mre = float(np.nanmean(errors))
    print(f"AFIDs smoke: {ITERATIONS} iterations in {result.seconds:.0f} s, MRE {mre:.2f} mm, "
          f"median {np.nanmedian(errors):.2f} mm, max {np.nanmax(errors):.2f} mm (6 mm network voxels)")
    assert mre < 6.0, f"mean error {mre:.2f} mm on the training volume itself"
