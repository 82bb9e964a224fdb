"""The SCN and U-Net networks: shapes, parameter counts, fixed upsampling, errors."""

import pytest
import torch

from SCNLandmarksLib.models.network import FixedUpsample, NetworkConfig, build_network, count_parameters


def test_paper_configurations_have_the_expected_size():
    # Counted by hand from the MIA-2019 layout: stem + 4 x (2 convs + parallel) + heads + SC.
    assert count_parameters(build_network(NetworkConfig.paper_2d(19))) == 6_348_070
    assert count_parameters(build_network(NetworkConfig.paper_3d(32))) == 5_600_000
    unet = build_network(NetworkConfig.paper_2d(19, architecture="unet"))
    assert unet.spatial is None and count_parameters(unet) == 1_794_195


@pytest.mark.parametrize("dimension", [2, 3])
def test_output_is_local_times_spatial_on_the_input_grid(dimension):
    config = NetworkConfig(dimension=dimension, num_landmarks=3, filters=8, levels=3, spatial_downsample=4,
                           spatial_kernel=3, heatmap_init_std=0.1)
    network = build_network(config).eval()
    image = torch.randn(2, 1, *([16] * dimension))
    with torch.no_grad():
        output = network(image)
        expected = network.local(image) * network.spatial(network.local(image))
    assert output.shape == (2, 3, *([16] * dimension))
    torch.testing.assert_close(output, expected)


def test_heatmap_layers_start_near_zero():
    network = build_network(NetworkConfig.paper_2d(5, filters=16)).eval()
    with torch.no_grad():
        output = network(torch.randn(1, 1, 64, 64))
    assert output.abs().max() < 1e-4


@pytest.mark.parametrize("factor", [2, 4, 8, 16])
def test_fixed_cubic_upsampling_reproduces_constants_inside_and_centres_samples(factor):
    upsample = FixedUpsample(factor, kernel="cubic", dimension=2)
    ones = torch.ones(1, 1, 6, 6)
    out = upsample(ones)
    assert out.shape == (1, 1, 6 * factor, 6 * factor)
    inner = out[0, 0, 2 * factor : 4 * factor, 2 * factor : 4 * factor]
    torch.testing.assert_close(inner, torch.ones_like(inner))
    # A single impulse at input i lands centred on output i*f + (f-1)/2 (align_corners=False).
    impulse = torch.zeros(1, 1, 1, 5)
    impulse[..., 2] = 1.0
    row = FixedUpsample(factor, kernel="linear", dimension=2)(impulse.expand(1, 1, 5, 5))[0, 0, 2 * factor]
    centre = 2 * factor + (factor - 1) / 2
    weights = row / row.sum()
    mean = float((weights * torch.arange(row.numel())).sum())
    assert mean == pytest.approx(centre, abs=1e-4)


@pytest.mark.parametrize(("factor", "kernel", "dimension"), [(16, "cubic", 2), (3, "linear", 2), (4, "cubic", 3)])
def test_fixed_upsampling_equals_its_transposed_convolution(factor, kernel, dimension):
    upsample = FixedUpsample(factor, kernel=kernel, dimension=dimension)
    x = torch.randn(2, 3, *([5, 4, 6][:dimension]), dtype=torch.float64)
    expected = x
    for axis in range(2, 2 + dimension):  # the transposed convolution, one axis at a time
        moved = expected.movedim(axis, -1)
        flat = torch.nn.functional.conv_transpose1d(moved.reshape(-1, 1, moved.shape[-1]), upsample.weights.double(),
                                                    stride=factor)[..., upsample.crop : upsample.crop + moved.shape[-1] * factor]
        expected = flat.reshape(*moved.shape[:-1], -1).movedim(-1, axis)
    torch.testing.assert_close(upsample(x), expected)


def test_wrong_input_shapes_are_explained():
    network = build_network(NetworkConfig(dimension=2, num_landmarks=2, filters=4, levels=2, spatial_downsample=4, spatial_kernel=3))
    with pytest.raises(ValueError, match="one-channel 2D"):
        network(torch.zeros(1, 3, 16, 16))
    with pytest.raises(ValueError, match="multiple of 4"):
        network(torch.zeros(1, 1, 18, 16))
    with pytest.raises(ValueError, match="architecture"):
        NetworkConfig(dimension=2, num_landmarks=2, architecture="resnet")


def test_the_smallest_input_is_known_and_a_smaller_one_is_explained():
    # Reflect padding (3D) needs the coarsest grids wider than the padding: 32 // 8 = 4 > 7 // 2.
    assert NetworkConfig.paper_3d(2).minimum_size == 32
    assert NetworkConfig.paper_2d(2).minimum_size == NetworkConfig.paper_2d(2).size_divisor == 16  # zero padding
    assert NetworkConfig.paper_3d(2, padding_mode="replicate").minimum_size == 8  # replicate pads any size
    network = build_network(NetworkConfig.paper_3d(2, filters=4))
    with torch.no_grad():
        assert network(torch.zeros(1, 1, 32, 32, 32)).shape == (1, 2, 32, 32, 32)
        with pytest.raises(ValueError, match=r"\(16, 32, 32\) is too small: every axis needs at least 32 voxels"):
            network(torch.zeros(1, 1, 16, 32, 32))


def test_a_model_grid_too_small_for_its_network_is_refused_in_words():
    from SCNLandmarksLib.imaging.grid import GridSpec
    from SCNLandmarksLib.models.model import create_model

    with pytest.raises(ValueError, match=r"\(64, 64, 16\) is too small .* at least 32 voxels .*reflect padding"):
        create_model(NetworkConfig.paper_3d(2, filters=4), grid=GridSpec(size=(64, 64, 16)), landmark_names=["A", "B"])


def test_an_ensemble_reads_its_members_as_one_network():
    from SCNLandmarksLib.models.network import NetworkEnsemble, ensemble_of

    config = NetworkConfig.paper_2d(3, filters=8, levels=3, spatial_downsample=4, spatial_kernel=3)
    torch.manual_seed(0)
    first, second = build_network(config), build_network(config)
    for network in (first, second):
        torch.nn.init.normal_(network.local.heatmap.weight, std=0.1)  # heatmaps far from zero
    ensemble = ensemble_of([first, second]).eval()
    assert isinstance(ensemble, NetworkEnsemble) and ensemble.config.members == 2
    image = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        expected = (first.eval()(image) + second.eval()(image)) / 2
        torch.testing.assert_close(ensemble(image), expected)
    assert "members.1.local.heatmap.weight" in ensemble.head_parameter_names()
    assert isinstance(ensemble_of([first]), type(first))  # one network stays one
    assert "members" not in config.to_dict()  # single networks are described as before ensembles
    assert NetworkConfig.from_dict(ensemble.config.to_dict()).members == 2


def test_ensembles_of_unlike_networks_are_refused():
    from SCNLandmarksLib.models.network import ensemble_of

    config = NetworkConfig.paper_2d(3, filters=8, levels=3, spatial_downsample=4, spatial_kernel=3)
    wider = NetworkConfig.paper_2d(3, filters=16, levels=3, spatial_downsample=4, spatial_kernel=3)
    with pytest.raises(ValueError, match="share one configuration"):
        ensemble_of([build_network(config), build_network(wider)])
    with pytest.raises(ValueError, match="at least one"):
        ensemble_of([])
    with pytest.raises(ValueError, match="at least one network"):
        NetworkConfig.paper_2d(3, members=0)
