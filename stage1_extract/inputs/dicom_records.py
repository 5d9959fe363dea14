"""DICOM rows of a listing: patient groups from the header (never the identity itself), one row per frame.

Runs in the parent process on the listing, before planning, so the decode workers need nothing new and
the incremental plan sees each row's final path and group.

Groups. Stage 2 splits by ``group`` so that one patient's images never sit on both sides of a split. The
group is ``patient-`` + HMAC-SHA256(salt, PatientID) (or ``study-`` + … of StudyInstanceUID), 64 bits in
hex: the same patient gets the same group in every run and in every backbone's shards (one split serves a
backbone comparison), while the raw ID is never stored. A public constant salt would let anyone who
holds the shards test guesses of short hospital IDs, so the salt is a secret: ``group_salt=``, else the
``HYBRID_TRANSFER_GROUP_SALT`` environment variable, else a random 256-bit secret created once per user
in ``$XDG_CONFIG_HOME/hybrid-transfer/group-salt`` (mode 0600). Copy that value to wherever shards of the
same patients are extracted (another machine, a colleague) to get the same groups there.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import logging
import os
import secrets
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from stage1_extract.decoding.dicom import (
    DICOM_EXTENSIONS,
    frame_ref,
    is_dicom_file,
    quiet_pydicom,
    read_dataset,
    read_head,
    split_frame_ref,
)
from stage1_extract.inputs.records import IMAGE_EXTENSIONS, Listing
from stage1_extract.errors import InputError, OptionError

log = logging.getLogger(__name__)

SALT_ENV = "HYBRID_TRANSFER_GROUP_SALT"
GROUP_BY = {"patient": "PatientID", "study": "StudyInstanceUID", "none": None}
FRAMES = ("first", "all")
MIN_SALT_CHARS = 16
# Rows (0028,0010) is a sentinel: elements come in tag order, so once it is read every tag above it was too
_HEADER_TAGS = ["PatientID", "StudyInstanceUID", "NumberOfFrames", "Rows"]
# Parsing the header from memory beats pydicom reading the file (its many tell() calls): 1.3× in
# bench/results/dicom-cpu.json on a busy 2-core machine, up to 2× in quieter runs.
_HEAD_BYTES = 64 * 1024


def salt_file() -> Path:
    """Where the per-user secret lives: ``$XDG_CONFIG_HOME/hybrid-transfer/group-salt`` (``~/.config`` by default)."""
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "hybrid-transfer" / "group-salt"


def group_salt(salt: str | None = None) -> bytes:
    """The secret key for group hashes: ``salt``, else ``$HYBRID_TRANSFER_GROUP_SALT``, else the per-user file
    (created on first use with 32 random bytes, atomically, readable only by its owner)."""
    source = "group_salt" if salt is not None else SALT_ENV
    salt = salt if salt is not None else os.environ.get(SALT_ENV)
    if salt is not None:
        if len(salt.strip()) < MIN_SALT_CHARS:
            raise OptionError(f"{source} is {len(salt.strip())} characters; use at least {MIN_SALT_CHARS} random "
                             "ones (e.g. python -c 'import secrets; print(secrets.token_hex(32))') so that "
                             "short patient IDs cannot be guessed from their groups")
        return salt.strip().encode("utf-8")
    path = salt_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass
        else:  # O_EXCL: of two first runs at once, exactly one writes the secret; the other reads it below
            with os.fdopen(fd, "w") as fh:
                fh.write(secrets.token_hex(32) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
        value = path.read_text().strip()
    except OSError as exc:
        raise OSError(f"cannot create or read the group salt {path}: {exc.strerror or exc}; set {SALT_ENV} "
                      "to a long random secret instead") from None
    if len(value) < MIN_SALT_CHARS:
        raise InputError(f"the group salt in {path} is empty or too short; delete the file to make a new one "
                         "(groups then change: re-extract) or put the secret your other shards used in it")
    return value.encode("utf-8")


def group_id(identifier: str, salt: bytes, kind: str = "patient") -> str:
    """``kind-`` + the first 64 bits of HMAC-SHA256(salt, identifier): stable, not reversible without the salt."""
    digest = hmac.new(salt, f"{kind}\x00{identifier}".encode("utf-8"), hashlib.sha256).hexdigest()
    return f"{kind}-{digest[:16]}"


def _may_be_dicom(path: str) -> bool:
    """DICOM extensions, and names no image type claims (UID-named or extension-less files) that hold DICOM."""
    ext = os.path.splitext(path)[1].lower()
    if ext in DICOM_EXTENSIONS:
        return True
    return ext not in IMAGE_EXTENSIONS and is_dicom_file(path)


def _header(path: str):
    """(identifier tags, number of frames) from the header alone, or None when it cannot be read (the
    decoder will then record why). Values are converted lazily, so all of it runs with pydicom quiet."""
    with quiet_pydicom():
        try:
            head = read_head(path, _HEAD_BYTES)
            try:
                ds = read_dataset(head, stop_before_pixels=True, specific_tags=_HEADER_TAGS)
            except Exception:  # noqa: BLE001 - cut inside an element: read the whole header below
                ds = None
            if len(head) == _HEAD_BYTES and (ds is None or "Rows" not in ds):  # the header goes on past the head
                ds = read_dataset(path, stop_before_pixels=True, specific_tags=_HEADER_TAGS)
            frames = int(ds.get("NumberOfFrames") or 1)
            ids = {k: str(ds.get(k) or "").strip() for k in ("PatientID", "StudyInstanceUID")}
        except Exception:  # noqa: BLE001 - any damage: no group, one row; the decode error names the problem
            return None
    return ids, max(1, frames)


def prepare_dicom_records(listing: Listing, *, frames: str = "first", group_by: str = "patient",
                          salt: str | None = None, threads: int = 8) -> Listing:
    """The listing with each DICOM record's ``group`` set (when it has none yet: a file list's column and
    ``--group-regex`` win) and, with ``frames="all"``, one record per frame (``scan.dcm#frame=3``)."""
    if frames not in FRAMES:
        raise OptionError(f"dicom frames must be one of {FRAMES}, not {frames!r}")
    if group_by not in GROUP_BY:
        raise OptionError(f"dicom group must be one of {sorted(GROUP_BY)}, not {group_by!r}")
    if group_by == "none" and frames == "first":
        return listing
    files = {r.path: split_frame_ref(r.abspath) for r in listing.records}  # a file list may name single frames
    dicom = [r for r in listing.records if _may_be_dicom(files[r.path][0])]
    if not dicom:
        return listing
    key = group_salt(salt) if group_by != "none" else b""
    tag = GROUP_BY[group_by]
    # Headers are small reads: threads overlap their latency. The warnings filter is process-wide, so it is set
    # here, once, for all of them (each thread's own catch_warnings then saves and restores a quiet state).
    with quiet_pydicom(), ThreadPoolExecutor(max_workers=threads) as pool:
        headers = dict(zip((r.path for r in dicom), pool.map(lambda r: _header(files[r.path][0]), dicom)))
    records, missing = [], 0
    for rec in listing.records:
        found = headers.get(rec.path)
        if found is None:
            records.append(rec)
            continue
        ids, n_frames = found
        group = rec.group
        if group is None and tag is not None:
            if ids[tag]:
                group = group_id(ids[tag], key, group_by)
            else:
                missing += 1
        rec = dataclasses.replace(rec, group=group)
        if frames == "all" and n_frames > 1 and files[rec.path][1] is None:
            records += [dataclasses.replace(rec, path=frame_ref(rec.path, k), abspath=frame_ref(rec.abspath, k))
                        for k in range(n_frames)]
        else:
            records.append(rec)
    if missing:
        log.warning("%d DICOM file(s) have no %s: each is its own group", missing, tag)
    records.sort(key=lambda r: r.path)
    return dataclasses.replace(listing, records=records)
