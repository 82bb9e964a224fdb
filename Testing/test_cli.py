"""The scn-landmarks command: train -> detect -> evaluate -> finetune on files, and its errors."""

import json
import subprocess
import sys

import pytest

from engine_fixtures import synthetic_cases
from SCNLandmarksLib.cli import main
from SCNLandmarksLib.image_io import write_image
from SCNLandmarksLib.landmark_io import read_mrk_json, write_mrk_json

TINY = ["--grid-size", "64", "64", "--filters", "8", "--levels", "3", "--spatial-downsample", "8",
        "--spatial-kernel", "5", "--device", "cpu", "--validate-every", "0"]


@pytest.fixture(scope="module")
def annotated_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("annotated")
    for case in synthetic_cases(5, seed=4):
        write_image(case.image, folder / f"{case.name}.nrrd")
        write_mrk_json(case.landmarks, folder / f"{case.name}.mrk.json")
    return folder


@pytest.fixture(scope="module")
def trained_model(annotated_folder, tmp_path_factory):
    model = tmp_path_factory.mktemp("models") / "tiny.scn.pt"
    code = main(["train", "--images", str(annotated_folder), "--output", str(model), "--iterations", "20", *TINY])
    assert code == 0 and model.exists()
    return model


def test_help_explains_every_command():
    result = subprocess.run([sys.executable, "-m", "SCNLandmarksLib.cli", "--help"], capture_output=True, text=True, check=True)
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
    # Running again does not overwrite the results silently.
    assert main(["detect", str(annotated_folder), "--model", str(trained_model), "--output", str(output), "--device", "cpu"]) == 2


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
    assert main(["info", str(tuned)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["landmarks"] == ["L1", "L2", "L3", "L4"] and info["training"]["iterations"] == 5
    assert info["info"]["parent_model"] == trained_model.name


def test_errors_are_one_clear_line_and_exit_code_2(annotated_folder, trained_model, tmp_path, capsys):
    assert main(["detect", str(annotated_folder), "--model", str(tmp_path / "missing.scn.pt")]) == 2
    assert "No model named or found" in capsys.readouterr().err
    assert main(["train", "--images", str(annotated_folder), "--output", str(trained_model), "--iterations", "1", *TINY]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["train", "--images", str(tmp_path), "--output", str(tmp_path / "x.scn.pt"), *TINY]) == 2
    assert "No images found" in capsys.readouterr().err


def test_progress_bar_in_a_log_is_throttled_but_keeps_validation_results():
    import io

    from SCNLandmarksLib.progress import Progress, TextProgressBar

    stream = io.StringIO()
    bar = TextProgressBar(stream=stream)
    for done in range(1, 50):
        bar(Progress("train", done, 100, 0.1 * done, loss=1.0, validation_mre_mm=2.5 if done == 30 else None))
    bar(Progress("train", 100, 100, 10.0, 0.0, loss=0.5))
    lines = stream.getvalue().splitlines()
    assert len(lines) == 3  # the first report, the validation at 30, the end
    assert "val MRE 2.50 mm" in lines[1] and "100/100" in lines[2]


def test_train_with_a_refinement_stage_writes_a_two_stage_model(annotated_folder, tmp_path, capsys):
    output = tmp_path / "two.scn.pt"
    assert main(["train", "--images", str(annotated_folder), "--output", str(output), "--iterations", "3",
                 "--refine-iterations", "2", *TINY]) == 0
    assert "global + refinement stage" in capsys.readouterr().out
    assert main(["info", str(output)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["refinement_stage"]["patch_size"] == 128 and info["info"]["refiner_training"]["iterations"] == 2
    # A third of the global grid's pixel (86 mm / 64 / 3 = 0.45 mm) would be finer than the
    # images' own 0.9 x 1.2 mm pixels, so the crops use 0.9 mm.
    assert info["refinement_stage"]["spacing_mm"] == pytest.approx(0.9)
