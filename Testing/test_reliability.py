"""Faults a new user hit (issue 9), reproduced on small inputs: a clear message, an exit code, nothing lost."""

from __future__ import annotations

import os
import re
from pathlib import Path
import sys

import numpy as np
import pytest

from engine_fixtures import TINY_TRAIN_ARGS, synthetic_cases, write_annotated_folder
from SCNLandmarksLib.running.cli import main
from SCNLandmarksLib.imaging.image_io import write_image
from SCNLandmarksLib.data.landmark_io import write_mrk_json
from SCNLandmarksLib.data.synthetic import make_synthetic_case

TINY = [*TINY_TRAIN_ARGS, "--iterations", "3"]
as_root = hasattr(os, "geteuid") and os.geteuid() == 0


@pytest.fixture(scope="module")
def annotated(tmp_path_factory):
    return write_annotated_folder(tmp_path_factory.mktemp("annotated"), 4, seed=11)


@pytest.fixture(scope="module")
def tiny_model_file(annotated, tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "tiny.scn.pt"
    assert main(["train", "--images", str(annotated), "--output", str(path), *TINY]) == 0
    return path


def _one_line_error(capsys, *words: str) -> None:
    error = capsys.readouterr().err
    assert "Traceback" not in error
    for word in words:
        assert word in error, error


def test_an_output_that_is_a_file_is_named_before_any_work(tmp_path, annotated, tiny_model_file, capsys):
    existing = tmp_path / "notes.txt"
    existing.write_text("mine")
    for command in (["detect", str(annotated)], ["evaluate", "--images", str(annotated)]):
        assert main([*command, "--model", str(tiny_model_file), "--output", str(existing / "sub"), "--device", "cpu"]) == 2
        _one_line_error(capsys, "The output must be a folder, but", "notes.txt is a file")
    assert existing.read_text() == "mine"


def test_a_radiograph_stored_as_one_slice_gets_its_overlay(tmp_path, annotated, tiny_model_file, capsys):
    """hand9's .mha files are volumes of one slice: the 2D model reads them, and so must the overlay."""
    from engine_fixtures import as_single_slice
    from SCNLandmarksLib.imaging.image_io import read_image

    slab = as_single_slice(read_image(annotated / "case00.nrrd"))
    images = tmp_path / "images"
    images.mkdir()
    write_image(slab, images / "hand.mha")
    assert main(["detect", str(images), "--model", str(tiny_model_file), "--output", str(tmp_path / "out"),
                 "--overlay", "--device", "cpu"]) == 0
    assert (tmp_path / "out" / "hand.png").is_file() and (tmp_path / "out" / "landmarks.csv").is_file()
    assert "overlay not written" not in capsys.readouterr().out


def test_a_table_with_a_column_too_few_is_not_matched_by_number(tmp_path, annotated, tiny_model_file, capsys):
    """The tiny model's landmarks are numbered (L1..L4), as a table's columns are: a table of 3 would
    pair them by number, whatever the file holds."""
    from SCNLandmarksLib.data.dataset import load_cases

    rows = [f"{case.name}," + ",".join(f"{v:g}" for v in case.landmarks.positions[:3].ravel())
            for case in load_cases(annotated, dimension=2)]
    (tmp_path / "three.csv").write_text("\n".join(rows) + "\n")
    assert main(["evaluate", "--images", str(annotated), "--landmarks", str(tmp_path / "three.csv"), "--model",
                 str(tiny_model_file), "--output", str(tmp_path / "report"), "--device", "cpu"]) == 2
    _one_line_error(capsys, "3 landmarks per image and the model 4", "cannot be matched")


def test_a_missing_input_file_is_named_as_missing_not_as_a_folder(tmp_path, tiny_model_file, capsys):
    assert main(["detect", str(tmp_path / "nothing.png"), "--model", str(tiny_model_file)]) == 2
    _one_line_error(capsys, "Input not found", "nothing.png")


@pytest.mark.skipif(sys.platform == "win32", reason="Windows folder permissions are ACLs, not mode bits")
def test_a_read_only_output_folder_is_refused_before_any_work(tmp_path, annotated, tiny_model_file, capsys, monkeypatch):
    read_only = tmp_path / "locked"
    read_only.mkdir()
    read_only.chmod(0o500)
    if as_root:  # root may write anywhere (CI may run as root): the system's answers are given instead
        real_access, real_mkdir = os.access, Path.mkdir

        def access(path, mode, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
            if Path(path) == read_only and mode & os.W_OK:
                return False
            return real_access(path, mode, *args, **kwargs)

        def mkdir(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
            if self.parent == read_only:
                raise PermissionError(13, "Permission denied", str(self))
            return real_mkdir(self, *args, **kwargs)

        monkeypatch.setattr(os, "access", access)
        monkeypatch.setattr(Path, "mkdir", mkdir)
    try:
        assert main(["detect", str(annotated), "--model", str(tiny_model_file), "--output", str(read_only / "out"),
                     "--device", "cpu"]) == 2
        _one_line_error(capsys, "permission")
        assert main(["detect", str(annotated), "--model", str(tiny_model_file), "--output", str(read_only),
                     "--device", "cpu"]) == 2
        _one_line_error(capsys, "read-only")
        assert main(["train", "--images", str(annotated), "--output", str(read_only / "m.scn.pt"), *TINY]) == 2
        _one_line_error(capsys, "read-only")
    finally:
        read_only.chmod(0o700)


def test_an_existing_overlay_is_kept_and_its_image_still_summarised(tmp_path, annotated, tiny_model_file, capsys):
    """The picture is a by-product: one that cannot be written is warned about, the landmarks still count."""
    output = tmp_path / "out"
    output.mkdir()
    (output / "case01.png").write_bytes(b"the user's own picture")
    assert main(["detect", str(annotated), "--model", str(tiny_model_file), "--output", str(output), "--overlay",
                 "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "WARNING case01.nrrd: overlay not written" in printed and "FAILED" not in printed
    assert (output / "case01.png").read_bytes() == b"the user's own picture"
    assert len(list(output.glob("*.png"))) == 4 and len(list(output.glob("*.mrk.json"))) == 4
    assert any(row.startswith("case01,") for row in (output / "landmarks.csv").read_text().splitlines())


def test_one_spacing_value_means_isotropic_for_a_3d_volume_too(tmp_path):
    from SCNLandmarksLib.running.cli import _spacing
    from SCNLandmarksLib.imaging.image_io import read_image

    volume, _ = make_synthetic_case(dimension=3, size=12, num_landmarks=2)
    path = write_image(volume, tmp_path / "ct.nrrd")
    assert read_image(path, spacing=_spacing([0.7])).geometry.spacing == pytest.approx((0.7, 0.7, 0.7))


def test_training_takes_every_cases_landmarks_by_name_whatever_the_file_order(tmp_path, capsys):
    folder = tmp_path / "cases"
    folder.mkdir()
    cases = synthetic_cases(4, seed=3)
    for number, case in enumerate(cases):
        landmarks = case.landmarks
        if number == 0:  # the first file in sorted order lacks L3 altogether
            keep = [n for n in landmarks.names if n != "L3"]
            landmarks = landmarks.reordered(keep)
        write_image(case.image, folder / f"{case.name}.nrrd")
        write_mrk_json(landmarks, folder / f"{case.name}.mrk.json")
    model = tmp_path / "m.scn.pt"
    assert main(["train", "--images", str(folder), "--output", str(model), *TINY]) == 0
    capsys.readouterr()
    assert main(["info", str(model)]) == 0
    assert re.search(r"4 landmarks: .*\bL3\b", capsys.readouterr().out)


def test_no_training_cases_is_a_message(tmp_path, capsys):
    folder = tmp_path / "empty"
    folder.mkdir()
    code = main(["train", "--images", str(folder), "--output", str(tmp_path / "m.scn.pt"), *TINY])
    assert code == 2
    _one_line_error(capsys, "No images found")
    assert not (tmp_path / "m.scn.pt").exists()


def test_overwrite_advice_names_the_command_line_option(tmp_path):
    from SCNLandmarksLib.common.atomic import check_writable

    target = tmp_path / "x.csv"
    target.write_text("mine")
    with pytest.raises(FileExistsError, match="--overwrite"):
        check_writable(target, overwrite=False)
    assert target.read_text() == "mine"


def test_a_changed_landmark_name_in_a_model_file_is_found_by_load_and_info(tmp_path, tiny_model_file, capsys):
    import torch

    from SCNLandmarksLib.common.errors import ModelFileError
    from SCNLandmarksLib.models.model_file import load_model

    payload = torch.load(tiny_model_file, weights_only=True)
    assert '"L1"' in payload["description"]
    payload["description"] = payload["description"].replace('"L1"', '"LX"')
    tampered = tmp_path / "tampered.scn.pt"
    torch.save(payload, tampered)
    with pytest.raises(ModelFileError, match="description"):
        load_model(tampered)
    assert main(["info", str(tampered)]) == 2
    _one_line_error(capsys, "damaged")


@pytest.mark.parametrize("suffix", [".jpg", ".png"])
def test_a_truncated_photo_file_is_refused_not_detected(tmp_path, suffix):
    import SimpleITK as sitk

    from SCNLandmarksLib.imaging.image_io import read_image

    pixels = (np.random.default_rng(0).random((200, 160)) * 255).astype(np.uint8)
    whole = tmp_path / f"whole{suffix}"
    sitk.WriteImage(sitk.GetImageFromArray(pixels), str(whole))
    assert read_image(whole, spacing=0.1).array.shape == (200, 160)
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size * 2 // 3])
    with pytest.raises(ValueError, match="damaged.*truncated"):
        read_image(cut, spacing=0.1)
    text = tmp_path / f"notes{suffix}"  # another kind of file under an image's name
    text.write_text("landmark notes, not an image\n")
    with pytest.raises(ValueError, match=f"is not a {suffix[1:].upper()} file: its content is not such an image"):
        read_image(text, spacing=0.1)


def test_resume_refuses_a_missing_or_foreign_checkpoint(tmp_path, annotated, capsys):
    model = tmp_path / "m.scn.pt"
    assert main(["train", "--images", str(annotated), "--output", str(model), "--resume", *TINY]) == 2
    _one_line_error(capsys, "no checkpoint", "m.scn.pt.ckpt")
    assert not model.exists()
    # A checkpoint of another network is refused by name, not with a size-mismatch traceback.
    import torch

    from SCNLandmarksLib.learning.step_loop import save_checkpoint

    foreign = tmp_path / "foreign.ckpt"
    save_checkpoint(foreign, {"network": {"conv.weight": torch.zeros(3)}, "targets": {}, "optimizer": {}, "scheduler": {}})
    assert main(["train", "--images", str(annotated), "--output", str(model), "--checkpoint", str(foreign),
                 "--resume", *TINY]) == 2
    _one_line_error(capsys, "does not fit the network these options make", "repeat the first command exactly")


def test_ctrl_c_keeps_a_resumable_checkpoint_without_being_asked(tmp_path, annotated, capsys):
    import signal
    import threading

    model = tmp_path / "m.scn.pt"
    steps = [*TINY]
    steps[steps.index("--iterations") + 1] = "100000"
    command = ["train", "--images", str(annotated), "--output", str(model), *steps]
    timer = threading.Timer(1.5, lambda: os.kill(os.getpid(), signal.SIGINT))
    timer.start()
    try:
        code = main(command)
    finally:
        timer.cancel()
    assert code == 130
    checkpoint = tmp_path / "m.scn.pt.ckpt"
    assert checkpoint.exists() and not model.exists()
    # The whole command to resume with: the network is rebuilt from the options, so every one counts.
    import shlex

    assert f"To resume: scn-landmarks {shlex.join([*command, '--resume'])}" in capsys.readouterr().err


def test_a_full_disk_at_the_end_of_training_keeps_the_model_in_a_rescue_copy(tmp_path, monkeypatch):
    import SCNLandmarksLib.models.model_file as model_file
    from engine_fixtures import tiny_model
    from SCNLandmarksLib.models.model_file import load_model
    from SCNLandmarksLib.learning.step_loop import save_checkpoint, write_trained_model

    real_save = model_file.save_model
    target = tmp_path / "full-disk" / "m.scn.pt"
    target.parent.mkdir()

    def save_unless_full(model, path, **options):  # the output's disk is full; another one is not
        if Path(path).parent == target.parent:
            raise RuntimeError("[enforce fail at inline_container.cc:664] . PytorchStreamWriter failed writing file data/3: file write failed")
        return real_save(model, path, **options)

    monkeypatch.setattr(model_file, "save_model", save_unless_full)
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    model = tiny_model(["A", "B"])
    with pytest.raises(OSError, match="the disk is full") as raised:
        write_trained_model(model, target, overwrite=False)
    rescued = list(tmp_path.glob("rescued-*-m.scn.pt"))
    assert len(rescued) == 1 and str(rescued[0]) in str(raised.value)
    assert load_model(rescued[0]).landmark_names == ["A", "B"]

    import torch

    def full_disk(*_args, **_kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError, match="checkpoint .* the disk is full"):
        save_checkpoint(tmp_path / "c.ckpt", {"iteration": 1})


def test_a_grey_png_with_transparency_gets_advice_not_a_pixel_type(tmp_path):
    import SimpleITK as sitk

    from SCNLandmarksLib.imaging.image_io import read_image

    pixels = np.zeros((20, 30, 2), np.uint8)
    pixels[..., 0] = np.arange(30)
    pixels[..., 1] = 255
    path = tmp_path / "grey_alpha.png"
    sitk.WriteImage(sitk.GetImageFromArray(pixels, isVector=True), str(path))
    try:
        image = read_image(path, spacing=0.1)
    except ValueError as error:  # the reader of this SimpleITK version cannot decode it
        assert "without transparency" in str(error) and "PixelType" not in str(error)
    else:  # a newer reader can: the grey channel is the image
        np.testing.assert_array_equal(image.array[0], np.arange(30))


def test_evaluate_refuses_an_existing_report_before_the_work(tmp_path, annotated, tiny_model_file, capsys):
    report = tmp_path / "report"
    report.mkdir()
    (report / "evaluation.json").write_text("{}")
    assert main(["evaluate", "--model", str(tiny_model_file), "--images", str(annotated), "--output", str(report),
                 "--device", "cpu"]) == 2
    _one_line_error(capsys, "already exists", "--overwrite")
    assert (report / "evaluation.json").read_text() == "{}"
    assert main(["evaluate", "--model", str(tiny_model_file), "--images", str(annotated), "--output", str(report),
                 "--device", "cpu", "--overwrite"]) == 0


def test_a_second_fine_tune_to_the_same_name_is_refused_at_once(tmp_path, annotated, tiny_model_file):
    from SCNLandmarksLib.data.dataset import load_cases
    from SCNLandmarksLib.learning.finetuning import fine_tune

    output = tmp_path / "tuned.scn.pt"
    (tmp_path / "tuned.scn.pt.reserved").touch()  # a fine-tuning to that name is running
    cases = load_cases(annotated, dimension=2)
    with pytest.raises(FileExistsError, match="Another fine-tuning is already writing"):
        fine_tune(cases, tiny_model_file, output=output, iterations=1, device="cpu")
    (tmp_path / "tuned.scn.pt.reserved").unlink()
    report = fine_tune(cases, tiny_model_file, output=output, iterations=1, device="cpu", keep_worse=True)
    assert report.output == output and not (tmp_path / "tuned.scn.pt.reserved").exists()


def test_pixel_coordinates_read_as_millimetres_are_refused_naming_the_case(tmp_path):
    from SCNLandmarksLib.data.dataset import load_cases

    folder = tmp_path / "cases"
    folder.mkdir()
    image, _ = make_synthetic_case(dimension=2, size=(80, 60), spacing=(0.1, 0.1), num_landmarks=2)
    write_image(image, folder / "ceph1.nrrd")
    index = np.array([[40.0, 30.0], [70.0, 50.0]])  # pixel indices, well inside
    physical = image.geometry.index_to_physical(index)
    (tmp_path / "pixels.csv").write_text("id,x1,y1,x2,y2\nceph1," + ",".join(f"{v:g}" for v in index.ravel()) + "\n")
    (tmp_path / "mm.csv").write_text("id,x1,y1,x2,y2\nceph1," + ",".join(f"{v:g}" for v in physical.ravel()) + "\n")
    with pytest.raises(ValueError, match="Image ceph1: landmark L1 .* outside the image.*--units pixel"):
        load_cases(folder, dimension=2, landmarks=tmp_path / "pixels.csv")
    assert load_cases(folder, dimension=2, landmarks=tmp_path / "pixels.csv", units="pixel")[0].name == "ceph1"
    np.testing.assert_allclose(load_cases(folder, dimension=2, landmarks=tmp_path / "mm.csv")[0].landmarks.positions,
                               physical, atol=1e-3)


def test_volumes_given_to_a_2d_training_are_refused_with_the_option_that_fixes_it(tmp_path):
    from SCNLandmarksLib.data.dataset import load_cases
    from SCNLandmarksLib.data.landmark_io import write_landmarks

    folder = tmp_path / "cases"
    folder.mkdir()
    volume, points = make_synthetic_case(dimension=3, size=(20, 18, 16), spacing=(1.0, 1.0, 2.0), num_landmarks=2)
    write_image(volume, folder / "head.nii.gz")
    write_landmarks(points, folder / "head.fcsv")
    with pytest.raises(ValueError, match=r"head.nii.gz is a 3D volume \(20 x 18 x 16 voxels\).*--dimension 3"):
        load_cases(folder, dimension=2)
    assert load_cases(folder, dimension=3)[0].landmarks.dimension == 3


def test_several_raters_give_the_mean_of_the_annotations_that_have_each_point(tmp_path, capsys):
    """As the ISBI 2015 figures use both doctors: --landmarks senior.csv junior.csv."""
    from SCNLandmarksLib.data.dataset import load_cases

    folder = tmp_path / "cases"
    folder.mkdir()
    image, _ = make_synthetic_case(dimension=2, size=(80, 60), spacing=(0.1, 0.1), num_landmarks=2)
    write_image(image, folder / "ceph1.nrrd")
    first = image.geometry.index_to_physical(np.array([[40.0, 30.0], [70.0, 50.0]]))
    second = first + [[1.0, -2.0], [0.0, 0.0]]
    (tmp_path / "a.csv").write_text("ceph1," + ",".join(f"{v:g}" for v in first.ravel()) + "\n")
    (tmp_path / "b.csv").write_text("ceph1," + ",".join(f"{v:g}" for v in second[0]) + ",,\n")  # L2 not placed
    (tmp_path / "c.csv").write_text("other," + ",".join(f"{v:g}" for v in first.ravel()) + "\n")
    mean = load_cases(folder, dimension=2, landmarks=[tmp_path / "a.csv", tmp_path / "b.csv"])[0].landmarks
    np.testing.assert_allclose(mean.positions, [first[0] + [0.5, -1.0], first[1]], atol=1e-6)
    with pytest.raises(ValueError, match="c.csv has no row for image ceph1"):
        load_cases(folder, dimension=2, landmarks=[tmp_path / "a.csv", tmp_path / "c.csv"])
    # Columns are read by position: files that name them in another order are refused, not averaged across.
    (tmp_path / "ha.csv").write_text("id,L1_x,L1_y,L2_x,L2_y\n" + (tmp_path / "a.csv").read_text())
    (tmp_path / "hb.csv").write_text("id,L2_x,L2_y,L1_x,L1_y\n" + (tmp_path / "a.csv").read_text())
    (tmp_path / "ceph1.fcsv").write_text("# Markups fiducial file version = 4.6\n")
    with pytest.raises(ValueError, match="ceph1.fcsv is a point file of one image.*beside its image"):
        load_cases(folder, dimension=2, landmarks=tmp_path / "ceph1.fcsv")
    with pytest.raises(ValueError, match="name their columns differently"):
        load_cases(folder, dimension=2, landmarks=[tmp_path / "ha.csv", tmp_path / "hb.csv"])
    # The command line takes both files: it gets as far as the model, which is not there.
    assert main(["evaluate", "--images", str(folder), "--landmarks", str(tmp_path / "a.csv"), str(tmp_path / "b.csv"),
                 "--model", "nowhere.scn.pt", "--output", str(tmp_path / "report")]) == 2
    _one_line_error(capsys, "nowhere.scn.pt")


def test_model_lists_read_descriptions_without_torch(tmp_path, tiny_model_file):
    """The Slicer module lists models when it opens: that must not import torch (seconds, or broken)."""
    import subprocess

    from SCNLandmarksLib.models.model_file import read_model_description

    code = (
        "import sys\n"
        "from SCNLandmarksLib.models.catalog import list_models\n"
        "from SCNLandmarksLib.models.model_header import read_header\n"
        f"header = read_header({str(tiny_model_file)!r})\n"
        "assert [item['name'] for item in header['landmarks']] == ['L1', 'L2', 'L3', 'L4'], header\n"
        "entries = [e for e in list_models() if e.path.name == 'cephalometric_isbi2015.scn.pt']\n"
        "assert entries and entries[0].landmark_count == 19 and entries[0].error is None, entries\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "SCNLandmarks")}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False)
    assert result.returncode == 0, result.stderr
    from SCNLandmarksLib.models.model_header import read_header

    assert read_header(tiny_model_file) == read_model_description(tiny_model_file)
    evil = tmp_path / "evil.scn.pt"
    import pickle
    import zipfile

    with zipfile.ZipFile(evil, "w") as archive:  # a pickle that would call os.system
        archive.writestr("evil/data.pkl", pickle.dumps(os.system))
    from SCNLandmarksLib.common.errors import ModelFileError

    with pytest.raises(ModelFileError, match="never contains"):
        read_header(evil)


def test_an_image_too_large_for_the_memory_is_skipped_and_the_batch_goes_on(tmp_path, annotated, tiny_model_file,
                                                                          capsys, monkeypatch):
    from SCNLandmarksLib.imaging import image_io

    big = tmp_path / "images"
    big.mkdir()
    for name in ("case00", "case01"):
        (big / f"{name}.nrrd").write_bytes((annotated / f"{name}.nrrd").read_bytes())
    real_needed = image_io.memory_needed_bytes
    assert real_needed(big / "case00.nrrd") > 0
    # case01 "needs" more than the machine has now (as a 60000 x 60000 scan would).
    monkeypatch.setattr(image_io, "memory_needed_bytes",
                        lambda path: 10**15 if Path(path).name == "case01.nrrd" else real_needed(path))
    monkeypatch.setattr(image_io, "memory_available_bytes", lambda: 8 * 2**30)
    assert main(["detect", str(big), "--model", str(tiny_model_file), "--output", str(tmp_path / "out"),
                 "--device", "cpu"]) == 2
    printed = capsys.readouterr().out
    assert "FAILED case01.nrrd: case01.nrrd is too large for the memory available" in printed and "GB free" in printed
    assert (tmp_path / "out" / "case00.mrk.json").exists() and (tmp_path / "out" / "landmarks.csv").exists()


@pytest.mark.skipif(sys.platform == "win32", reason="RLIMIT_FSIZE is POSIX")
def test_a_file_size_limit_at_the_final_save_is_named_not_a_traceback(tmp_path, annotated):
    """A real write failure (RLIMIT_FSIZE, as a full disk or a quota gives): a message, exit 2, nothing half-written."""
    import subprocess

    code = (
        "import resource, signal, sys\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000))\n"  # checkpoints and models are larger
        "from SCNLandmarksLib.running.cli import main\n"
        f"sys.exit(main(['train', '--images', {str(annotated)!r}, '--output', {str(tmp_path / 'm.scn.pt')!r}, "
        f"'--checkpoint-every', '1', *{TINY!r}]))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "SCNLandmarks"),
           "TMPDIR": str(tmp_path)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300, check=False)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert "Could not write the trained model" in result.stderr and "file-size limit" in result.stderr
    assert "No rescue copy could be written either" in result.stderr  # the temporary folder has the same limit
    assert not (tmp_path / "m.scn.pt").exists()


def test_ctrl_c_while_the_cases_load_is_a_message(tmp_path, annotated, capsys, monkeypatch):
    import SCNLandmarksLib.running.cli as cli

    def interrupted(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_load_data", interrupted)
    assert main(["train", "--images", str(annotated), "--output", str(tmp_path / "m.scn.pt"), *TINY]) == 130
    _one_line_error(capsys, "interrupted", "nothing was written")
    assert not (tmp_path / "m.scn.pt").exists()


def test_a_rerun_keeps_earlier_results_and_two_images_never_share_one(tmp_path, annotated, tiny_model_file, capsys,
                                                                       monkeypatch):
    """Results of an earlier run are skipped before detection (exit 0: nothing new to do) unless
    --overwrite; two images of one name (case00.nrrd, case00.png) never write into one result."""
    import SimpleITK as sitk

    from SCNLandmarksLib.inference import batch

    images, out = tmp_path / "images", tmp_path / "out"
    images.mkdir()
    (images / "case00.nrrd").write_bytes((annotated / "case00.nrrd").read_bytes())
    arguments = ["detect", str(images), "--model", str(tiny_model_file), "--output", str(out), "--device", "cpu"]
    assert main(arguments) == 0
    first = (out / "case00.mrk.json").read_bytes()
    capsys.readouterr()

    detections = []
    real_detect = batch.Detector.detect
    monkeypatch.setattr(batch.Detector, "detect", lambda self, image: detections.append(image) or real_detect(self, image))
    assert main(arguments) == 0
    printed = capsys.readouterr().out
    assert "SKIPPED case00.nrrd:" in printed and "exists from an earlier run and is kept" in printed
    assert detections == [] and (out / "case00.mrk.json").read_bytes() == first  # not even detected

    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((40, 30), np.uint8) + 9), str(images / "case00.png"))
    assert main([*arguments, "--overwrite"]) == 2  # refused before any image is detected
    assert "case00.nrrd and case00.png" in capsys.readouterr().err and detections == []
    report = batch.detect_files(sorted(images.iterdir()), out, tiny_model_file, device="cpu", overwrite=True)
    failed = {item.image.name: item.error for item in report.failed}  # through the API: the second one fails
    assert list(failed) == ["case00.png"] and "has the same name as case00.nrrd" in failed["case00.png"]
    assert len(detections) == 1  # the NRRD again, replacing its earlier result; the PNG never


# --------------------------------------------------------------------------- names and paths


def _png_case(folder: Path, name: str) -> Path:
    image, _ = make_synthetic_case(dimension=2, size=(64, 56), spacing=(1.0, 1.0), num_landmarks=4)
    grey = np.round(255 * (image.array - image.array.min()) / np.ptp(image.array))
    return write_image(type(image)(grey, image.geometry), folder / name)


def test_an_overlay_never_replaces_an_input_image(tmp_path, tiny_model_file, capsys):
    """Output folder = input folder, with --overwrite: the overlay would have been scan.png itself."""
    folder = tmp_path / "same"
    folder.mkdir()
    scan = _png_case(folder, "scan.png")
    before = scan.read_bytes()
    assert main(["detect", str(folder), "--model", str(tiny_model_file), "--output", str(folder), "--overlay",
                 "--overwrite", "--spacing", "1", "--device", "cpu"]) == 0
    assert scan.read_bytes() == before
    assert "is one of the input images, which is never replaced" in capsys.readouterr().out
    assert (folder / "scan.mrk.json").exists()


@pytest.mark.parametrize("names", [("scan.png", "scan.nrrd"), ("scan.png", "SCAN.png")])
def test_images_that_would_share_an_output_name_are_refused_before_any_shard_runs(tmp_path, tiny_model_file, capsys,
                                                                                    names):
    """Each shard sees only its share: before, the second 'scan' was SKIPPED with exit 0 as an earlier result."""
    folder = tmp_path / "images"
    folder.mkdir()
    for name in names:
        if name.endswith(".png"):
            _png_case(folder, name)
        else:
            write_image(make_synthetic_case(dimension=2, size=(64, 56), num_landmarks=4)[0], folder / name)
    output = tmp_path / "out"
    for share in ("1/2", "2/2"):
        assert main(["detect", str(folder), "--model", str(tiny_model_file), "--output", str(output), "--shard", share,
                     "--spacing", "1", "--device", "cpu"]) == 2
        first, second = sorted(names)
        _one_line_error(capsys, f"({first} and {second})", "rename one of each pair, nothing was detected")
    assert not output.exists() or not any(output.iterdir())


def test_a_folder_of_cases_with_two_images_of_one_name_is_refused_for_training(tmp_path):
    from SCNLandmarksLib.data.dataset import load_cases

    folder = tmp_path / "cases"
    folder.mkdir()
    image, points = make_synthetic_case(dimension=2, size=(64, 56), num_landmarks=2)
    write_image(image, folder / "case00.nrrd")
    write_image(image, folder / "case00.nii.gz")
    write_mrk_json(points, folder / "case00.mrk.json")
    with pytest.raises(ValueError, match=r"case00.nii.gz and case00.nrrd .* same case \('case00'\); keep one"):
        load_cases(folder, dimension=2)


def test_id_and_name_lists_saved_with_a_byte_order_mark_or_not_as_utf8(tmp_path):
    from SCNLandmarksLib.data.dataset import read_id_list, read_landmark_names

    (tmp_path / "names.txt").write_bytes("\ufeffSella: centre\nNasion\n".encode("utf-8"))
    assert read_landmark_names(tmp_path / "names.txt") == (["Sella", "Nasion"], ["centre", ""])
    (tmp_path / "ids.txt").write_bytes("p1\nMüller\n".encode("latin-1"))
    with pytest.raises(ValueError, match="ids.txt is not UTF-8 text .* save it as UTF-8"):
        read_id_list(tmp_path / "ids.txt")


def test_a_landmark_table_of_a_european_spreadsheet_is_refused_not_misread(tmp_path):
    from SCNLandmarksLib.data.landmark_io import read_landmark_csv

    (tmp_path / "semicolons.csv").write_text("id;x1;y1\np1;10,5;20,25\np2;11;21\n", encoding="utf-8")
    with pytest.raises(ValueError, match="separates its cells with ';' or tabs"):
        read_landmark_csv(tmp_path / "semicolons.csv", dimension=2)
    (tmp_path / "latin.csv").write_bytes("id,x1,y1\nMüller,1,2\n".encode("latin-1"))
    with pytest.raises(ValueError, match="latin.csv is not UTF-8 text"):
        read_landmark_csv(tmp_path / "latin.csv", dimension=2)
    # Through training's table reading too, which looks at the header first.
    from SCNLandmarksLib.data.dataset import load_cases

    folder = tmp_path / "cases"
    folder.mkdir()
    write_image(make_synthetic_case(dimension=2, size=(64, 56), num_landmarks=1)[0], folder / "Müller.nrrd")
    for table, reason in (("latin.csv", "latin.csv is not UTF-8 text"), ("semicolons.csv", "separates its cells")):
        with pytest.raises(ValueError, match=reason):
            load_cases(folder, dimension=2, landmarks=tmp_path / table)


def test_a_console_that_cannot_show_a_name_does_not_end_the_run(tmp_path, tiny_model_file, monkeypatch):
    """A Windows console or a redirect in cp1252: the names are shown escaped, the run reports and succeeds."""
    import io

    folder = tmp_path / "images"
    folder.mkdir()
    _png_case(folder, "Müller_患者.png")
    console = io.TextIOWrapper(io.BytesIO(), encoding="cp1252")
    monkeypatch.setattr(sys, "stdout", console)
    assert main(["detect", str(folder), "--model", str(tiny_model_file), "--output", str(tmp_path / "out"),
                 "--spacing", "1", "--device", "cpu"]) == 0
    console.flush()
    printed = console.buffer.getvalue().decode("cp1252")
    assert "Müller_\\u60a3\\u8005.png" in printed and (tmp_path / "out" / "Müller_患者.mrk.json").exists()
