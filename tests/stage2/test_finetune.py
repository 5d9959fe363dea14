"""Fine-tuning (LP-FT) on a tiny real image set: the split is reused, no test image is trained on, the run round-trips,
resumes after an interruption, exports one agreeing ONNX file, and its backbone goes back into stage 1 with provenance.

The images are scikit-learn's real handwritten digits (three classes, 32 px) and the backbone is the real
EfficientNet-Lite0 at 32 px: few steps, mechanics only. Accuracy is measured in ``bench/finetune.py``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "data"))

pytestmark = pytest.mark.slow

FAST = dict(input_size=32, epochs=2, batch_size=8, augment="none", patience=5)
AUG = {**FAST, "augment": "medical"}  # the resume test: augmentation must repeat exactly too


@pytest.fixture(scope="module")
def frozen(tmp_path_factory):
    """A digit tree (3 classes × 12), its default-backbone shards and a trained frozen run."""
    from prepare_digits import prepare

    from stage1_extract import extract
    from stage2_classify import train

    root = tmp_path_factory.mktemp("finetune")
    images = root / "digits"
    prepare(images, per_class=12, size=32)
    for digit in range(3, 10):  # three classes keep it small
        for f in (images / str(digit)).iterdir():
            f.unlink()
        (images / str(digit)).rmdir()
    extract(images, root / "feats", progress=False, workers=1)
    train(root / "feats", root / "frozen", epochs=5, progress=False)
    return root


@pytest.fixture(scope="module")
def tuned(frozen):
    from stage2_classify import finetune

    decoded = []
    import stage2_classify.finetuning.data as data

    original = data.decode_rows

    def spy(rows, which, prep):
        decoded.extend(rows.content_ids[which].tolist())
        return original(rows, which, prep)

    data.decode_rows = spy
    try:
        result = finetune(frozen / "frozen", frozen / "tuned", progress=False, **FAST)
    finally:
        data.decode_rows = original
    return result, decoded


def _splits(run: Path) -> dict:
    import pandas as pd

    frame = pd.read_csv(run / "split.csv")
    return dict(zip(frame["content_id"], frame["split"]))


def test_reuses_the_split_and_never_decodes_a_test_image(frozen, tuned):
    result, decoded = tuned
    before, after = _splits(frozen / "frozen"), _splits(Path(result.run_dir))
    assert before == after
    test_ids = {c for c, s in before.items() if s == "test"}
    assert test_ids and decoded and not test_ids & set(decoded)
    assert result.comparison["test_images"] == len(test_ids)
    assert result.comparison["test_images_not_in_frozen_run"] == 0
    d = result.comparison["accuracy_difference"]
    assert d["ci95"][0] <= d["difference"] <= d["ci95"][1] and 0 <= d["mcnemar_p"] <= 1


def test_the_run_round_trips_predicts_from_images_and_exports(frozen, tuned, tmp_path):
    import pandas as pd

    from stage2_classify import Classifier

    result, _ = tuned
    run = Path(result.run_dir)
    assert (run / "backbone.safetensors").is_file() and (run / "finetune.json").is_file()
    assert "Frozen vs fine-tuned" in (run / "report.html").read_text()
    clf = Classifier.load(run)
    assert clf.metadata.preprocessing["input_size"] == 32
    stored = pd.read_parquet(run / "predictions.parquet").set_index("content_id")
    test = stored[stored["split"] == "test"]
    paths = [str(frozen / "digits" / p) for p in test["path"]]
    df = clf.predict(paths, progress=False)
    assert df["error"].isna().all()
    np.testing.assert_allclose(df["probability"].to_numpy(float), test["probability"].to_numpy(float), atol=1e-4)

    import onnxruntime as ort

    from stage1_extract import load_pixels

    export = clf.export(tmp_path / "tuned.onnx", images=paths)
    assert export.max_probability_difference <= 1e-4
    session = ort.InferenceSession(str(tmp_path / "tuned.onnx"), providers=["CPUExecutionProvider"])
    pixels = load_pixels(paths, clf.metadata.preprocessing)
    probs = session.run(None, {"images": pixels.array})[0]
    np.testing.assert_allclose(probs.max(axis=1), df["probability"].to_numpy(float), atol=1e-4)


def test_stage1_extracts_with_the_backbone_and_records_provenance(frozen, tuned, tmp_path):
    import shardformat
    from shardformat import IncompatibleShardsError
    from stage1_extract import extract
    from stage2_classify import Classifier, train

    result, _ = tuned
    again = tmp_path / "again"
    extract(frozen / "digits", again, backbone_from=result.run_dir, progress=False, workers=1)
    mine = shardformat.read_features(again)
    made = shardformat.read_features(result.features)
    prov = mine.metadata.provenance
    assert prov["kind"] == "finetuned" and prov["base_backbone"] == "efficientnet_lite0"
    assert prov["run"] == os.fspath((frozen / "frozen").absolute())
    assert mine.metadata.compatibility_key() == made.metadata.compatibility_key()
    by_id = dict(zip(made.content_ids, made.features))
    for cid, vec in zip(mine.content_ids, mine.features):
        np.testing.assert_allclose(vec, by_id[cid], atol=1e-4)
    # stage 2 re-trains on the fine-tuned vectors as on any others
    again_run = train(again, tmp_path / "retrained", epochs=3, progress=False,
                      split_file=Path(result.run_dir) / "split.csv")
    assert again_run.metrics["test"]["n"] > 0 and "fine-tuned backbone" not in again_run.text
    # another split puts images the backbone trained on into validation/test: said, with the fix
    other = train(again, tmp_path / "other-split", epochs=1, progress=False, seed=5)
    assert "trained the fine-tuned backbone" in other.text and "--split-file" in other.text
    # evaluating the frozen-split run of those vectors on all of them: not held out, the backbone saw them
    from stage2_classify import evaluate

    with pytest.warns(UserWarning):
        ev = evaluate(again, again_run.run_dir, progress=False)
    assert not ev.held_out and ev.overlap["finetuned_backbone"] > 0
    # ... and never mixes them with pretrained vectors, nor lets a frozen run predict on them
    with pytest.raises(IncompatibleShardsError, match="fine-tuned"):
        Classifier.load(frozen / "frozen").predict(again, progress=False)
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for i, shard in enumerate(sorted(Path(frozen / "feats").glob("part-*.parquet"))[:1]
                              + sorted(again.glob("part-*.parquet"))[:1]):
        (mixed / f"part-{i:05d}.parquet").write_bytes(shard.read_bytes())
    with pytest.raises(IncompatibleShardsError):
        shardformat.read_features(mixed)


def test_contradicting_options_are_refused(tuned):
    from stage1_extract import prepare_model
    from stage1_extract.errors import OptionError

    result, _ = tuned
    with pytest.raises(OptionError, match="--input-size"):
        prepare_model(backbone_from=result.run_dir, input_size=64)
    with pytest.raises(OptionError, match="--onnx"):
        prepare_model(backbone_from=result.run_dir, onnx="x.onnx")


def test_resume_after_an_interruption_continues_where_it_stopped(frozen, tmp_path):
    from stage2_classify import Stage2Error, finetune
    from stage2_classify.finetuning import checkpoint

    original = checkpoint.EpochCheckpoint.on_epoch_end

    def stop_after_first(self, epoch, logs=None):
        original(self, epoch, logs)
        if epoch == 0:
            raise KeyboardInterrupt

    out = tmp_path / "tuned"
    checkpoint.EpochCheckpoint.on_epoch_end = stop_after_first
    try:
        with pytest.raises(KeyboardInterrupt):
            finetune(frozen / "frozen", out, progress=False, **{**AUG, "epochs": 3})
    finally:
        checkpoint.EpochCheckpoint.on_epoch_end = original
    assert not out.exists()
    state = json.loads((tmp_path / "tuned.checkpoints" / "state.json").read_text())
    assert state["epochs_done"] == 1
    with pytest.raises(Stage2Error, match="--resume"):
        finetune(frozen / "frozen", out, progress=False, **{**AUG, "epochs": 3})
    with pytest.raises(Stage2Error, match="other options"):
        finetune(frozen / "frozen", out, progress=False, resume=True, **{**AUG, "epochs": 4})
    resumed = finetune(frozen / "frozen", out, progress=False, resume=True, **{**AUG, "epochs": 3})
    assert len(resumed.history["loss"]) == 3
    assert not (tmp_path / "tuned.checkpoints").exists()
    uninterrupted = finetune(frozen / "frozen", tmp_path / "straight", progress=False, **{**AUG, "epochs": 3})
    np.testing.assert_allclose(resumed.history["loss"], uninterrupted.history["loss"], rtol=1e-3)
    np.testing.assert_allclose(resumed.history["val_loss"], uninterrupted.history["val_loss"], rtol=1e-3)


def test_finetune_cli_help_and_bad_unfreeze():
    from stage2_classify.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["finetune", "--run", "r", "--out", "o", "--unfreeze", "first:2"])
    args = build_parser().parse_args(["finetune", "--run", "r", "--out", "o", "--unfreeze", "last:2", "--lr", "1e-5"])
    assert args.unfreeze == "last:2" and args.learning_rate == 1e-5


def test_blocks_group_parameters_by_their_first_index():
    import torch

    from stage2_classify.finetuning.model import blocks

    net = torch.nn.Module()
    net.stem = torch.nn.Conv2d(3, 4, 3)
    net.blocks = torch.nn.Sequential(torch.nn.Conv2d(4, 4, 1), torch.nn.Conv2d(4, 4, 1))
    net.head = torch.nn.Conv2d(4, 8, 1)
    groups = blocks(net)
    assert groups == [["stem.weight", "stem.bias", "blocks.0.weight", "blocks.0.bias"],
                      ["blocks.1.weight", "blocks.1.bias", "head.weight", "head.bias"]]


@pytest.mark.gpu
@pytest.mark.skipif("not __import__('torch').cuda.is_available()", reason="needs a CUDA GPU")
def test_finetune_on_a_gpu_with_mixed_precision_matches_the_cpu_path(frozen, tmp_path):
    """The same fine-tune on CUDA (bfloat16 autocast for the backbone) writes a run that predicts like any other."""
    from stage2_classify import finetune

    result = finetune(frozen / "frozen", tmp_path / "gpu", progress=False, device="cuda", **FAST)
    assert result.comparison["test_images"] > 0
    assert len(result.history["loss"]) == FAST["epochs"] and np.isfinite(result.history["loss"]).all()


def test_a_moved_finetuned_run_still_predicts_exports_and_explains(frozen, tuned, tmp_path):
    """The provenance names the directory the run was written to; a copy elsewhere uses its own backbone file."""
    import shutil

    from stage1_extract.model.export import cache_dir
    from stage2_classify import Classifier

    result, _ = tuned
    moved = tmp_path / "elsewhere" / "tuned"
    shutil.copytree(result.run_dir, moved)
    for f in cache_dir().glob("*"):  # no cached export to fall back on: the backbone must be rebuilt from the copy
        f.unlink()
    original = tmp_path / "original"
    shutil.move(result.run_dir, original)
    try:
        clf = Classifier.load(moved)
        paths = sorted(str(p) for p in (frozen / "digits").glob("*/*.png"))[:3]
        df = clf.predict(paths, progress=False)
        assert df["error"].isna().all()
        assert clf.explain(paths[:1])["heatmap"].iloc[0].max() <= 1
        assert clf.export(tmp_path / "moved.onnx", images=paths).max_probability_difference <= 1e-4
    finally:
        shutil.move(original, result.run_dir)


def test_unfreeze_bn_trains_only_batchnorm(frozen, tmp_path):
    from stage2_classify import finetune

    result = finetune(frozen / "frozen", tmp_path / "bn", progress=False, unfreeze="bn", **{**FAST, "epochs": 1})
    assert json.loads((Path(result.run_dir) / "config.json").read_text())["unfreeze"] == "bn"


def test_refusals_come_before_any_work_and_the_cli_says_them_plainly(frozen, tuned, tmp_path, capsys):
    from stage2_classify import Stage2Error, finetune
    from stage2_classify.cli import main

    with pytest.raises(Stage2Error, match="frozen baseline"):
        finetune(frozen / "frozen", frozen / "frozen", progress=False, **FAST)
    with pytest.raises(Stage2Error, match="--epochs 0"):
        finetune(frozen / "frozen", tmp_path / "x", progress=False, **{**FAST, "epochs": 0})
    with pytest.raises(Stage2Error, match="blocks"):
        finetune(frozen / "frozen", tmp_path / "x", progress=False, unfreeze="last:99", **FAST)
    result, _ = tuned  # its OUT.features is there: a second fine-tune into the same --out must not mix with it
    assert main(["finetune", "--run", str(frozen / "frozen"), "--out", result.run_dir, "--input-size", "32"]) == 1
    err = capsys.readouterr().err
    assert "already holds feature shards" in err and "Traceback" not in err
    assert not (tmp_path / "x.checkpoints").exists()
