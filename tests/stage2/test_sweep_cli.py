"""Stage 2 sweeps and the command line: table sorted by validation score, --help everywhere, end to end."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from stage2_classify import sweep
from stage2_classify.cli import build_parser, main
from tests.support.synthetic import write_synthetic_shards

REPO = Path(__file__).resolve().parents[2]
CONSOLE_SCRIPT = Path(sys.executable).with_name("stage2-classify")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    # overlapping clusters so that the heads differ in validation accuracy
    return write_synthetic_shards(tmp_path_factory.mktemp("sweep") / "shards", counts=(60, 60, 60), spread=0.5,
                                  unlabelled=3)


def test_sweep_table_ranked_by_cross_validated_score_with_paired_intervals(shards, tmp_path, capsys):
    rows = sweep(shards, tmp_path / "sweep", hidden=[(0,), (16,)], dropout=[0.0, 0.3],
                 learning_rate=[1e-2], epochs=4, batch_size=32, folds=3, progress=True, rank_by="val_accuracy")
    assert len(rows) == 4 and rows[0]["rank"] == 1
    scores = [r["cv_accuracy"] for r in rows]  # val_accuracy: the older spelling of accuracy
    assert scores == sorted(scores, reverse=True)
    assert {r["hidden"] for r in rows} == {"linear", "16"}
    linear = [r for r in rows if r["hidden"] == "linear"]
    assert linear[0]["cv_macro_f1"] == linear[1]["cv_macro_f1"]  # dropout means nothing to a linear head
    best, rest = rows[0], [r for r in rows if r["rank"] > 1]
    assert best["diff_vs_best"] == 0 and best["indistinguishable_from_best"]
    for r in rest:
        assert r["diff_vs_best"] <= 0 and r["diff_low"] <= r["diff_vs_best"] <= r["diff_high"]
        assert r["indistinguishable_from_best"] == (r["diff_low"] <= 0 <= r["diff_high"])
        assert 0 <= r["cv_macro_f1_low"] <= r["cv_macro_f1"] <= r["cv_macro_f1_high"] <= 1
    with open(tmp_path / "sweep" / "sweep.csv") as fh:
        table = list(csv.DictReader(fh))
    assert [r["hidden"] for r in table] == [r["hidden"] for r in rows]
    saved = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert saved["rows"] == rows and saved["rank_by"] == "accuracy" and saved["folds"] == 3
    assert set(saved["best_run_metrics"]) == {"validation", "test"}
    printed = capsys.readouterr().out
    assert "ranked by cross-validated accuracy" in printed and printed.count("linear") >= 2
    assert (tmp_path / "sweep" / "sweep.txt").read_text().startswith("ranked by cross-validated accuracy")


def test_every_subcommand_has_help(capsys):
    for command in ("train", "evaluate", "predict", "sweep"):
        with pytest.raises(SystemExit) as exit_:
            main([command, "--help"])
        assert exit_.value.code == 0
        out = capsys.readouterr().out
        assert out.startswith(f"usage: stage2-classify {command}") and "--shards" in out
    with pytest.raises(SystemExit):
        main(["export", "--help"])
    assert "--precision" in capsys.readouterr().out
    assert "train,evaluate,predict,export,explain,sweep,cv,doctor,finetune" in build_parser().format_help()


def test_help_is_instant_and_both_entry_points_work():
    code = ("import sys, stage2_classify.cli as c\ntry:\n    c.main(['--help'])\nexcept SystemExit:\n    pass\n"
            "assert 'keras' not in sys.modules and 'torch' not in sys.modules, 'heavy import in --help'")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([sys.executable, "-m", "stage2_classify", "sweep", "--help"], capture_output=True,
                       text=True, cwd=REPO, timeout=60)
    assert r.returncode == 0 and "--sort-by" in r.stdout
    if CONSOLE_SCRIPT.exists():
        r = subprocess.run([str(CONSOLE_SCRIPT), "predict", "--help"], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and "--model" in r.stdout


def test_cli_train_evaluate_predict_sweep(shards, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--shards", str(shards), "--out", str(run), "--epochs", "4", "--hidden", "16",
                 "--dropout", "0.1", "--lr", "0.01", "--batch-size", "32", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "stage 2 done" in out and "test" in out and "3 unlabelled rows left out" in out
    config = json.loads((run / "config.json").read_text())
    assert config["hidden"] == [16] and config["dropout"] == 0.1 and config["epochs"] == 4
    assert main(["evaluate", "--shards", str(shards), "--model", str(run), "--out", str(tmp_path / "m.json")]) == 0
    assert "accuracy" in capsys.readouterr().out and (tmp_path / "m.json").is_file()
    assert main(["predict", "--shards", str(shards), "--model", str(run), "--out", str(tmp_path / "p.parquet")]) == 0
    assert pq.read_table(tmp_path / "p.parquet").num_rows == 183
    assert main(["sweep", "--shards", str(shards), "--out", str(tmp_path / "sw"), "--hidden", "0,16",
                 "--epochs", "2", "--folds", "3", "--rank-by", "val_macro_f1"]) == 0
    assert "ranked by cross-validated macro f1" in capsys.readouterr().out and (tmp_path / "sw" / "best" / "run.json").is_file()
    assert main(["cv", "--shards", str(shards), "--out", str(tmp_path / "cv"), "--folds", "3", "--epochs", "2",
                 "--quiet"]) == 0
    assert "cross-validation: 3 folds, 180 images, auto head" in capsys.readouterr().out
    assert pq.read_table(tmp_path / "cv" / "oof_predictions.parquet").num_rows == 180


def test_cli_errors_name_the_problem(shards, tmp_path, capsys):
    assert main(["predict", "--shards", str(shards), "--model", str(tmp_path / "nope"), "--out",
                 str(tmp_path / "x.csv")]) == 1
    assert "no such run directory" in capsys.readouterr().err
    assert main(["train", "--shards", str(tmp_path / "empty"), "--out", str(tmp_path / "r")]) == 1
    assert "no feature shards" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--shards", str(shards), "--out", str(tmp_path / "r"), "--hidden", "abc"])
    assert "hidden sizes look like" in capsys.readouterr().err


def test_cli_subprocess_shows_keras_progress(shards, tmp_path):
    r = subprocess.run([sys.executable, "-m", "stage2_classify", "train", "--shards", str(shards), "--out",
                        str(tmp_path / "run"), "--epochs", "2", "--hidden", "8"], capture_output=True, text=True,
                       cwd=REPO, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "Epoch 1/2" in r.stdout and "val_loss" in r.stdout and "stage 2 done" in r.stdout
