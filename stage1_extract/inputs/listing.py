"""Listing the input: a class-folder tree, a flat folder, or a CSV/Parquet file list (:mod:`.file_list`).

Produces one :class:`ImageRecord` per candidate file, sorted by path, plus the problems found while
listing (broken links, undecodable names, files that are not images) so they reach the errors table.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

from stage1_extract.decoding.dicom import is_dicom_file
from stage1_extract.inputs.file_list import list_file
from stage1_extract.inputs.groups import apply_group_regex, compile_group_regex
from stage1_extract.inputs.records import IMAGE_EXTENSIONS, ImageRecord, Listing, NoImagesError  # noqa: F401
from stage1_extract.errors import InputNotFoundError, OptionError

def _printable(name: str) -> str | None:
    """A file name as valid UTF-8, or None when the OS name cannot be represented (bad bytes)."""
    try:
        name.encode("utf-8")
        return name
    except UnicodeEncodeError:
        return None


def _linked_folder_problem(link: str, root: str) -> str | None:
    """Why a symbolic link to a folder is not followed, or None to follow it.

    A link to one of its own parent folders is a loop; a link to any other folder inside the input would
    list images a second time, under the wrong class (``cat/more -> ../coffee``), so it is skipped: those
    images are listed at their real place. Links to folders outside the input are followed.
    """
    target = os.path.realpath(link)
    here = os.path.realpath(os.path.dirname(link))
    if here == target or here.startswith(target.rstrip(os.sep) + os.sep):
        return "skipped: symbolic link loop (it points to one of its own parent folders)"
    if target == root or target.startswith(root.rstrip(os.sep) + os.sep):
        where = os.path.relpath(target, root)
        return (f"skipped: symbolic link to {where!r} inside the input; its images are listed there, "
                "under their own class")
    return None


def _walk_files(top: Path, rel_prefix: str, problems: list, seen: dict, root: str) -> list[tuple[str, str]]:
    """Files below ``top`` as (relative path, absolute path); follows links to folders outside ``root`` once."""
    out: list[tuple[str, str]] = []
    try:
        st = top.stat()
    except OSError as exc:
        problems.append((rel_prefix or ".", f"cannot open folder: {exc.strerror or exc}"))
        return out
    key = (st.st_dev, st.st_ino)
    if key in seen:
        problems.append((rel_prefix, f"skipped: the same folder as {seen[key]!r} (linked twice), listed there"))
        return out
    seen[key] = rel_prefix
    try:
        entries = sorted(os.scandir(top), key=lambda e: e.name)
    except OSError as exc:
        problems.append((rel_prefix or ".", f"cannot list folder: {exc.strerror or exc}"))
        return out
    for entry in entries:
        name = _printable(entry.name)
        rel = f"{rel_prefix}/{entry.name}" if rel_prefix else entry.name
        if entry.name.startswith("."):
            continue
        if name is None:
            problems.append((rel.encode("utf-8", "backslashreplace").decode(), "file name is not valid UTF-8"))
            continue
        try:
            is_dir = entry.is_dir(follow_symlinks=True)
        except OSError as exc:
            problems.append((rel, f"cannot stat: {exc.strerror or exc}"))
            continue
        if is_dir:
            reason = _linked_folder_problem(entry.path, root) if entry.is_symlink() else None
            if reason:
                problems.append((rel, reason))
            else:
                out.extend(_walk_files(Path(entry.path), rel, problems, seen, root))
            continue
        try:
            is_file = entry.is_file(follow_symlinks=True)
        except OSError as exc:
            is_file, err = False, exc
        else:
            err = None
        if not is_file:
            reason = "broken symbolic link" if entry.is_symlink() else "not a regular file"
            if err is not None and getattr(err, "errno", None) == 40:
                reason = "skipped: symbolic link loop"
            problems.append((rel, reason))
            continue
        out.append((rel, entry.path))
    return out


@functools.lru_cache(maxsize=1)
def _signatures() -> list:
    """(format, signature check) of every PIL format that has one."""
    from PIL import Image

    Image.init()
    return [(name, Image.OPEN[name][1]) for name in Image.ID if Image.OPEN[name][1] is not None]


def _is_image_content(path: str) -> bool:
    """Whether PIL recognises the file's content as an image it can decode, whatever its name (AVIF, QOI, a JPEG
    without an extension…). Only formats that PIL identifies by a signature are tried, on the first 16 bytes,
    so a text file or other non-image is turned down in microseconds, not parsed by every plugin."""
    import warnings

    from PIL import Image, ImageFile

    try:
        with open(path, "rb") as fh:
            prefix = fh.read(16)
    except OSError:
        return False
    formats = [name for name, accept in _signatures() if accept(prefix)]
    if not formats:
        return False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(path, formats=formats) as img:
                return not isinstance(img, ImageFile.StubImageFile)  # HDF5, GRIB…: no decoder in PIL
    except Image.DecompressionBombError:
        return True  # an image; decoding records why it is refused
    except Exception:  # UnidentifiedImageError and the many ways a foreign file trips a plugin's header check
        return False


def _split_images(files, problems) -> list[tuple[str, str]]:
    kept = []
    for rel, abspath in files:
        ext = os.path.splitext(rel)[1].lower()
        if ext in IMAGE_EXTENSIONS or is_dicom_file(abspath) or _is_image_content(abspath):
            kept.append((rel, abspath))
        else:
            problems.append((rel, f"skipped: extension {ext or '(none)'!r} is not an image type "
                                  "and PIL does not recognise the content"))
    return kept


def list_images(images: str | os.PathLike, *, group_regex: str | None = None) -> Listing:
    """List the input. A folder with sub-folders is a class-folder tree (folder name = label).

    Groups (e.g. patients) come from a file list's ``group`` column, or from ``group_regex`` (one capture
    group, searched in each relative path) for folders.
    """
    regex = compile_group_regex(group_regex)
    root = Path(images).expanduser()
    if root.is_file():
        listing = list_file(root)
        if not listing.records:
            raise NoImagesError(_nothing_listed(root, listing.problems))
        if regex is not None and any(r.group is not None for r in listing.records):
            raise OptionError(f"--images {root}: the file list has a 'group' column; drop --group-regex or the column")
        return apply_group_regex(listing, regex)
    if not root.is_dir():
        raise InputNotFoundError(f"--images {root}: no such file or folder")
    root = root.resolve()
    seen: dict = {}
    top_entries = sorted(os.scandir(root), key=lambda e: e.name)
    hidden = [e.name for e in top_entries if e.name.startswith(".") and e.is_dir(follow_symlinks=True)]
    class_dirs = [e for e in top_entries if not e.name.startswith(".") and e.is_dir(follow_symlinks=True)]
    problems: list[tuple[str, str]] = []
    for d in [d for d in class_dirs if _empty_folder_named_like_an_image(d)]:
        class_dirs.remove(d)  # ``x.jpg/``, empty: not a class that would make every image here classless
        problems.append((d.name, "skipped: an empty folder named like an image file, not a class folder"))
    records: list[ImageRecord] = []
    empty: list[str] = []
    if class_dirs:
        seen[(root.stat().st_dev, root.stat().st_ino)] = "."
        for entry in top_entries:
            if entry.name.startswith((".", "_")) or entry.is_dir(follow_symlinks=True):
                continue  # hidden files and markers such as _prepared.json are not inputs
            if os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS:
                problems.append((entry.name, "skipped: image at the top of a class-folder tree has no class"))
        # real class folders first, then linked ones: a link never takes a folder's images from its own class
        for d in sorted(class_dirs, key=lambda e: e.is_symlink()):
            label = _printable(d.name)
            if label is None:
                problems.append((d.name.encode("utf-8", "backslashreplace").decode(), "folder name is not valid UTF-8"))
                continue
            reason = _linked_folder_problem(d.path, str(root)) if d.is_symlink() else None
            if reason:
                problems.append((d.name, reason))
                continue
            files = _split_images(_walk_files(Path(d.path), d.name, problems, seen, str(root)), problems)
            if not files:
                empty.append(label)
            records += [ImageRecord(rel, abspath, label) for rel, abspath in files]
        layout = "class-folders"
    else:
        files = _split_images(_walk_files(root, "", problems, seen, str(root)), problems)
        records = [ImageRecord(rel, abspath, None) for rel, abspath in files]
        layout = "flat"
    records.sort(key=lambda r: r.path)
    if not records:
        raise NoImagesError(_nothing_found(root, problems, hidden))
    return apply_group_regex(Listing(str(root), layout, records, problems, empty, hidden_folders=hidden),
                              regex)


def _empty_folder_named_like_an_image(entry: os.DirEntry) -> bool:
    if os.path.splitext(entry.name)[1].lower() not in IMAGE_EXTENSIONS:
        return False
    try:
        with os.scandir(entry.path) as inside:
            return not any(not e.name.startswith(".") for e in inside)
    except OSError:
        return False


def _nothing_listed(path: Path, problems: list[tuple[str, str]]) -> str:
    text = f"--images {path}: none of the {len(problems)} listed files can be used"
    if not problems:
        return f"--images {path}: the file list has no rows. Give it a 'path' column naming one image a row."
    shown = "; ".join(f"{p}: {reason}" for p, reason in problems[:3])
    more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
    return (f"{text}: {shown}{more}. Paths in a file list are relative to the list's own folder "
            f"({path.parent.resolve()}) unless absolute.")


def _nothing_found(root: Path, problems: list[tuple[str, str]], hidden: list[str]) -> str:
    text = f"--images {root}: no images found"
    if problems:
        path, reason = problems[0]
        text += f"; {len(problems)} file(s) skipped, e.g. {path}: {reason}"
    if hidden:
        text += f"; hidden folders are not read ({', '.join(hidden[:3])})"
    return text + ". Point --images at a folder of images, or at the folder holding one sub-folder per class."
