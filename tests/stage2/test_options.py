"""Every stage-2 option is defined once: the functions' keyword defaults and the CLI's flags come from the option
dataclasses, old spellings keep working, and training leaves matplotlib's backend alone."""

from __future__ import annotations

import dataclasses
import inspect

import pytest

from stage2_classify import Stage2Error, TrainOptions, cross_validate, sweep, train
from stage2_classify.cli import build_parser
from stage2_classify.doctor import doctor
from stage2_classify.inference.classifier import Classifier
from stage2_classify.options import CVOptions, DoctorOptions, PredictOptions, SweepGrid


def _defaults(function) -> dict:
    return {name: p.default for name, p in inspect.signature(function).parameters.items()
            if p.default is not inspect.Parameter.empty}


def _fields(cls) -> dict:
    return {f.name: f.default for f in dataclasses.fields(cls)}


def test_train_keywords_are_train_options_fields_with_their_defaults():
    keywords = _defaults(train)
    for extra in ("dataset", "progress"):
        keywords.pop(extra)
    assert keywords == _fields(TrainOptions)


def test_sweep_cv_doctor_and_predict_take_their_defaults_from_the_option_classes():
    grid = _fields(SweepGrid)
    # a sweep names its heads itself (hidden 0: the tuned linear head, others MLPs), so it has no ``head``
    shared = {k: v for k, v in _fields(TrainOptions).items() if k not in grid and k != "head"}
    keywords = _defaults(sweep)
    assert {k: keywords[k] for k in grid} == grid
    assert {k: keywords[k] for k in shared} == shared
    cv = _defaults(cross_validate)
    assert {k: cv[k] for k in _fields(CVOptions)} == _fields(CVOptions)
    train_options = _fields(TrainOptions)
    assert all(cv[k] == train_options[k] for k in ("seed", "hidden", "dropout", "learning_rate", "epochs",
                                                 "batch_size", "weight_decay", "patience", "class_weight"))
    assert cv["head"] == train_options["head"] == "auto"  # cv estimates the model train makes
    checks = _defaults(doctor)
    assert {k: checks[k] for k in _fields(DoctorOptions)} == _fields(DoctorOptions)
    assert _defaults(Classifier.predict)["top_k"] == PredictOptions.top_k
    assert all(_defaults(f)["progress"] is True for f in (train, sweep, cross_validate, doctor))


def test_cli_defaults_are_the_option_defaults_and_old_spellings_still_parse():
    parser = build_parser()
    args = parser.parse_args(["train", "--shards", "f", "--out", "r", "--quiet", "--learning-rate", "0.01"])
    assert args.features == "f" and args.progress is False and args.learning_rate == 0.01
    args = parser.parse_args(["train", "--features", "f", "--out", "r"])
    assert {k: getattr(args, k) for k in _fields(TrainOptions)} == _fields(TrainOptions) and args.progress
    args = parser.parse_args(["sweep", "--features", "f", "--sort-by", "val_loss", "--lr", "1e-3,3e-4"])
    assert args.rank_by == "val_loss" and args.learning_rate == [1e-3, 3e-4] and args.hidden == SweepGrid.hidden
    args = parser.parse_args(["predict", "--shards", "f", "--model", "r", "--out", "p.csv"])
    assert (args.features, args.run, args.top_k) == ("f", "r", PredictOptions.top_k)
    args = parser.parse_args(["doctor", "--features", "f", "--out", "d"])
    assert {k: getattr(args, k) for k in _fields(DoctorOptions)} == _fields(DoctorOptions)


def test_every_stage2_error_derives_from_stage2error_and_keeps_its_builtin_base():
    import stage2_classify as s2

    assert issubclass(s2.DatasetError, (Stage2Error, ValueError)) and issubclass(s2.DatasetError, ValueError)
    assert issubclass(s2.RunDirError, Stage2Error) and issubclass(s2.RunDirError, FileNotFoundError)
    assert issubclass(s2.BackendError, Stage2Error) and issubclass(s2.BackendError, RuntimeError)
    assert issubclass(s2.ExportError, Stage2Error) and issubclass(s2.DoctorError, s2.DatasetError)


def test_old_keyword_names_still_work_with_a_warning(tmp_path):
    from stage2_classify import load_dataset

    with pytest.warns(DeprecationWarning, match="shards="):
        with pytest.raises(Stage2Error, match="no feature shards"):
            load_dataset(shards=tmp_path)


def test_train_leaves_matplotlibs_backend_as_it_found_it(tmp_path):
    import matplotlib

    from tests.support.synthetic import write_synthetic_shards

    before = matplotlib.get_backend()
    matplotlib.use("svg")  # a notebook's backend, as far as training can tell: anything but Agg
    try:
        shards = write_synthetic_shards(tmp_path / "shards", (12, 12, 12), dim=8)
        result = train(shards, tmp_path / "run", epochs=2, hidden=(8,), progress=False)
        assert (tmp_path / "run" / "curves.png").is_file() and result.run_dir
        assert matplotlib.get_backend() == "svg"
    finally:
        matplotlib.use(before)
