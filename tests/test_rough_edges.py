"""Rough edges found by using the project as a new user would, and by fault probes (issue 15).

Each test pins one behaviour that used to go silently wrong or gave a confusing message.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

import shardformat


def _enospc(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


# ---- atomic files ---------------------------------------------------------------------------------------------

def test_atomic_text_write_on_full_disk_keeps_old_file_names_it_and_leaves_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "sweep.csv"
    shardformat.atomic_write_text(target, "old\n")
    monkeypatch.setattr(os, "fsync", _enospc)
    with pytest.raises(OSError) as info:
        shardformat.atomic_write_text(target, "new\n")
    assert "No space left on device" in str(info.value) and str(target) in str(info.value)
    assert target.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sweep.csv"]


def test_read_json_is_defensive_only_when_asked(tmp_path):
    empty = tmp_path / "speed.json"
    empty.write_text("")
    assert shardformat.read_json(empty, default={}) == {}
    assert shardformat.read_json(tmp_path / "missing.json", default=None) is None
    with pytest.raises(ValueError, match="speed.json"):
        shardformat.read_json(empty)
    shardformat.atomic_write_json(empty, {"a": 1})
    assert shardformat.read_json(empty) == {"a": 1}


def test_sweep_on_full_disk_names_the_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    from stage2_classify import sweep
    from stage2_classify.synthetic import write_synthetic_shards

    shards = write_synthetic_shards(tmp_path / "shards", counts=(20, 20), dim=8)
    out = tmp_path / "sweep"
    monkeypatch.setattr(os, "fsync", _enospc)
    with pytest.raises(OSError) as info:
        sweep(shards, out, hidden=[()], epochs=1, verbose=0)
    assert "No space left on device" in str(info.value) and "sweep.csv" in str(info.value)
    assert list(out.iterdir()) == []


def test_pipeline_run_survives_an_empty_speed_file(tmp_path, monkeypatch):
    from pipeline import orchestrator

    fdir = tmp_path / "features"
    fdir.mkdir()
    (fdir / "_extraction_speed.json").write_text("")  # left by a disk-full error of an older version

    class Summary:
        def format(self):
            return "done"

        def as_dict(self):
            return {"extracted": 0, "images_per_second": 0.0, "provider": "cpu"}

    import stage1_extract

    monkeypatch.setattr(stage1_extract, "extract", lambda *a, **k: Summary())
    info = orchestrator._extract(tmp_path / "imgs", str(fdir), progress=False)
    assert info["images_per_second"] == 0.0
    monkeypatch.setattr(stage1_extract, "extract",
                        lambda *a, **k: type("S", (Summary,), {"as_dict": lambda self: {
                            "extracted": 5, "images_per_second": 12.5, "provider": "cpu"}})())
    orchestrator._extract(tmp_path / "imgs", str(fdir), progress=False)
    assert shardformat.read_json(fdir / "_extraction_speed.json")["images_per_second"] == 12.5
    monkeypatch.setattr(stage1_extract, "extract", lambda *a, **k: Summary())
    assert orchestrator._extract(tmp_path / "imgs", str(fdir), progress=False)["images_per_second"] == 12.5
