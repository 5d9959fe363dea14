"""The doctor's done-when check on real images and real backbone features.

Animal-MNIST photos with planted problems (tests/dirty_set.py): 20 flipped labels, 6 byte-identical copies
under another class, 12 slightly altered copies (6 under another class) and 3 photographs that are no
animal at all. Extracted with the default backbone (EfficientNet-Lite0, real ImageNet weights), checked
with out-of-fold probabilities from 5-fold cross-validation.
"""

import pytest

from stage1_extract import extract
from stage2_classify import train
from stage2_classify.doctor import doctor
from tests.support.dirty_set import make_dirty_animals

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def dirty(tmp_path_factory):
    base = tmp_path_factory.mktemp("doctor-real")
    ds = make_dirty_animals(base / "images", per_class=40)
    extract(ds.root, base / "feats", batch_size=16, progress=False)
    return base, ds


@pytest.fixture(scope="module")
def findings(dirty, tmp_path_factory):
    base, _ = dirty
    return doctor(base / "feats", tmp_path_factory.mktemp("doctor-out") / "doctor")


def test_flipped_labels_rank_near_the_top(dirty, findings):
    _, ds = dirty
    wrong = set(ds.flipped) | {b for _, b in ds.exact_copies} | {b for a, b in ds.altered_copies
                                                                 if a.split("/")[0] != b.split("/")[0]}
    issues = findings.label_issues
    top = list(issues["path"].head(int(1.25 * len(wrong))))
    found = [p for p in ds.flipped if p in top]
    assert len(found) >= 0.75 * len(ds.flipped), (len(found), issues.head(40))
    # where a flipped image is found, the suggested label is mostly its true class
    rows = issues.set_index("path").loc[found]
    assert sum(rows.loc[p, "suggested_label"] == ds.flipped[p] for p in found) >= 0.8 * len(found)
    # the head of the list is mostly planted mistakes, not noise
    assert len(set(top[:len(wrong)]) & wrong) >= 0.7 * len(wrong)


def test_every_conflicting_copy_and_most_near_copies_without_flooding(dirty, findings):
    _, ds = dirty
    dups = findings.duplicates
    exact = dups[dups["kind"] == "exact"]
    assert {frozenset(p) for p in zip(exact["path_a"], exact["path_b"])} == {frozenset(p) for p in ds.exact_copies}
    assert exact["label_conflict"].all() and findings.summary["counts"]["exact_conflicting_groups"] == 6
    near = dups[dups["kind"] == "near"]
    listed = {frozenset(p) for p in zip(near["path_a"], near["path_b"])}
    planted = {frozenset(p) for p in ds.altered_copies}
    assert len(listed & planted) >= 0.75 * len(planted), near
    assert len(near) <= 3 * len(planted)  # near-identical silhouettes exist in the set itself; no flood
    conflicts = near[near["label_conflict"]]
    assert {frozenset(p) for p in zip(conflicts["path_a"], conflicts["path_b"])} <= planted  # only planted ones
    assert (dups.index[dups["kind"] == "exact"].max() < dups.index[dups["kind"] == "near"].min())


def test_off_domain_photos_are_outliers(dirty, findings):
    _, ds = dirty
    flagged = list(findings.outliers["path"])
    assert set(ds.outliers) <= set(flagged[:len(ds.outliers) + 2]) and len(flagged) <= 10


def test_report_and_leakage_against_a_trained_run(dirty, findings, tmp_path):
    base, ds = dirty
    text = findings.report.read_text()
    assert text.count("data:image/jpeg") >= 60  # thumbnails found through the root stage 1 recorded
    assert "file missing" not in text and "no image root" not in text
    run = train(base / "feats", tmp_path / "run", epochs=5, progress=False).run_dir
    with_run = doctor(base / "feats", tmp_path / "doctor", run=run, report=False)
    assert with_run.summary["splits"]["source"].endswith("split.csv")
    exact = with_run.duplicates[with_run.duplicates["kind"] == "exact"]
    assert not exact["leak"].any()  # train's content-keyed split keeps byte-identical copies together
