"""Reading an image file, the one way every decoder and engine does it: size limit, FIFOs, transient I/O errors.

:func:`read_image` reads (never raising: the reason comes back in a :class:`FileResult`), :func:`read_file`
raises :class:`DecodeError` instead, :func:`content_id` names a file's content for incremental runs, and a
path may name one frame of a multi-frame DICOM (``scan.dcm#frame=3``, :func:`split_frame_ref`). These live
apart from the decoders so that every decoder (PIL, DICOM, the GPU ones) depends on them and none on another.

Read hook: when ``STAGE1_READ_HOOK`` names a function (``package.module:function``), it is called with each
path just before the file is opened; whatever it raises is handled like the same failure of ``open``
(``OSError``, ``MemoryError``). It is looked up once per process, at the first read (decode workers are
fresh processes: each looks it up itself). The tests use it to make chosen files crash or hang a decode
worker (``tests/support/faults.py``); unset, a read costs one ``None`` check more.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import importlib
import os
import re
import stat

from stage1_extract.errors import OptionError, Stage1Error

MAX_FILE_BYTES = 512 * 1024 * 1024

#: I/O failures that say nothing about the file (a flaky disk or network mount, exhausted descriptors or
#: memory): recorded for this run, retried by the next one.
TRANSIENT_ERRNOS = frozenset({errno.EIO, errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.EAGAIN, errno.EINTR,
                              errno.ETIMEDOUT, errno.ESTALE, errno.ENOBUFS, errno.EBUSY, errno.ENOLCK,
                              errno.ECONNRESET, errno.ECONNABORTED, errno.EHOSTDOWN, errno.EHOSTUNREACH,
                              errno.ENETDOWN, errno.ENETUNREACH, errno.ENOTCONN, errno.EREMOTEIO})


READ_HOOK_ENV = "STAGE1_READ_HOOK"
_FRAME_REF = re.compile(r"^(?P<path>.+)#frame=(?P<number>[1-9][0-9]*)$")
_hook: list = []  # [the hook or None], once looked up


def read_hook():
    """The function ``STAGE1_READ_HOOK`` names (called with each path before it is opened), or None."""
    if not _hook:
        spec = os.environ.get(READ_HOOK_ENV, "")
        found = None
        if spec:
            module, _, name = spec.partition(":")
            if not name:
                raise OptionError(f"{READ_HOOK_ENV}={spec!r}: give package.module:function")
            found = getattr(importlib.import_module(module), name)
        _hook.append(found)
    return _hook[0]


class DecodeError(Stage1Error):
    """An image file that cannot be used; ``str(exc)`` is the reason recorded in the errors table.

    ``transient`` errors (out of memory, I/O errors) are not the file's fault: the next run retries them.
    """

    def __init__(self, reason: str, *, transient: bool = False) -> None:
        super().__init__(reason)
        self.transient = transient


@dataclasses.dataclass
class FileResult:
    """What reading (and decoding) one file gave: ``reason`` is None on success."""

    data: bytes | None
    reason: str | None = None
    transient: bool = False
    file_size: int = 0
    mtime_ns: int = 0
    content_id: str | None = None


def content_id(data: bytes) -> str:
    """Identity of a file's content for incremental runs: size plus a 128-bit BLAKE2b digest."""
    return f"{len(data)}-{hashlib.blake2b(data, digest_size=16).hexdigest()}"


def _os_error(what: str, exc: OSError) -> tuple[str, bool]:
    """(reason, transient) for an OSError while opening or reading a file."""
    if isinstance(exc, PermissionError):
        return "permission denied", False
    if isinstance(exc, IsADirectoryError):
        return "is a directory", False
    transient = exc.errno in TRANSIENT_ERRNOS
    return f"{what}: {exc.strerror or exc}" + (" (transient: retried next run)" if transient else ""), transient


def read_image(path: str) -> FileResult:
    """Read one image file as every decoder and engine must: never blocking, never over the size limit.

    ``O_NONBLOCK``: opening a FIFO (listed in a file list, or swapped in after listing) must not wait forever
    for a writer; it makes no difference to reading a regular file. The checks apply to what was opened,
    not to what the path names now. Errors come back as ``reason`` (with ``transient`` set for I/O trouble
    that says nothing about the file), never raised.
    """
    path = split_frame_ref(path)[0]  # "scan.dcm#frame=3" (one frame of a multi-frame DICOM): read its file
    try:
        hook = read_hook()
        if hook is not None:
            hook(path)
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except MemoryError:
        return FileResult(None, "out of memory while opening the file (transient: retried next run)", True)
    except OSError as exc:
        return FileResult(None, *_os_error("cannot open", exc))
    try:
        st = os.fstat(fd)
        size, mtime = st.st_size, st.st_mtime_ns
        if not stat.S_ISREG(st.st_mode):
            return FileResult(None, "not a regular file", False, size, mtime)
        if size > MAX_FILE_BYTES:
            return FileResult(None, f"file is {size / 2**20:.0f} MiB, over the {MAX_FILE_BYTES // 2**20} MiB limit",
                              False, size, mtime)
        with os.fdopen(os.dup(fd), "rb") as fh:
            data = fh.read()
    except MemoryError:
        return FileResult(None, "out of memory while reading the file (transient: retried next run)", True)
    except OSError as exc:
        return FileResult(None, *_os_error("cannot read file", exc))
    finally:
        os.close(fd)
    if not data:
        return FileResult(None, "empty file (0 bytes)", False, size, mtime, content_id(data))
    return FileResult(data, None, False, size, mtime, content_id(data))


def read_ahead(pool, read, paths, batch_size: int, ahead: int = 2):
    """Yield ``(indices, [read(path) …])`` batch by batch, in order, while ``pool`` (an executor) already reads
    the next ``ahead`` batches: the in-process decoders (torch, nvImageCodec) overlap file reading with decoding."""
    chunks = [list(range(s, min(s + batch_size, len(paths)))) for s in range(0, len(paths), batch_size)]
    reads = [pool.map(read, [paths[i] for i in chunk]) for chunk in chunks[:ahead]]
    for n, chunk in enumerate(chunks):
        if n + ahead < len(chunks):
            reads.append(pool.map(read, [paths[i] for i in chunks[n + ahead]]))
        results = list(reads[n])
        reads[n] = None
        yield chunk, results


def read_file(path: str) -> bytes:
    """The bytes of ``path`` (through :func:`read_image`), or :class:`DecodeError` with the reason."""
    got = read_image(path)
    if got.reason is not None and got.reason != "empty file (0 bytes)":
        raise DecodeError(got.reason, transient=got.transient)
    return got.data or b""


def frame_ref(path: str, index: int) -> str:
    """The row path for one frame of a multi-frame file: ``scan.dcm#frame=3`` (DICOM's 1-based frame number)."""
    return f"{path}#frame={index + 1}"


def split_frame_ref(path: str) -> tuple[str, int | None]:
    """``scan.dcm#frame=3`` → (``scan.dcm``, 2), the 0-based frame index; any other path → (path, None)."""
    found = _FRAME_REF.match(path)
    if found is None or os.path.exists(path):  # a file really named so is a file, not a frame
        return path, None
    return found["path"], int(found["number"]) - 1
