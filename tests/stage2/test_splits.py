"""Evaluation a user can trust: content-keyed splits that stay put, frozen splits, exactly-once rows,
order-independent training, held-out checks on evaluate, labels.json integrity, sweep's kept model."""

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

import shardformat
from stage2_classify import RunDirError, evaluate, load_dataset, load_run, predict, sweep, train
from stage2_classify.data.split import content_split, split_notes, unit_keys
from tests.support.synthetic import synthetic_metadata, write_synthetic_shards

FAST = dict(epochs=8, patience=3, batch_size=32, learning_rate=1e-2, progress=False)


def assignment(ids, split) -> dict:
    out = {}
    for name, rows in split.items():
        out.update({ids[i]: name for i in rows})
    return out


# --- the split function itself ---------------------------------------------------------------------------

def test_split_depends_only_on_content_and_seed():
    rng = np.random.default_rng(0)
    ids = np.array([f"id-{i}" for i in range(3000)], dtype=object)
    y = rng.integers(0, 5, 3000)
    base = assignment(ids, content_split(ids, y, seed=3))
    order = rng.permutation(3000)
    assert assignment(ids[order], content_split(ids[order], y[order], seed=3)) == base  # row order
    renamed = np.array(["zebra", "aardvark", "m", "b", "q"], dtype=object)[y]
    assert assignment(ids, content_split(ids, renamed, seed=3)) == base  # label spelling
    assert assignment(ids, content_split(ids, y, seed=4)) != base  # the seed matters
    sizes = {s: list(base.values()).count(s) / 3000 for s in ("train", "validation", "test")}
    assert abs(sizes["validation"] - 0.15) < 0.02 and abs(sizes["test"] - 0.15) < 0.02
    for c in range(5):  # per class (~600 images each) within a few percent too
        in_class = [base[i] for i in ids[y == c]]
        assert abs(in_class.count("test") / len(in_class) - 0.15) < 0.05


def test_adding_images_moves_no_earlier_image():
    rng = np.random.default_rng(1)
    ids = np.array([f"img-{i}" for i in range(1130)], dtype=object)
    y = rng.integers(0, 10, 1130)
    before = assignment(ids, content_split(ids, y, seed=0))
    more = np.concatenate([ids, [f"new-{i}" for i in range(50)]])
    after = assignment(more, content_split(more, np.concatenate([y, rng.integers(0, 10, 50)]), seed=0))
    assert {i: after[i] for i in ids} == before  # none of the 1,130 moved
    fewer = ids[100:]  # removing images moves none either
    assert assignment(fewer, content_split(fewer, y[100:], seed=0)) == {i: before[i] for i in fewer}


@pytest.mark.parametrize("n", [20, 60, 120, 400])
def test_small_collections_get_split_sizes_close_to_the_fractions(n):
    for seed in range(15):
        ids = np.array([f"s{seed}-{i}" for i in range(n)], dtype=object)
        split = content_split(ids, np.arange(n) % 3, seed=seed)
        # within 3 points (at least one image); below ~40 images one more per class may come from the top-up
        # that gives each of the 3 classes a validation and a test image
        slack = max(1, 0.03 * n) + (2 if n < 40 else 0)
        for name in ("validation", "test"):
            assert abs(len(split[name]) - 0.15 * n) <= slack, (n, seed, name, len(split[name]))


def test_duplicates_and_groups_share_a_split():
    ids = np.array([f"c{i}" for i in range(400)] + ["c0", "c1", "c1"], dtype=object)
    y = np.array([i % 4 for i in range(400)] + [0, 1, 1])
    groups = np.array([f"p{i // 5}" if i < 200 else None for i in range(400)] + [None, None, "p99"], dtype=object)
    split = content_split(ids, y, groups, seed=0)
    where = np.empty(len(ids), dtype=object)
    for name, rows in split.items():
        where[rows] = name
    for cid in ("c0", "c1"):
        assert len(set(where[ids == cid])) == 1  # exact duplicates together
    for g in {g for g in groups if g is not None}:
        assert len(set(where[groups == g])) == 1, g  # a patient never straddles splits
    # c1 is in patient p0 and in p99 (and ungrouped): those units are merged into one
    keys = unit_keys(ids, groups)
    assert len(set(keys[(ids == "c1") | (groups == "p0") | (groups == "p99")])) == 1


def test_every_class_with_three_units_gets_validation_and_test():
    for seed in range(20):
        ids = np.array([f"s{seed}-{i}" for i in range(200 + 3 + 2)], dtype=object)
        y = np.array([0] * 200 + [1] * 3 + [2] * 2)
        split = content_split(ids, y, seed=seed)
        for part in ("train", "validation", "test"):
            assert (y[split[part]] == 1).sum() == 1, (seed, part)
        notes = split_notes(y, ["big", "three", "two"], split, ids)
        if (y[split["test"]] == 2).sum() == 0:
            assert any("no test rows for two" in n for n in notes)


def test_split_notes_report_groups_that_straddle_a_user_split():
    ids = np.array(["a", "b", "c", "d"], dtype=object)
    groups = np.array(["p1", "p1", "p2", "p2"], dtype=object)
    split = {"train": np.array([0, 2]), "validation": np.array([], np.int64), "test": np.array([1, 3])}
    notes = split_notes(np.array([0, 1, 0, 1]), ["x", "y"], split, ids, groups)
    assert any("2 group(s) or exact-duplicate images span more than one split" in n for n in notes)


# --- end to end on shards --------------------------------------------------------------------------------

def rewrite(src, dst, *, order_seed: int, rename: bool = False, shards: int = 3, groups=None):
    """The same vectors (same content ids) written again: another row order, other paths, other files."""
    fs = shardformat.read_features(src)
    order = np.random.default_rng(order_seed).permutation(len(fs))
    paths = np.array([f"renamed/{i:05d}.jpg" for i in range(len(fs))], dtype=object) if rename else fs.paths
    for s, rows in enumerate(np.array_split(order, shards)):
        shardformat.write_shard(dst, f"part-re-{s:05d}.parquet", fs.metadata, paths=paths[rows],
                                labels=fs.labels[rows], content_ids=fs.content_ids[rows],
                                file_sizes=[1] * len(rows), mtimes_ns=[0] * len(rows), features=fs.features[rows],
                                groups=None if groups is None else [groups(p) for p in fs.paths[rows]])
    return dst


def split_by_content(run_dir) -> dict:
    table = pd.read_csv(Path(run_dir) / "split.csv")
    return dict(zip(table["content_id"], table["split"]))


def held_out_metrics(run) -> dict:
    return {k: run.metrics[k] for k in ("validation", "test")}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_synthetic_shards(tmp_path_factory.mktemp("splits") / "shards", counts=(60, 45, 30), spread=1.2,
                                  unlabelled=4)


def test_same_images_in_another_order_and_other_paths_give_identical_split_and_metrics(shards, tmp_path):
    a = train(shards, tmp_path / "a", seed=5, **FAST)
    b = train(rewrite(shards, tmp_path / "b_shards", order_seed=1, rename=True), tmp_path / "b", seed=5, **FAST)
    assert split_by_content(a.run_dir) == split_by_content(b.run_dir)
    assert held_out_metrics(a) == held_out_metrics(b) and a.history == b.history


def test_split_csv_freezes_the_split_and_the_old_format_still_works(shards, tmp_path):
    a = train(shards, tmp_path / "a", seed=1, **FAST)
    table = pd.read_csv(Path(a.run_dir) / "split.csv")
    assert list(table.columns) == ["path", "content_id", "label", "group", "split"] and len(table) == 135
    # fed back (to shards whose files were renamed: rows match by content_id), with another seed
    renamed = rewrite(shards, tmp_path / "renamed", order_seed=2, rename=True)
    b = train(renamed, tmp_path / "b", seed=9, split_file=Path(a.run_dir) / "split.csv", **FAST)
    assert split_by_content(b.run_dir) == split_by_content(a.run_dir)
    assert json.loads((Path(b.run_dir) / "config.json").read_text())["split"]["method"] == "file"
    # the old two-column path,split CSV is still accepted
    old = tmp_path / "old.csv"
    table[["path", "split"]].replace({"validation": "val"}).to_csv(old, index=False)
    c = train(shards, tmp_path / "c", seed=9, split_file=old, **FAST)
    assert split_by_content(c.run_dir) == split_by_content(a.run_dir)


def test_predictions_parquet_holds_every_labelled_row(shards, tmp_path):
    r = train(shards, tmp_path / "run", **FAST)
    table = pq.read_table(Path(r.run_dir) / "predictions.parquet").to_pandas()
    assert list(table.columns) == ["path", "content_id", "label", "split", "predicted", "probability",
                                   "prob_class_0", "prob_class_1", "prob_class_2"]
    assert len(table) == 135 and table["path"].is_unique and set(table["split"]) == {"train", "validation", "test"}
    test = table[table.split == "test"]
    assert (test["label"] == test["predicted"]).mean() == pytest.approx(r.metrics["test"]["accuracy"])


def test_duplicate_rows_never_reach_training(shards, tmp_path):
    dup = tmp_path / "dup"
    shutil.copytree(shards, dup)
    first = shardformat.list_shards(dup)[0]
    shutil.copy(first, dup / "part-synthetic-99999.parquet")  # a copied shard: every row twice
    n_copied = pq.read_metadata(first).num_rows
    with pytest.warns(UserWarning, match=f"{n_copied} row\\(s\\) repeat a path"):
        ds = load_dataset(dup)
    assert len(ds.y) == 135 and len(set(ds.paths)) == 135 and ds.duplicate_rows_dropped == n_copied
    r = train(dup, tmp_path / "run", dataset=ds, **FAST)
    table = pd.read_csv(Path(r.run_dir) / "split.csv")
    assert len(table) == 135 and table["path"].is_unique
    assert f"{n_copied} shard rows repeated a path" in r.format()


def test_evaluate_warns_and_marks_output_when_not_held_out(shards, tmp_path):
    r = train(shards, tmp_path / "run", **FAST)
    with pytest.warns(UserWarning, match="not a held-out estimate"):
        res = evaluate(shards, r.run_dir, out=tmp_path / "m.json")
    assert not res.held_out and res.overlap["train"] > 0 and "WARNING" in res.format()
    saved = json.loads((tmp_path / "m.json").read_text())
    assert saved["held_out"] is False and "not a held-out estimate" in saved["warning"]
    fresh = write_synthetic_shards(tmp_path / "fresh", counts=(20, 20, 20), spread=1.2, seed=11, prefix="part-z")
    fresh_rows = shardformat.read_features(fresh)
    assert not set(fresh_rows.content_ids) & set(shardformat.read_features(shards).content_ids)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        res = evaluate(fresh, r.run_dir)
    assert res.held_out and res.overlap == {"train": 0, "validation": 0, "test": 0} and "WARNING" not in res.format()
    assert "accuracy" in res.format() and res.metrics["n"] == 60


def test_a_reordered_or_edited_labels_json_is_refused(shards, tmp_path):
    r = train(shards, tmp_path / "run", **FAST)
    labels = Path(r.run_dir) / "labels.json"
    original = labels.read_text()
    labels.write_text(json.dumps(list(reversed(json.loads(original)))))
    with pytest.raises(RunDirError, match="labels.json no longer matches the model"):
        load_run(r.run_dir)
    with pytest.raises(RunDirError, match="reordered or edited"):
        predict(shards, r.run_dir, tmp_path / "p.parquet")
    labels.write_text(original.replace("class_1", "class_one"))
    with pytest.raises(RunDirError):
        load_run(r.run_dir)
    labels.write_text(original)
    assert load_run(r.run_dir).classes == ["class_0", "class_1", "class_2"]


def test_sweep_keeps_the_best_model_and_uses_the_train_split(shards, tmp_path):
    rows = sweep(shards, tmp_path / "sw", hidden=[(), (16,)], dropout=[0.2], learning_rate=[1e-2], epochs=4,
                 batch_size=32, seed=2, folds=3, progress=False)
    scores = [r["cv_macro_f1"] for r in rows]
    assert scores == sorted(scores, reverse=True)  # ranked by cross-validated macro-F1 by default
    best = tmp_path / "sw" / "best"
    run = load_run(best)
    config = json.loads((best / "config.json").read_text())
    assert (config["hidden"] or ["linear"]) == [int(h) if h.isdigit() else h for h in rows[0]["hidden"].split("x")]
    trained = train(shards, tmp_path / "t", seed=2, **FAST)
    assert split_by_content(best) == split_by_content(trained.run_dir)  # sweep and train: the same split
    assert json.loads((tmp_path / "sw" / "sweep.json").read_text())["best_run"] == str(best)
    assert run.classes == ["class_0", "class_1", "class_2"]


def test_groups_from_the_shards_never_straddle_splits(shards, tmp_path):
    grouped = rewrite(shards, tmp_path / "g", order_seed=0, groups=lambda p: f"patient{int(p[-9:-4]) % 17}")
    r = train(grouped, tmp_path / "run", **FAST)
    table = pd.read_csv(Path(r.run_dir) / "split.csv")
    assert table["group"].notna().all()
    assert table.groupby("group")["split"].nunique().max() == 1
    assert set(table["split"]) == {"train", "validation", "test"}
