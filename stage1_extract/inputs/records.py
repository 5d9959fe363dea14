"""What listing the input gives: one :class:`ImageRecord` per candidate file, in a :class:`Listing` with the
problems found on the way; every way of listing (folders, file lists) and every later step (DICOM records, the
plan) speaks these types."""

from __future__ import annotations

import dataclasses

from stage1_extract.errors import Stage1Error

IMAGE_EXTENSIONS = {
    ".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp",
    ".ppm", ".pgm", ".pbm", ".pnm", ".ico", ".tga", ".dib", ".jp2", ".j2k", ".avif", ".qoi", ".apng",
    ".dcm", ".dicom", ".dic",  # DICOM; extension-less and UID-named DICOM files are recognised by content
}  # the fast path; any other file is kept when PIL recognises its content (see stage1_extract.inputs.listing)


@dataclasses.dataclass(frozen=True)
class ImageRecord:
    path: str  # relative to the input root, POSIX separators: the key in every shard
    abspath: str
    label: str | None
    group: str | None = None  # e.g. a patient id: stage 2 never splits a group across train/val/test


@dataclasses.dataclass
class Listing:
    root: str
    layout: str  # "class-folders", "flat" or "file-list"
    records: list[ImageRecord]
    problems: list[tuple[str, str]]  # (path, reason)
    empty_classes: list[str]
    ignored: int = 0  # hidden files
    ungrouped: int = 0  # paths that --group-regex did not match (they get no group)
    hidden_folders: list[str] = dataclasses.field(default_factory=list)  # top-level ".name/" folders, not classes
    notes: list[str] = dataclasses.field(default_factory=list)  # what listing changed, said in the run summary


class NoImagesError(Stage1Error, ValueError):
    """The input holds no image at all: a wrong --images, most likely; nothing is written."""
