"""The data doctor's mechanics on synthetic vectors with planted problems (real images: test_doctor_real.py)."""

import json
import re
from html.parser import HTMLParser

import numpy as np
import pandas as pd
import pytest

import shardformat
from stage2_classify.doctor import DoctorError, doctor
from tests.support.synthetic import synthetic_metadata

CLASSES = ["ant", "bee", "cow", "dog"]


def _oof(x: np.ndarray, labels: list[str], paths: list[str]) -> pd.DataFrame:
    """Out-of-fold probabilities from scikit-learn (the doctor only needs the columns, not how they were made)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    classes = sorted(set(labels))
    y = np.searchsorted(classes, labels)
    p = cross_val_predict(LogisticRegression(C=0.1, max_iter=500), x, y, method="predict_proba",
                          cv=StratifiedKFold(5, shuffle=True, random_state=0))
    return pd.DataFrame({"path": paths, "label": labels, **{f"prob_{c}": p[:, i] for i, c in enumerate(classes)}})


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """4 Gaussian classes of 80, then: 12 flipped labels, 3 exact copies under another class and 2 under the
    same one, 5 near-copies (2 under another class), 3 outliers pointing nowhere near any class."""
    rng = np.random.default_rng(0)
    dim = 64
    centres = rng.normal(0, 4, size=(len(CLASSES), dim))
    y = np.repeat(np.arange(len(CLASSES)), 80)
    x = centres[y] + rng.normal(0, 2.5, size=(len(y), dim))
    labels = [CLASSES[k] for k in y]
    paths = [f"{labels[i]}/img_{i:04d}.png" for i in range(len(y))]
    ids = [f"id{i}" for i in range(len(y))]
    truth = {"flipped": set(), "exact_conflict": [], "exact_same": [], "near": [], "outliers": set()}
    for i in rng.choice(len(y), 12, replace=False):
        labels[i] = CLASSES[(y[i] + 1 + rng.integers(3)) % 4]
        truth["flipped"].add(paths[i])
    rows = []  # extra rows: (path, label, content_id, vector)
    picks = [i for i in rng.permutation(len(y)) if paths[i] not in truth["flipped"]][:13]
    for n, i in enumerate(picks[:5]):
        other = CLASSES[(y[i] + 1) % 4] if n < 3 else labels[i]
        p = f"{other}/copy_{i:04d}.png"
        rows.append((p, other, ids[i], x[i]))
        truth["exact_conflict" if n < 3 else "exact_same"].append((paths[i], p))
    for n, i in enumerate(picks[5:10]):
        other = CLASSES[(y[i] + 2) % 4] if n < 2 else labels[i]
        p = f"{other}/near_{i:04d}.png"
        rows.append((p, other, f"near{i}", x[i] + rng.normal(0, 0.05, dim)))
        truth["near"].append((paths[i], p))
    for n in range(3):
        p = f"{CLASSES[n]}/odd_{n}.png"
        rows.append((p, CLASSES[n], f"odd{n}", rng.normal(0, 6, dim) * (rng.random(dim) < 0.3)))
        truth["outliers"].add(p)
    paths += [r[0] for r in rows]
    labels += [r[1] for r in rows]
    ids += [r[2] for r in rows]
    x = np.vstack([x, np.array([r[3] for r in rows])]).astype(np.float32)
    shards = tmp_path_factory.mktemp("doctor") / "feats"
    meta = synthetic_metadata(dim)
    for s, idx in enumerate(np.array_split(np.random.default_rng(1).permutation(len(x)), 2)):
        shardformat.write_shard(shards, f"part-t-{s:05d}.parquet", meta, paths=[paths[i] for i in idx],
                                labels=[labels[i] for i in idx], content_ids=[ids[i] for i in idx],
                                file_sizes=[1] * len(idx), mtimes_ns=[0] * len(idx), features=x[idx])
    oof = _oof(x, labels, paths)
    return {"shards": shards, "oof": oof, "truth": truth, "paths": paths, "labels": labels, "ids": ids}


def test_finds_planted_problems(planted, tmp_path):
    truth = planted["truth"]
    result = doctor(planted["shards"], tmp_path / "out", oof=planted["oof"])

    issues = result.label_issues
    assert list(issues.columns) == ["path", "label", "suggested_label", "score"]
    assert issues["score"].is_monotonic_decreasing
    top = set(issues["path"].head(len(truth["flipped"]) + 3 + 2))  # flips + conflicting copies + near-copies
    assert len(truth["flipped"] & top) >= 0.8 * len(truth["flipped"])
    row = issues.set_index("path").loc[sorted(truth["flipped"] & top)[0]]
    assert row["suggested_label"] != row["label"]

    dups = result.duplicates
    exact = dups[dups["kind"] == "exact"]
    pairs = {frozenset(p) for p in zip(exact["path_a"], exact["path_b"])}
    assert pairs == {frozenset(p) for p in truth["exact_conflict"] + truth["exact_same"]}
    assert exact["label_conflict"].head(3).all() and not exact["label_conflict"].tail(2).any()  # conflicts first
    near = dups[dups["kind"] == "near"]
    near_pairs = {frozenset(p) for p in zip(near["path_a"], near["path_b"])}
    assert near_pairs == {frozenset(p) for p in truth["near"]}  # every planted pair, nothing else
    assert (near["similarity"] >= 0.95).all() and near["label_conflict"].head(2).all()

    assert truth["outliers"] <= set(result.outliers["path"])
    assert len(result.outliers) <= 6

    c = result.summary["counts"]
    assert c["exact_conflicting_groups"] == 3 and c["exact_pairs"] == 5 and c["near_pairs"] == 5
    assert c["rows"] == 333 and c["scored"] == 333
    # no run given: the split train makes by default, keyed by content, so exact copies never straddle it
    assert result.summary["splits"]["known"] and "content-keyed" in result.summary["splits"]["source"]
    assert not exact["leak"].any() and (exact["split_a"] == exact["split_b"]).all()
    assert set(dups["split_a"]) <= {"train", "validation", "test"}
    assert c["leak_pairs"] == int(near["leak"].sum())
    for name in ("label_issues.csv", "duplicates.csv", "outliers.csv", "doctor.json", "report.html"):
        assert (tmp_path / "out" / name).is_file()
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".tmp")]
    on_disk = pd.read_csv(tmp_path / "out" / "duplicates.csv")
    assert list(on_disk.columns)[:8] == ["path_a", "path_b", "kind", "similarity", "label_a", "label_b",
                                         "split_a", "split_b"]
    saved = json.loads((tmp_path / "out" / "doctor.json").read_text())
    assert saved["counts"] == c and saved["thresholds"]["near"] == 0.95 and "cleanlab" in saved["method"]["label_issues"]
    assert "leakage" in result.format()


def test_leakage_from_split_file_and_run_dir(planted, tmp_path):
    truth = planted["truth"]
    a, b = truth["exact_same"][0]
    na, nbb = truth["near"][0]
    split = {p: "train" for p in planted["paths"]}
    split[b] = "test"
    split[nbb] = "val"
    pd.DataFrame({"path": list(split), "split": list(split.values())}).to_csv(tmp_path / "split.csv", index=False)
    result = doctor(planted["shards"], tmp_path / "a", oof=planted["oof"], split_file=tmp_path / "split.csv",
                    report=False)
    leaks = result.duplicates[result.duplicates["leak"]]
    assert {frozenset(p) for p in zip(leaks["path_a"], leaks["path_b"])} == {frozenset((a, b)), frozenset((na, nbb))}
    assert set(leaks["split_a"]) | set(leaks["split_b"]) == {"train", "test", "validation"}
    assert result.summary["counts"]["leak_pairs"] == 2 and result.report is None

    run = tmp_path / "old-run"  # a run directory as older versions of train wrote it (split.json)
    run.mkdir()
    (run / "split.json").write_text(json.dumps({"train": [p for p in planted["paths"] if p != b], "test": [b]}))
    result = doctor(planted["shards"], tmp_path / "b", oof=planted["oof"], run=run, report=False)
    assert result.summary["counts"]["leak_pairs"] == 1 and result.summary["splits"]["source"].endswith("split.json")

    run = tmp_path / "run"  # split.csv as train writes it now: matched by path first, so copies can still leak
    run.mkdir()
    rows = pd.DataFrame({"path": list(split), "split": list(split.values())})
    rows["content_id"] = rows["path"].map(dict(zip(planted["paths"], planted["ids"])))
    rows.loc[rows["path"] == nbb, "split"] = "train"
    rows.to_csv(run / "split.csv", index=False)
    (run / "split.json").write_text("{}")  # ignored: split.csv wins
    result = doctor(planted["shards"], tmp_path / "c", oof=planted["oof"], run=run, report=False)
    assert result.summary["counts"]["leak_pairs"] == 1 and result.summary["splits"]["source"].endswith("split.csv")
    with pytest.raises(DoctorError, match="no split.csv"):
        doctor(planted["shards"], tmp_path / "d", oof=planted["oof"], run=tmp_path / "nothing", report=False)


def test_oof_from_a_file_and_bad_oof(planted, tmp_path):
    oof = planted["oof"]
    oof.to_parquet(tmp_path / "oof.parquet")
    from_file = doctor(planted["shards"], tmp_path / "a", oof=tmp_path / "oof.parquet", report=False)
    assert len(from_file.label_issues) > 0

    partial = oof.iloc[: len(oof) // 2]
    result = doctor(planted["shards"], tmp_path / "b", oof=partial, report=False)
    assert result.summary["counts"]["scored"] == len(partial)
    assert any("no out-of-fold probabilities" in n for n in result.summary["notes"])
    assert any(n.startswith("cleanlab: ") for n in result.summary["notes"])  # its warning on a small class

    with pytest.raises(DoctorError, match="prob_<class>"):
        doctor(planted["shards"], tmp_path / "c", oof=oof[["path", "label"]], report=False)
    stale = oof.copy()
    stale.loc[:5, "label"] = "zebra"
    with pytest.raises(DoctorError, match="stale"):
        doctor(planted["shards"], tmp_path / "d", oof=stale, report=False)
    elsewhere = oof.assign(path="x/" + oof["path"])
    with pytest.raises(DoctorError, match="none of the shards' labelled paths"):
        doctor(planted["shards"], tmp_path / "e", oof=elsewhere, report=False)
    with pytest.raises(DoctorError, match="no feature shards"):
        doctor(tmp_path / "nothing", tmp_path / "f", oof=oof)
    with pytest.raises(ValueError, match="near_threshold"):
        doctor(planted["shards"], tmp_path / "g", oof=oof, near_threshold=1.5)


class _Sections(HTMLParser):
    def __init__(self):
        super().__init__()
        self.ids, self.images, self.remote = set(), 0, []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "section":
            self.ids.add(attrs.get("id"))
        for key in ("src", "href"):
            value = attrs.get(key) or ""
            if value and not value.startswith(("data:", "#")):
                self.remote.append(value)
        if tag == "img":
            self.images += 1


def test_report_without_image_files_says_so(planted, tmp_path):
    result = doctor(planted["shards"], tmp_path / "out", oof=planted["oof"], images=tmp_path / "no-such-folder")
    text = result.report.read_text()
    parser = _Sections()
    parser.feed(text)
    assert {"summary", "label-issues", "duplicates", "outliers", "map", "method"} <= parser.ids
    assert parser.remote == []  # self-contained: nothing fetched
    assert "missing image files:" in text and "file missing" in text
    assert "<svg" in text and "label issue" in text


def test_cli(planted, tmp_path, capsys):
    from stage2_classify.cli import main

    planted["oof"].to_csv(tmp_path / "oof.csv", index=False)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "report.html").write_text("a report from an earlier run")
    assert main(["doctor", "--shards", str(planted["shards"]), "--out", str(tmp_path / "out"),
                 "--oof", str(tmp_path / "oof.csv"), "--near-threshold", "0.99", "--no-report"]) == 0
    out = capsys.readouterr().out
    assert "doctor done" in out and "exact dups      5 groups (3 with conflicting labels)" in out
    assert not (tmp_path / "out" / "report.html").exists()  # not left to contradict the new files
    assert main(["doctor", "--shards", str(tmp_path / "none"), "--out", str(tmp_path / "o2"),
                 "--oof", str(tmp_path / "oof.csv")]) == 1
    assert "no feature shards" in capsys.readouterr().err


def test_without_oof_runs_cross_validation(planted, tmp_path):
    result = doctor(planted["shards"], tmp_path / "out", folds=4, report=False)
    assert result.summary["method"]["out_of_fold"] == "4-fold cross-validation, seed 0"
    assert result.summary["counts"]["scored"] == 333
    flipped = planted["truth"]["flipped"]
    assert len(flipped & set(result.label_issues["path"].head(len(flipped) + 5))) >= 0.8 * len(flipped)


def test_unlabelled_or_single_class_shards_still_get_duplicates_and_outliers(tmp_path):
    from tests.support.synthetic import write_synthetic_shards

    shards = write_synthetic_shards(tmp_path / "feats", counts=(30,), unlabelled=40, dim=16)
    result = doctor(shards, tmp_path / "out")
    assert any("label issues not checked" in n for n in result.summary["notes"])
    assert result.label_issues.empty and result.summary["counts"]["scored"] == 0
    assert result.summary["counts"]["rows"] == 70 and result.summary["counts"]["labelled"] == 30
    assert result.report.is_file()


def test_thumbnails_come_from_the_root_stage1_recorded(tmp_path):
    from stage1_extract import extract
    from shardformat.layout import read_run_summary
    from tests.support.helpers import make_image_tree, make_tiny_onnx

    images = make_image_tree(tmp_path / "images", per_class=6)
    extract(images, tmp_path / "feats", onnx=make_tiny_onnx(tmp_path / "tiny.onnx"), input_size=32, batch_size=8,
            workers=1, progress=False)
    assert read_run_summary(tmp_path / "feats")["images_root"] == str(images.resolve())
    fs = shardformat.read_features(tmp_path / "feats")
    classes = sorted(set(fs.labels))
    oof = pd.DataFrame({"path": fs.paths, **{f"prob_{c}": np.full(len(fs), 1 / 3) for c in classes}})
    result = doctor(tmp_path / "feats", tmp_path / "out", oof=oof, outlier_z=-100)  # every image an "outlier"
    text = result.report.read_text()
    assert len(set(re.findall(r'src="(data:image/jpeg[^"]+)"', text))) == len(fs) and "file missing" not in text
    (images / "cat" / "cat_000.jpg").unlink()
    text = doctor(tmp_path / "feats", tmp_path / "out", oof=oof, outlier_z=-100).report.read_text()
    assert len(set(re.findall(r'src="(data:image/jpeg[^"]+)"', text))) == len(fs) - 1
    assert "missing image files: 1 under" in text and "file missing" in text
