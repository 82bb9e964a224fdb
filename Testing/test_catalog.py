"""Model catalog: listing bundled and user models, versions, checksums and fetching."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from SCNLandmarksLib.models import catalog
from SCNLandmarksLib.common.errors import ModelFileError
from SCNLandmarksLib.imaging.grid import GridSpec
from SCNLandmarksLib.models.model import create_model
from SCNLandmarksLib.models.model_file import load_model, save_model
from SCNLandmarksLib.models.network import NetworkConfig


def _tiny(names=("A", "B", "C"), dimension=2):
    config = NetworkConfig(dimension=dimension, num_landmarks=len(names), filters=8, levels=2,
                           spatial_downsample=4, spatial_kernel=3)
    return create_model(config, grid=GridSpec(size=(32,) * dimension), landmark_names=list(names))


@pytest.fixture(scope="module")
def model_bytes(tmp_path_factory) -> bytes:
    path = save_model(_tiny(), tmp_path_factory.mktemp("m") / "tiny.scn.pt")
    return path.read_bytes()


@pytest.fixture
def folders(tmp_path, monkeypatch, model_bytes):
    bundled, user = tmp_path / "bundled", tmp_path / "user"
    bundled.mkdir()
    user.mkdir()
    (bundled / "ceph.scn.pt").write_bytes(model_bytes)
    (bundled / "extra.scn.pt").write_bytes(model_bytes)
    digest = hashlib.sha256(model_bytes).hexdigest()
    (bundled / "models.json").write_text(json.dumps({"models": [
        {"name": "Remote model", "file": "remote.scn.pt", "sha256": "0" * 64, "url": "https://example.org/remote.scn.pt"},
        {"name": "Cephalometric", "file": "ceph.scn.pt", "sha256": digest, "default": True, "description": "2D ceph"},
    ]}))
    (user / "mine-ft001.scn.pt").write_bytes(model_bytes)
    (user / "broken.scn.pt").write_bytes(model_bytes[: len(model_bytes) // 2])
    (user / ".tmp-123-partial.scn.pt").write_bytes(b"partial")
    monkeypatch.setenv("SCN_MODELS_DIR", str(bundled))
    monkeypatch.setenv("SCN_USER_MODELS_DIR", str(user))
    return bundled, user


def test_folders_follow_environment_and_default_locations(folders, monkeypatch, tmp_path):
    bundled, user = folders
    assert catalog.bundled_models_folder() == bundled
    assert catalog.user_models_folder() == user
    monkeypatch.delenv("SCN_MODELS_DIR")
    monkeypatch.delenv("SCN_USER_MODELS_DIR")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert catalog.bundled_models_folder() == Path(catalog.__file__).resolve().parents[2] / "Resources" / "Models"
    assert catalog.user_models_folder() == tmp_path / "home" / ".SCNLandmarks" / "models"
    assert catalog.user_models_folder(create=True).is_dir()
    # The shipped catalog parses (it may be empty until a model is released).
    assert isinstance(catalog.read_catalog(), list)


def test_list_models_describes_every_file_and_reports_damaged_ones(folders):
    entries = {entry.name: entry for entry in catalog.list_models()}
    assert set(entries) == {"Remote model", "Cephalometric", "extra", "mine-ft001", "broken"}
    ceph = entries["Cephalometric"]
    assert (ceph.source, ceph.dimension, ceph.landmark_count, ceph.default) == ("bundled", 2, 3, True)
    assert ceph.landmark_names == ("A", "B", "C") and ceph.description == "2D ceph" and ceph.usable
    assert entries["extra"].source == "bundled" and entries["mine-ft001"].source == "user"
    assert entries["broken"].error and "truncated" in entries["broken"].error
    assert "unusable" in entries["broken"].label
    assert entries["Remote model"].error == "not downloaded yet"
    assert entries["Remote model"].url.startswith("https://")
    order = [entry.name for entry in catalog.list_models()]
    assert order.index("Cephalometric") < order.index("extra") < order.index("mine-ft001")


def test_default_and_find_model(folders):
    bundled, user = folders
    assert catalog.default_model() == bundled / "ceph.scn.pt"
    assert catalog.find_model(None) == bundled / "ceph.scn.pt"
    assert catalog.find_model("Cephalometric") == bundled / "ceph.scn.pt"
    assert catalog.find_model("mine-ft001") == user / "mine-ft001.scn.pt"
    assert catalog.find_model(str(user / "broken.scn.pt")) == user / "broken.scn.pt"
    with pytest.raises(FileNotFoundError, match="available models: .*Cephalometric"):
        catalog.find_model("nope")
    (bundled / "models.json").write_text("")
    assert catalog.default_model() is None
    (bundled / "models.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        catalog.read_catalog()
    assert catalog.default_model() is None
    for bad in ("../escape.scn.pt", "..", "notes.txt"):
        (bundled / "models.json").write_text(json.dumps([{"name": "x", "file": bad}]))
        with pytest.raises(ValueError, match="plain file name ending in .scn.pt"):
            catalog.read_catalog()


def test_without_a_default_the_first_usable_model_is_used(folders):
    """One rule for "no model chosen", in the CLI, the API and Slicer alike."""
    bundled, user = folders
    for path in bundled.iterdir():
        path.unlink()
    assert catalog.default_model() is None
    assert catalog.find_model(None) == user / "mine-ft001.scn.pt"  # broken.scn.pt is skipped
    (user / "mine-ft001.scn.pt").unlink()
    with pytest.raises(FileNotFoundError, match="No landmark model is installed yet"):
        catalog.find_model(None)


def test_next_model_version_never_reuses_a_name(tmp_path):
    user = tmp_path / "user"
    first = catalog.next_model_version_path(tmp_path / "ceph.scn.pt", user)
    assert first == user / "ceph-ft001.scn.pt"
    user.mkdir()
    first.write_bytes(b"x")
    (user / "ceph-ft007.scn.pt").write_bytes(b"x")
    (user / "other-ft009.scn.pt").write_bytes(b"x")
    assert catalog.next_model_version_path(tmp_path / "ceph.scn.pt", user) == user / "ceph-ft008.scn.pt"
    # Fine-tuning a fine-tuned model continues the same numbering.
    assert catalog.next_model_version_path(user / "ceph-ft001.scn.pt", user) == user / "ceph-ft008.scn.pt"
    assert catalog.next_model_version_path(tmp_path / "a[1].scn.pt", user) == user / "a[1]-ft001.scn.pt"
    # A fine-tuning still running holds its name: a second one started meanwhile gets the next.
    (user / "ceph-ft008.scn.pt.reserved").touch()
    assert catalog.next_model_version_path(tmp_path / "ceph.scn.pt", user) == user / "ceph-ft009.scn.pt"


def test_verify_sha256(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"hello")
    catalog.verify_sha256(path, hashlib.sha256(b"hello").hexdigest().upper())
    with pytest.raises(ValueError, match="not the expected file"):
        catalog.verify_sha256(path, "0" * 64)


def test_fetch_model_from_file_url_and_path_with_checksum(tmp_path, model_bytes):
    source = tmp_path / "src" / "tiny.scn.pt"
    source.parent.mkdir()
    source.write_bytes(model_bytes)
    digest = hashlib.sha256(model_bytes).hexdigest()
    destination = tmp_path / "dest"
    reports = []
    fetched = catalog.fetch_model(source.as_uri(), destination, sha256=digest, progress=reports.append)
    assert fetched == destination / "tiny.scn.pt" and fetched.read_bytes() == model_bytes
    assert reports and reports[-1].done == len(model_bytes) and reports[-1].stage == "download"
    load_model(fetched)
    # Present with the right checksum: reused, not downloaded again.
    assert catalog.fetch_model(source, destination, sha256=digest, progress=lambda _: pytest.fail("downloaded again")) == fetched
    # A wrong checksum leaves nothing behind and never replaces the existing file.
    with pytest.raises(ValueError, match="damaged or not the expected file"):
        catalog.fetch_model(source, destination, sha256="0" * 64, file_name="other.scn.pt")
    assert sorted(p.name for p in destination.iterdir()) == ["tiny.scn.pt"]
    with pytest.raises(FileExistsError):
        catalog.fetch_model(source, destination)
    with pytest.raises(FileNotFoundError):
        catalog.fetch_model(tmp_path / "absent.scn.pt", destination)
    with pytest.raises(ValueError, match="only http"):
        catalog.fetch_model("ftp://example.org/x.scn.pt", destination)
    with pytest.raises(InterruptedError):
        catalog.fetch_model(source, destination, file_name="c.scn.pt", should_cancel=lambda: True)
    assert sorted(p.name for p in destination.iterdir()) == ["tiny.scn.pt"]


def test_import_model_file_validates_and_copies_once(folders, tmp_path, model_bytes):
    _, user = folders
    outside = tmp_path / "downloads" / "mine-ft001.scn.pt"
    outside.parent.mkdir()
    outside.write_bytes(model_bytes)
    # Same name and same bytes as the user's model: nothing new.
    assert catalog.import_model_file(outside) == user / "mine-ft001.scn.pt"
    other = save_model(_tiny(names=("X", "Y")), tmp_path / "downloads" / "mine-ft001b.scn.pt")
    renamed = other.with_name("mine-ft001.scn.pt")
    outside.unlink()
    other.rename(renamed)
    copied = catalog.import_model_file(renamed)
    assert copied == user / "mine-ft001-1.scn.pt" and load_model(copied).landmark_names == ["X", "Y"]
    with pytest.raises(ModelFileError):
        catalog.import_model_file(user / "broken.scn.pt")


def test_listing_works_before_torch_is_installed(folders):
    """Inside Slicer the module lists models before PyTorch is installed, each with its landmark set
    (the description is read without torch), and a damaged file is named as such."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from SCNLandmarksLib.models import catalog\n"
        "entries = {e.name: e for e in catalog.list_models()}\n"
        "assert entries['Cephalometric'].error is None and entries['Cephalometric'].dimension == 2\n"
        "assert entries['broken'].error is not None and not entries['broken'].usable\n"
        "assert entries['mine-ft001'].label.startswith('mine-ft001 (2D, ') and entries['mine-ft001'].label.endswith(', user)')\n"
        "assert str(catalog.default_model()).endswith('ceph.scn.pt')\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_a_catalog_model_with_an_address_is_fetched_once_when_first_asked_for(folders, tmp_path, model_bytes):
    bundled, user = folders
    published = tmp_path / "published" / "shared.scn.pt"
    published.parent.mkdir()
    published.write_bytes(model_bytes)
    digest = hashlib.sha256(model_bytes).hexdigest()
    entries = json.loads((bundled / "models.json").read_text())["models"]
    entries += [
        {"name": "Shared model", "file": "shared.scn.pt", "sha256": digest, "url": published.as_uri()},
        {"name": "Tampered model", "file": "tampered.scn.pt", "sha256": "0" * 64, "url": published.as_uri()},
    ]
    (bundled / "models.json").write_text(json.dumps({"models": entries}))
    assert {e.name: e.error for e in catalog.list_models()}["Shared model"] == "not downloaded yet"

    reports = []
    fetched = catalog.find_model("Shared model", progress=reports.append)
    assert fetched == user / "shared.scn.pt" and fetched.read_bytes() == model_bytes
    assert reports and reports[-1].done == len(model_bytes)
    listed = {e.name: e for e in catalog.list_models()}
    assert listed["Shared model"].usable and listed["Shared model"].path == fetched
    assert "shared" not in listed  # the fetched file is the catalog model, not a second entry
    with pytest.raises(ValueError, match="damaged or not the expected file"):
        catalog.find_model("Tampered model")
    assert not (user / "tampered.scn.pt").exists()
    published.unlink()  # asked again, it is not fetched again
    assert catalog.find_model("Shared model") == fetched


def test_a_user_file_with_a_catalog_model_s_name_is_not_taken_for_it_nor_replaced(folders, tmp_path, model_bytes):
    bundled, user = folders
    published = tmp_path / "published" / "shared.scn.pt"
    published.parent.mkdir()
    published.write_bytes(model_bytes)
    entries = json.loads((bundled / "models.json").read_text())["models"]
    entries.append({"name": "Shared model", "file": "shared.scn.pt", "sha256": hashlib.sha256(model_bytes).hexdigest(),
                    "url": published.as_uri()})
    (bundled / "models.json").write_text(json.dumps({"models": entries}))
    own = save_model(_tiny(), user / "shared.scn.pt", half_precision=True)  # a valid model of the user's, other bytes
    kept = own.read_bytes()
    assert kept != model_bytes
    listed = {e.name: e for e in catalog.list_models()}
    assert listed["Shared model"].error == "not downloaded yet" and listed["Shared model"].path != own
    assert listed["shared"].source == "user" and listed["shared"].path == own  # listed as the user's own
    with pytest.raises(FileExistsError, match="holds another file named shared.scn.pt .* rename or move it"):
        catalog.find_model("Shared model")
    assert own.read_bytes() == kept
