"""Train / validation / test splits keyed by image content, so that a split stays put.

An image's split is decided by a hash of its *unit* and the seed. The unit is the image's group when it has
one (e.g. a patient), else its ``content_id``; units that share an image's content are merged, so exact
duplicates and whole groups always land in one split. Nothing else enters the hash: not the row order,
the path, the label's spelling, the backbone or the extraction run. Adding or removing images therefore
never moves another image, and every backbone extracted from the same images gets the same split.

A hash alone gives split sizes that vary like coin flips, which matters only for small collections (120
images: a test split of 18 ± 4), and cannot promise small classes a validation and a test image (three images
of a class all hash to training 34% of the time at 70/15/15). So after hashing, two corrections move as few
units as possible, lowest second hash first: a class with at least 3 units that lacks a validation or test
unit is *topped up* from a split that can spare one (training first); then, when a split's share of the
images is more than ``SIZE_TOLERANCE`` (3 points, at least one image) off its fraction, units move between
splits until it is within it, never taking a class's last unit out of a split. Only these moved units can change when images are added (on
1,000+ images the size correction is rarely needed, at 50,000 never); a frozen split (``split.csv`` of an
earlier run passed back as ``--split-file``) fixes them too. See ``docs/stage2.md``.
"""

from __future__ import annotations

import hashlib

import numpy as np

SPLITS = ("train", "validation", "test")
TRAIN, VALIDATION, TEST = 0, 1, 2
UNASSIGNED = -1
#: largest allowed gap between a split's share of the images and its fraction before units are moved
SIZE_TOLERANCE = 0.03


def _present(values: np.ndarray) -> np.ndarray:
    return np.array([v is not None and v == v and v != "" for v in values], dtype=bool)


def unit_keys(content_ids: np.ndarray, groups: np.ndarray | None = None) -> np.ndarray:
    """Per row, the key of the unit it is split with: ``g:<group>``, else ``c:<content_id>``.

    Units that share a content id (the same image in two groups, or grouped and ungrouped) are merged
    (connected components of the unit–content graph) and take the smallest key among them.
    """
    cids = np.asarray(content_ids).astype(str)
    if groups is None or not _present(np.asarray(groups, dtype=object)).any():
        return np.char.add("c:", cids).astype(object)
    groups = np.asarray(groups, dtype=object)
    has_group = _present(groups)
    base = np.array([f"g:{g}" if h else f"c:{c}" for g, h, c in zip(groups, has_group, cids)], dtype=object)
    unit_names, unit_idx = np.unique(base.astype(str), return_inverse=True)
    content_names, content_idx = np.unique(cids, return_inverse=True)
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n_units, n = len(unit_names), len(unit_names) + len(content_names)
    graph = coo_matrix((np.ones(len(cids)), (unit_idx, n_units + content_idx)), shape=(n, n))
    _, component = connected_components(graph, directed=False)
    # unit_names is sorted, so the first unit met per component is its smallest key
    first = {}
    for i in range(n_units):
        first.setdefault(component[i], unit_names[i])
    return np.array([first[component[u]] for u in unit_idx], dtype=object)


def _score(seed: int, salt: str, key: str) -> float:
    digest = hashlib.blake2b(f"{seed}\0{salt}\0{key}".encode("utf-8", "surrogateescape"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def content_split(content_ids: np.ndarray, y: np.ndarray, groups: np.ndarray | None = None, *,
                  val_fraction: float = 0.15, test_fraction: float = 0.15, seed: int = 0) -> dict[str, np.ndarray]:
    """Row indices per split (``train``, ``validation``, ``test``), keyed by content (see the module doc).

    ``y`` holds class indices or names (it only decides which units are topped up). Deterministic in the
    set of (content_id, group, label) rows and ``seed``; independent of row order.
    """
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(f"val_fraction ({val_fraction}) and test_fraction ({test_fraction}) must be in [0, 1) "
                         "and sum to less than 1")
    n = len(content_ids)
    if n == 0:
        return {name: np.zeros(0, np.int64) for name in SPLITS}
    keys = unit_keys(content_ids, groups)
    unit_names, unit_of_row = np.unique(keys.astype(str), return_inverse=True)
    unit_of_row = unit_of_row.reshape(-1)
    u = np.array([_score(seed, "split", k) for k in unit_names])
    w = np.array([_score(seed, "top-up", k) for k in unit_names])
    assigned = np.where(u < test_fraction, TEST, np.where(u < test_fraction + val_fraction, VALIDATION, TRAIN))
    y_codes = np.unique(np.asarray(y).astype(str), return_inverse=True)[1].reshape(-1)
    pairs = np.unique(np.stack([y_codes, unit_of_row], axis=1), axis=0)  # (class, unit) memberships
    _top_up(assigned, w, pairs, val_fraction, test_fraction)
    _balance(assigned, w, np.bincount(unit_of_row, minlength=len(unit_names)), pairs,
             np.array([1 - val_fraction - test_fraction, val_fraction, test_fraction]))
    codes = assigned[unit_of_row]
    return {name: np.flatnonzero(codes == i).astype(np.int64) for i, name in enumerate(SPLITS)}


def _balance(assigned: np.ndarray, w: np.ndarray, size: np.ndarray, pairs: np.ndarray,
             fractions: np.ndarray) -> None:
    """Move units one by one (lowest second hash first) from the fullest split to the emptiest until every
    split's image count is within ``SIZE_TOLERANCE`` of its fraction (at least one image of slack).

    A unit that is its class's last in its split stays: sizes never cost a class its test or training image.
    Moves are rare beyond a few hundred images (the hash alone lands within the tolerance), so the loop is short.
    """
    total = size.sum()
    target = fractions * total
    slack = max(1.0, SIZE_TOLERANCE * total)
    n_classes = int(pairs[:, 0].max()) + 1
    for _ in range(len(assigned)):
        gap = np.bincount(assigned, weights=size, minlength=len(SPLITS)) - target
        short, over = int(np.argmin(gap)), int(np.argmax(gap))
        if -gap[short] <= slack and gap[over] <= slack:
            return
        per_class = np.bincount(pairs[:, 0] * len(SPLITS) + assigned[pairs[:, 1]],
                                minlength=n_classes * len(SPLITS)).reshape(n_classes, len(SPLITS))
        last = pairs[per_class[pairs[:, 0], assigned[pairs[:, 1]]] == 1, 1]
        donors = np.setdiff1d(np.flatnonzero(assigned == over), last)
        if len(donors) == 0:
            return
        assigned[donors[np.argmin(w[donors])]] = short


def _top_up(assigned: np.ndarray, w: np.ndarray, pairs: np.ndarray, val_fraction: float,
            test_fraction: float) -> None:
    """Give every class with >= 3 units one validation and one test unit, moving as few units as possible."""
    units_by_class = np.split(pairs[:, 1], np.flatnonzero(np.diff(pairs[:, 0])) + 1)
    # Classes in an order that does not depend on their names: smallest first, then by their units' hashes.
    order = sorted(range(len(units_by_class)), key=lambda c: (len(units_by_class[c]), w[units_by_class[c]].min()))
    needs = [s for s, f in ((TEST, test_fraction), (VALIDATION, val_fraction)) if f > 0]
    for c in order:
        units = units_by_class[c]
        if len(units) < 3:
            continue
        for need in needs:
            where = assigned[units]
            if (where == need).any():
                continue
            for donor in (TRAIN, VALIDATION, TEST):
                if donor != need and (where == donor).sum() >= 2:
                    candidates = units[where == donor]
                    assigned[candidates[np.argmin(w[candidates])]] = need
                    break


def split_notes(y: np.ndarray, classes: list[str], split: dict[str, np.ndarray],
                content_ids: np.ndarray | None = None, groups: np.ndarray | None = None,
                from_file: bool = False) -> list[str]:
    """Human notes on a split: classes missing from a split and why, groups or duplicates that straddle
    splits (possible only with a split file), rows a split file left out."""
    notes = []
    units = unit_keys(content_ids, groups) if content_ids is not None else None
    for name in ("validation", "test"):
        idx = split.get(name, np.zeros(0, np.int64))
        if len(idx) == 0:
            notes.append(f"the {name} split is empty")
            continue
        counts = np.bincount(y[idx], minlength=len(classes))
        train_counts = np.bincount(y[split["train"]], minlength=len(classes))
        missing = [c for c, k, t in zip(classes, counts, train_counts) if k == 0 and t > 0]
        if missing:
            shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            why = (f"not in the split file's {name} rows" if from_file
                   else "fewer than 3 images or groups: too few to give every split one")
            notes.append(f"no {name} rows for {shown} ({why})")
    untrained = [c for c, t in zip(classes, np.bincount(y[split["train"]], minlength=len(classes))) if t == 0]
    if untrained:
        notes.append(f"no training rows for {', '.join(untrained[:5])}: the model cannot learn these classes")
    if units is not None:
        codes = split_codes(split, len(y))
        used = codes >= 0
        keys, first = np.unique(units[used].astype(str), return_inverse=True)
        spread = np.zeros(len(keys), np.int64)
        for s in range(len(SPLITS)):
            spread += np.bincount(first[codes[used] == s], minlength=len(keys)) > 0
        straddle = keys[spread > 1]
        if len(straddle):
            notes.append(f"{len(straddle)} group(s) or exact-duplicate images span more than one split "
                         f"(e.g. {straddle[0][2:]!r}): their test scores are not held out")
    if len(split.get("unassigned", ())):
        notes.append(f"{len(split['unassigned'])} labelled rows are not in the split file and were left out")
    return notes


def split_codes(split: dict[str, np.ndarray], n: int) -> np.ndarray:
    """Per row: 0 train, 1 validation, 2 test, -1 in no split."""
    codes = np.full(n, UNASSIGNED, np.int64)
    for i, name in enumerate(SPLITS):
        codes[split.get(name, np.zeros(0, np.int64))] = i
    return codes
