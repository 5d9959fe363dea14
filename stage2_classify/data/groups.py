"""Groups (patients) made visible: regrouping shards without the backbone, and what the split did to them.

A row's group normally comes from stage 1 (``--group-regex``, a file list's ``group`` column, the DICOM
header). Stage 2 can replace it without re-running the backbone: ``group_regex`` (a regex with one capture
group, searched in each row's relative path, as stage 1 does) or ``groups`` (a CSV/Parquet file with columns
``path,group``; paths as the shards hold them). :func:`group_report` says, per class and split, how many
groups (the units the split keeps together: a group, else an image) there are, and warns when a class has
fewer than ``MIN_GROUPS`` groups, when a split holds none of a class's groups, or when the test split's
majority-class rate is far (``MAJORITY_GAP``) from the whole set's.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from stage2_classify.data.dataset import Dataset
from stage2_classify.data.split import SPLITS, unit_keys
from stage2_classify.errors import DatasetError

MIN_GROUPS = 5  # fewer groups in a class: its per-split scores rest on one or two patients
MAJORITY_GAP = 0.10  # test majority-class rate this far from the whole set's: the test mix is unlike the data


def _present(values: np.ndarray) -> np.ndarray:
    return np.array([v is not None and v == v and v != "" for v in values], dtype=bool)


def _groups_from_file(path: str | os.PathLike, paths: np.ndarray) -> np.ndarray:
    import pandas as pd

    path = os.fspath(path)
    try:
        table = pd.read_parquet(path) if path.endswith(".parquet") else pd.read_csv(path, dtype=str)
    except (OSError, ValueError) as exc:
        raise DatasetError(f"--groups {path}: cannot read it as CSV or Parquet ({exc})") from None
    if not {"path", "group"} <= set(table.columns):
        found = ", ".join(map(str, table.columns))
        raise DatasetError(f"--groups {path}: needs columns 'path' and 'group' (found {found})")
    mapping = dict(zip(table["path"].astype(str), table["group"]))
    return np.array([mapping.get(str(p)) for p in paths], dtype=object)


def groups_for(paths: np.ndarray, current: np.ndarray, *, group_regex: str | None = None,
               groups: str | os.PathLike | None = None) -> np.ndarray:
    """Per row, its group: from ``group_regex`` or the ``groups`` file (both: the file wins where it names a
    row), else ``current`` (the shards' own) when neither is given."""
    if group_regex is None and groups is None:
        return current
    new = np.full(len(paths), None, dtype=object)
    if group_regex is not None:
        from stage1_extract import compile_group_regex  # stage 1's own check: both stages read it the same way

        regex = compile_group_regex(group_regex)
        for i, p in enumerate(paths):
            found = regex.search(str(p))
            new[i] = found.group(1) if found and found.group(1) else None
    if groups is not None:
        from_file = _groups_from_file(groups, paths)
        named = _present(from_file)
        new[named] = from_file[named]
    return new


def regroup(ds: Dataset, *, group_regex: str | None = None, groups: str | os.PathLike | None = None) -> Dataset:
    """``ds`` with its groups replaced (:func:`groups_for`); the same object when neither option is given.
    The feature vectors are shared, not copied."""
    if group_regex is None and groups is None:
        return ds
    return dataclasses.replace(ds, groups=groups_for(ds.paths, ds.groups, group_regex=group_regex, groups=groups))


def group_source(ds: Dataset, *, group_regex: str | None = None, groups: str | os.PathLike | None = None) -> str:
    """Where the rows' groups came from, in words."""
    grouped = int(_present(ds.groups).sum())
    if groups is not None or group_regex is not None:
        how = " and ".join(x for x in (f"--group-regex '{group_regex}'" if group_regex else "",
                                       f"--groups {os.fspath(groups)}" if groups else "") if x)
        return f"{how} (stage 2), {grouped} of {len(ds.y)} images grouped"
    if grouped:
        return f"the shards' group column (stage 1), {grouped} of {len(ds.y)} images grouped"
    return "none: every image is its own unit (content-keyed)"


def group_report(ds: Dataset, split: dict[str, np.ndarray], source: str) -> dict:
    """Per class: units (groups, else images) in all and per split; warnings; the majority-rate check."""
    units = unit_keys(ds.content_ids, ds.groups).astype(str)
    grouped = bool(_present(ds.groups).any())
    per_class = {}
    for c, name in enumerate(ds.classes):
        rows = ds.y == c
        entry = {"all": int(len(np.unique(units[rows])))}
        for s in SPLITS:
            idx = split.get(s, np.zeros(0, np.int64))
            entry[s] = int(len(np.unique(units[idx][ds.y[idx] == c])))
        per_class[name] = entry
    warnings = []
    if grouped:
        few = [f"{n} ({e['all']})" for n, e in per_class.items() if e["all"] < MIN_GROUPS]
        if few:
            warnings.append(f"fewer than {MIN_GROUPS} groups in class {', '.join(few[:8])}: its scores rest on "
                            "one or two groups per split")
        for s in SPLITS:
            if len(split.get(s, ())) == 0:
                continue
            none = [n for n, e in per_class.items() if e[s] == 0 and e["all"] > 0]
            if none:
                warnings.append(f"the {s} split has none of the groups of {', '.join(none[:8])}"
                                + (" (it cannot learn them)" if s == "train" else
                                   " (no held-out score for them)"))
    out = {"source": source, "grouped": grouped, "units_per_class": per_class, "warnings": warnings, "notes": []}
    test = split.get("test", np.zeros(0, np.int64))
    if len(test):
        whole = float(np.bincount(ds.y).max() / len(ds.y))
        test_rate = float(np.bincount(ds.y[test]).max() / len(test))
        out["majority_rate"] = {"all": whole, "test": test_rate}
        if abs(test_rate - whole) > MAJORITY_GAP:
            out["notes"].append(f"the test split's majority-class rate {test_rate:.2f} differs from the whole "
                                   f"set's {whole:.2f}: its class mix is unlike the data (few groups, or big ones)")
    return out


def format_groups(report: dict) -> list[str]:
    """Summary lines: the source, units per class and split (train/val/test), and the warnings."""
    unit = "groups" if report["grouped"] else "images"
    per = report["units_per_class"]
    shown = "; ".join(f"{n} {e['all']} ({e['train']}/{e['validation']}/{e['test']})" for n, e in list(per.items())[:12])
    more = f"; … {len(per) - 12} more classes" if len(per) > 12 else ""
    lines = [f"  groups     {report['source']}",
             f"  units      {unit} per class, all (train/val/test): {shown}{more}"]
    lines += [f"  WARNING    {w}" for w in report["warnings"]]
    lines += [f"  note       {n}" for n in report.get("notes", [])]
    return lines
