"""Model files: round trip, half precision, and every kind of bad file refused with its reason."""

import pickle
import zipfile

import numpy as np
import pytest
import torch

from engine_fixtures import tiny_model
from SCNLandmarksLib.common.errors import ModelFileError
from SCNLandmarksLib.models.model_file import load_model, read_model_description, save_model


class Innocent:
    """Stands for any Python object a hostile file could make torch.load construct."""

    def __reduce__(self):
        return (print, ("this would have run",))


@pytest.fixture
def saved(tmp_path):
    model = tiny_model(["Sella", "Nasion", "Menton"])
    model.landmark_descriptions = ["centre of sella turcica", "", "lowest point of the chin"]
    model.info["note"] = "unit test"
    path = save_model(model, tmp_path / "m.scn.pt")
    return model, path


def outputs(model, image):
    model.network.eval()
    with torch.no_grad():
        return model.network(image)


def test_round_trip_keeps_weights_landmarks_and_settings(saved):
    model, path = saved
    loaded = load_model(path)
    image = torch.randn(1, 1, 64, 64)
    torch.testing.assert_close(outputs(loaded, image), outputs(model, image))
    assert loaded.landmark_names == ["Sella", "Nasion", "Menton"]
    assert loaded.landmark_descriptions[2] == "lowest point of the chin"
    assert loaded.grid == model.grid and loaded.config == model.config
    assert loaded.info["note"] == "unit test"
    assert read_model_description(path)["network"]["filters"] == 16


def test_half_precision_file_is_smaller_and_close(saved, tmp_path):
    model, path = saved
    half = save_model(model, tmp_path / "half.scn.pt", half_precision=True)
    assert half.stat().st_size < 0.6 * path.stat().st_size
    image = torch.randn(1, 1, 64, 64)
    reference = outputs(model, image)
    np.testing.assert_allclose(outputs(load_model(half), image), reference, atol=1e-3 * float(reference.abs().max()) + 1e-9)


def test_saving_the_same_model_twice_gives_identical_bytes(saved, tmp_path):
    model, path = saved
    again = save_model(model, tmp_path / "again.scn.pt")
    assert again.read_bytes() == path.read_bytes()


def test_existing_model_is_never_overwritten_by_default(saved):
    model, path = saved
    before = path.read_bytes()
    with pytest.raises(FileExistsError):
        save_model(model, path)
    assert path.read_bytes() == before


def test_missing_truncated_foreign_and_unsafe_files_are_refused(saved, tmp_path):
    _, path = saved
    with pytest.raises(ModelFileError, match="not found"):
        load_model(tmp_path / "nope.scn.pt")
    truncated = tmp_path / "truncated.scn.pt"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ModelFileError, match="truncated|damaged"):
        load_model(truncated)
    text = tmp_path / "notes.scn.pt"
    text.write_text("hello")
    with pytest.raises(ModelFileError, match="not an SCNLandmarks model"):
        load_model(text)
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, foreign)
    with pytest.raises(ModelFileError, match="not an SCNLandmarks model"):
        load_model(foreign)
    hostile = tmp_path / "hostile.pt"
    torch.save({"format": "scn-landmarks-model", "payload": Innocent()}, hostile, pickle_protocol=pickle.HIGHEST_PROTOCOL)
    with pytest.raises(ModelFileError, match="could run code"):
        load_model(hostile)


def test_changed_weights_fail_the_checksum(saved, tmp_path):
    _, path = saved
    payload = torch.load(path, weights_only=True)
    name = next(iter(payload["state"]))
    payload["state"][name] = payload["state"][name] + 1.0
    tampered = tmp_path / "tampered.scn.pt"
    torch.save(payload, tampered)
    assert zipfile.is_zipfile(tampered)
    with pytest.raises(ModelFileError, match="checksum"):
        load_model(tampered)


def test_an_ensemble_global_stage_round_trips_and_a_single_network_is_described_as_before(saved, tmp_path):
    from SCNLandmarksLib.models.network import ensemble_of

    model, path = saved
    assert "members" not in read_model_description(path).network
    torch.manual_seed(3)
    pair = tiny_model(model.landmark_names)
    pair.network = ensemble_of([model.network, tiny_model(model.landmark_names).network])
    for member in pair.network.members:
        torch.nn.init.normal_(member.local.heatmap.weight, std=0.1)  # heatmaps far from zero
    loaded = load_model(save_model(pair, tmp_path / "pair.scn.pt", half_precision=True))
    assert loaded.config.members == 2 and read_model_description(tmp_path / "pair.scn.pt").network["members"] == 2
    for kept, member in zip(loaded.network.members, pair.network.members):
        for key, value in member.state_dict().items():
            torch.testing.assert_close(kept.state_dict()[key], value, atol=1e-3, rtol=1e-3)
    image = torch.randn(1, 1, 64, 64)
    expected = outputs(pair, image)
    assert expected.abs().max() > 1e-3
    torch.testing.assert_close(outputs(loaded, image), expected, atol=1e-2 * float(expected.abs().max()), rtol=2e-2)


def _rewritten(path, tmp_path, name, *, state=None, description=None):
    """The file at ``path`` with its weights or description changed and its checksums made to match:
    a file crafted to pass the checksums, which the content checks must still refuse."""
    import hashlib
    import json

    from SCNLandmarksLib.models.model_file import _weights_digest

    payload = torch.load(path, weights_only=True)
    if state is not None:
        payload["state"] = state(payload["state"])
        if all(t.untyped_storage().nbytes() >= t.numel() * t.element_size() for t in payload["state"].values()):
            payload["weights_sha256"] = _weights_digest(payload["state"])
    if description is not None:
        values = json.loads(payload["description"])
        description(values)
        payload["description"] = json.dumps(values)
        payload["description_sha256"] = hashlib.sha256(payload["description"].encode()).hexdigest()
    target = tmp_path / name
    torch.save(payload, target)
    return target


def test_files_crafted_to_pass_the_checksums_are_refused_for_what_they_hold(saved, tmp_path):
    _, path = saved

    def with_nan(state):
        name = next(n for n, t in state.items() if t.is_floating_point())
        state[name] = torch.full_like(state[name], float("nan"))
        return state

    with pytest.raises(ModelFileError, match="not finite numbers"):
        load_model(_rewritten(path, tmp_path, "nan.scn.pt", state=with_nan))

    def expanded(state):  # 4 bytes on disk that claim 4 GB
        state["network.extra"] = torch.zeros(1).expand(10**9)
        return state

    with pytest.raises(ModelFileError, match="does not hold the data its shape claims"):
        load_model(_rewritten(path, tmp_path, "bomb.scn.pt", state=expanded))

    def huge(values):  # a network of 10^5 filters would need hundreds of GB
        values["network"]["filters"] = 100000

    with pytest.raises(ModelFileError, match="weights do not fit the network it describes"):
        load_model(_rewritten(path, tmp_path, "huge.scn.pt", description=huge))
    with pytest.raises(ModelFileError, match="invalid description"):
        load_model(_rewritten(path, tmp_path, "zero.scn.pt", description=lambda v: v["network"].update(filters=0)))
    with pytest.raises(ModelFileError, match="invalid description"):
        load_model(_rewritten(path, tmp_path, "spacing.scn.pt", description=lambda v: v["grid"].update(spacing=[-1.0, 0.0])))
    with pytest.raises(ModelFileError, match="invalid description"):
        load_model(_rewritten(path, tmp_path, "gamma.scn.pt", description=lambda v: v["targets"].update(gamma=float("nan"))))


def test_a_damaged_start_an_extra_pickle_or_a_pipe_are_named_for_what_they_are(saved, tmp_path):
    import os
    import shutil
    import sys

    _, path = saved
    changed = tmp_path / "first_byte.scn.pt"
    changed.write_bytes(b"Q" + path.read_bytes()[1:])
    with pytest.raises(ModelFileError, match="does not begin as a PyTorch archive"):
        load_model(changed)
    doubled = tmp_path / "doubled.scn.pt"
    shutil.copy(path, doubled)
    with zipfile.ZipFile(doubled, "a") as archive:
        archive.writestr("other/data.pkl", pickle.dumps({"format": "scn-landmarks-model"}))
    with pytest.raises(ModelFileError, match="zip archive but not a PyTorch model file"):
        load_model(doubled)  # as the header reader (scn-landmarks info) refuses it
    with pytest.raises(ModelFileError, match="zip archive but not a PyTorch model file"):
        read_model_description(doubled)
    if sys.platform != "win32":
        pipe = tmp_path / "pipe.scn.pt"
        os.mkfifo(pipe)
        with pytest.raises(ModelFileError, match="not a regular file"):
            load_model(pipe)


def test_unnamed_or_repeated_landmarks_and_an_odd_format_number_are_refused(saved, tmp_path):
    _, path = saved
    for names in (["Sella", "Sella", "Menton"], ["Sella", "", "Menton"], ["Sella", None, "Menton"]):
        def rename(values, new=names):
            for entry, name in zip(values["landmarks"], new):
                entry["name"] = name

        crafted = _rewritten(path, tmp_path, "names.scn.pt", description=rename)
        with pytest.raises(ModelFileError, match="names must be distinct and not empty"):
            load_model(crafted)
    payload = torch.load(path, weights_only=True)
    for version in (True, -5, "2"):
        payload["format_version"] = version
        torch.save(payload, tmp_path / "odd.scn.pt")
        with pytest.raises(ModelFileError, match="format number .* is not one SCNLandmarks ever wrote"):
            load_model(tmp_path / "odd.scn.pt")


def test_a_folder_or_a_broken_link_given_as_the_model_is_named_for_what_it_is(tmp_path):
    import os

    from SCNLandmarksLib.models.catalog import find_model

    (tmp_path / "models").mkdir()
    with pytest.raises(FileNotFoundError, match="is a folder, not a model file"):
        find_model(str(tmp_path / "models"), user_folder=tmp_path / "user", bundled_folder=tmp_path / "bundled")
    os.symlink(tmp_path / "gone.scn.pt", tmp_path / "link.scn.pt")
    with pytest.raises(FileNotFoundError, match="link to a file that does not exist"):
        find_model(str(tmp_path / "link.scn.pt"), user_folder=tmp_path / "user", bundled_folder=tmp_path / "bundled")
