"""The scn-landmarks command: train -> detect -> evaluate -> finetune on files, and its errors."""

import json
import subprocess
import sys

import pytest

from engine_fixtures import TINY_TRAIN_ARGS, write_annotated_folder
from SCNLandmarksLib.running.cli import main
from SCNLandmarksLib.imaging.image_io import write_image
from SCNLandmarksLib.data.landmark_io import read_mrk_json

TINY = [*TINY_TRAIN_ARGS]


@pytest.fixture(scope="module")
def annotated_folder(tmp_path_factory):
    return write_annotated_folder(tmp_path_factory.mktemp("annotated"), 5, seed=4)


@pytest.fixture(scope="module")
def trained_model(annotated_folder, tmp_path_factory):
    model = tmp_path_factory.mktemp("models") / "tiny.scn.pt"
    code = main(["train", "--images", str(annotated_folder), "--output", str(model), "--iterations", "20", *TINY])
    assert code == 0 and model.exists()
    return model


def test_help_explains_every_command():
    result = subprocess.run([sys.executable, "-m", "SCNLandmarksLib.running.cli", "--help"], capture_output=True, text=True, check=True)
    for command in ("detect", "train", "finetune", "evaluate", "info"):
        assert command in result.stdout
    assert "LPS" in result.stdout


def test_detect_folder_writes_markups_summary_and_overlays(annotated_folder, trained_model, tmp_path, capsys):
    output = tmp_path / "out"
    assert main(["detect", str(annotated_folder), "--model", str(trained_model), "--output", str(output),
                 "--overlay", "--device", "cpu"]) == 0
    markups = sorted(output.glob("*.mrk.json"))
    assert len(markups) == 5 and len(list(output.glob("*.png"))) == 5
    landmarks = read_mrk_json(markups[0], dimension=2)
    assert landmarks.names == ["L1", "L2", "L3", "L4"] and landmarks.confidences is not None
    rows = (output / "landmarks.csv").read_text().splitlines()
    assert rows[0].startswith("image,landmark,x_lps") and len(rows) == 1 + 5 * 4
    assert "cpu" in capsys.readouterr().out
    # Running again keeps the results and says so: nothing new to do is not an error.
    before = markups[0].read_bytes()
    assert main(["detect", str(annotated_folder), "--model", str(trained_model), "--output", str(output), "--device", "cpu"]) == 0
    assert capsys.readouterr().out.count("SKIPPED") == 5 and markups[0].read_bytes() == before


def test_evaluate_and_finetune_and_info(annotated_folder, trained_model, tmp_path, capsys):
    report = tmp_path / "report"
    assert main(["evaluate", "--model", str(trained_model), "--images", str(annotated_folder), "--output", str(report),
                 "--device", "cpu"]) == 0
    values = json.loads((report / "evaluation.json").read_text())
    assert "mre_mm" in json.dumps(values) and "MRE" in capsys.readouterr().out
    tuned = tmp_path / "tuned.scn.pt"
    assert main(["finetune", "--from-model", str(trained_model), "--images", str(annotated_folder), "--output", str(tuned),
                 "--iterations", "5", "--device", "cpu", "--keep-worse"]) == 0
    capsys.readouterr()
    assert main(["info", str(tuned), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["landmarks"] == ["L1", "L2", "L3", "L4"] and info["training"]["iterations"] == 5
    assert info["info"]["parent_model"] == trained_model.name
    # For a person: a summary that says the file is intact, and the installed models by name.
    assert main(["info", str(tuned)]) == 0
    text = capsys.readouterr().out
    assert "checksums of the weights and of the description: intact" in text and "2D, 4 landmarks: L1, L2, L3, L4" in text
    assert f"fine-tuned from {trained_model.name}" in text and "--json" in text
    assert main(["info"]) == 0
    assert "* cephalometric_isbi2015" in capsys.readouterr().out  # the bundled default, by the name --model takes


def test_errors_are_one_clear_line_and_exit_code_2(annotated_folder, trained_model, tmp_path, capsys):
    assert main(["detect", str(annotated_folder), "--model", str(tmp_path / "missing.scn.pt")]) == 2
    assert "No model named or found" in capsys.readouterr().err
    assert main(["train", "--images", str(annotated_folder), "--output", str(trained_model), "--iterations", "1", *TINY]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["train", "--images", str(tmp_path), "--output", str(tmp_path / "x.scn.pt"), *TINY]) == 2
    assert "No images found" in capsys.readouterr().err


@pytest.mark.parametrize(("raised", "said"), [
    (lambda: __import__("torch").OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
     "The GPU ran out of memory; choose the CPU device"),
    (lambda: MemoryError("scan.nrrd is too large for the memory available"), "scan.nrrd is too large"),
    (lambda: RuntimeError("Padding size should be less than the corresponding input dimension"),
     "The info run failed unexpectedly: RuntimeError: Padding size"),
])
def test_errors_from_torch_or_memory_are_one_line_not_a_traceback(raised, said, monkeypatch, capsys):
    from SCNLandmarksLib.running import cli

    def fail(args):  # noqa: ANN001, ANN202
        raise raised()

    monkeypatch.setitem(cli.COMMANDS, "info", fail)
    assert main(["info"]) == 2
    err = capsys.readouterr().err
    assert said in err and "(scn-landmarks --verbose info ... shows where)" in err and "Traceback" not in err
    assert main(["--verbose", "info"]) == 2
    assert "Traceback" in capsys.readouterr().err


def test_progress_bar_in_a_log_is_throttled_but_keeps_validation_results():
    import io

    from SCNLandmarksLib.common.progress import Progress, TextProgressBar

    stream = io.StringIO()
    bar = TextProgressBar(stream=stream)
    for done in range(1, 50):
        bar(Progress("train", done, 100, 0.1 * done, loss=1.0, validation_mre_mm=2.5 if done == 30 else None))
    bar(Progress("train", 100, 100, 10.0, 0.0, loss=0.5))
    lines = stream.getvalue().splitlines()
    assert len(lines) == 3  # the first report, the validation at 30, the end
    assert "val MRE 2.50 mm" in lines[1] and "100/100" in lines[2]
    # A time budget, not a count, ends the work: the share done comes from the budget.
    budgeted = Progress("fine-tune", 7, None, 30.0, 90.0, completed=0.25)
    assert budgeted.fraction == 0.25 and not budgeted.finished
    TextProgressBar(stream=stream)(budgeted)
    assert stream.getvalue().splitlines()[-1].strip().startswith("fine-tune [#######-") and "7/?" in stream.getvalue()


def test_train_with_a_refinement_stage_writes_a_two_stage_model(annotated_folder, tmp_path, capsys):
    output = tmp_path / "two.scn.pt"
    assert main(["train", "--images", str(annotated_folder), "--output", str(output), "--iterations", "3",
                 "--refine-iterations", "2", *TINY]) == 0
    assert "global + refinement stage" in capsys.readouterr().out
    assert main(["info", str(output), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["refinement_stage"]["patch_size"] == 128 and info["info"]["refiner_training"]["iterations"] == 2
    # A third of the global grid's pixel (86 mm / 64 / 3 = 0.45 mm) would be finer than the
    # images' own 0.9 x 1.2 mm pixels, so the crops use 0.9 mm.
    assert info["refinement_stage"]["spacing_mm"] == pytest.approx(0.9)


def test_detect_with_the_bundled_model_flags_points_and_ranks_images_for_review(tmp_path, capsys):
    """The default model has an error model: expected errors, check flags, overlay legend and a review order."""
    import csv
    import shutil

    import numpy as np

    from SCNLandmarksLib.models.catalog import bundled_models_folder
    from SCNLandmarksLib.imaging.image_io import read_image

    sample = bundled_models_folder().parent / "Sample" / "isbi2015_151.jpg"
    folder = tmp_path / "images"
    folder.mkdir()
    shutil.copy(sample, folder / "usual.jpg")
    image = read_image(sample, spacing=(0.1, 0.1))
    blurred = image.array.copy()
    blurred[:, 1100:] = np.median(blurred)  # the face hidden: its points are expected far off
    write_image(type(image)(blurred, image.geometry), folder / "hidden_face.nrrd")
    output = tmp_path / "out"
    assert main(["detect", str(folder), "--output", str(output), "--spacing", "0.1", "--overlay", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "Review first" in printed and "check" in printed
    with open(output / "review_order.csv", newline="") as stream:
        order = list(csv.DictReader(stream))
    assert [row["image"] for row in order] == ["hidden_face", "usual"]
    assert float(order[0]["mean_expected_error_mm"]) > float(order[1]["mean_expected_error_mm"])
    assert int(order[0]["points_to_check"]) > int(order[1]["points_to_check"])
    with open(output / "landmarks.csv", newline="") as stream:
        rows = list(csv.DictReader(stream))
    assert all(row["expected_error_mm"] for row in rows) and {row["check"] for row in rows} == {"true", "false"}
    picture = read_image(output / "usual.png", spacing=(1.0, 1.0))
    assert picture.array.shape[-1] > image.array.shape[1]  # the legend panel beside the image


def test_distributed_shards_cover_every_image_exactly_once():
    from pathlib import Path

    from SCNLandmarksLib.running.cli import shard

    images = [Path(f"/data/img{n:03d}.png") for n in range(23)][::-1]  # listed in any order
    for count in (1, 2, 5, 23, 30):
        shares = [shard(images, f"{k}/{count}") for k in range(1, count + 1)]
        flat = [path for share in shares for path in share]
        assert sorted(flat) == sorted(images) and len(flat) == len(set(flat))
        assert max(map(len, shares)) - min(map(len, shares)) <= 1
    assert shard(images, "2/5") == shard(list(reversed(images)), "2/5")
    for bad in ("0/3", "4/3", "a/b", "3"):
        with pytest.raises(ValueError, match="K/N"):
            shard(images, bad)
    with pytest.raises(ValueError, match=r"job array numbered from 0, pass \$\(\(TASK_ID \+ 1\)\)/3"):
        shard(images, "0/3")


def test_distributed_shards_merge_into_one_summary(annotated_folder, trained_model, tmp_path):
    output = tmp_path / "out"
    for k in (1, 2, 3):
        assert main(["detect", str(annotated_folder), "--model", str(trained_model), "--output", str(output),
                     "--shard", f"{k}/3", "--device", "cpu"]) == 0
    rows = (output / "landmarks.csv").read_text().splitlines()[1:]
    assert sorted({row.split(",")[0] for row in rows}) == [f"case{n:02d}" for n in range(5)]
    assert len(rows) == 5 * 4
