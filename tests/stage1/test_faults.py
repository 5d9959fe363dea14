"""Fault injection: kill -9 at random moments, disk full, permission errors, two runs on one output, and a
training run killed mid-way. Afterwards nothing is lost, nothing is duplicated, nothing half-written is used.

Run alone with ``pytest -m faults`` (seed of the kill loop: ``FAULTS_SEED``, default below; the moments are
printed, so a failure can be replayed).
"""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

import shardformat
from shardformat.layout import errors_path, meta_dir, meta_file
from stage1_extract import extract
from stage1_extract.run.lock import OutputLock
from tests.support.helpers import make_image_tree, make_tiny_onnx, photo

REPO = Path(__file__).resolve().parents[2]
SEED = int(os.environ.get("FAULTS_SEED", "20240601"))
INPUT_SIZE = 32
BAD_FILES = {  # path -> bytes; each must end up in the errors table
    "cat/zero.jpg": b"",
    "cat/text.jpg": b"just some text, not a picture\n" * 10,
    "coffee/truncated.jpg": None,  # filled in by make_tree (half of a real JPEG)
}
LISTING_PROBLEMS = {"space/notes.txt"}  # not an image type: recorded while listing


# ------------------------------------------------------------------------------------------------ helpers

def cli(*args) -> list[str]:
    return [sys.executable, "-m", "stage1_extract", *map(str, args)]


def run(cmd, timeout=300, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO, **kw)


def _photo_crop(rng: np.random.Generator, size: int = 48) -> Image.Image:
    img = photo(str(rng.choice(["chelsea", "coffee", "astronaut", "rocket", "cat"])))
    w, h = img.size
    cw, ch = int(w * rng.uniform(0.3, 0.9)), int(h * rng.uniform(0.3, 0.9))
    x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    return img.crop((x, y, x + cw, y + ch)).resize((size, size))


def make_tree(root: Path, per_class: int) -> dict[str, str]:
    """JPEG crops of real photos (make_image_tree), some as PNG, plus bad files. Returns {path: 'good'|'bad'}."""
    make_image_tree(root, per_class=per_class, size=48)
    state = {}
    for p in sorted(root.rglob("*.jpg")):
        rel = p.relative_to(root).as_posix()
        if int(rel.split("_")[-1][:3]) % 5 == 0:  # every fifth image as PNG
            with Image.open(p) as im:
                im.save(p.with_suffix(".png"))
            p.unlink()
            rel = rel[:-4] + ".png"
        state[rel] = "good"
    good_jpeg = (root / "cat" / "cat_001.jpg").read_bytes()
    for rel, data in BAD_FILES.items():
        (root / rel).write_bytes(good_jpeg[: len(good_jpeg) // 2] if data is None else data)
        state[rel] = "bad"
    for rel in LISTING_PROBLEMS:
        (root / rel).write_text("notes")
        state[rel] = "bad"
    return state


def mutate(root: Path, state: dict[str, str], rng: np.random.Generator, step: int) -> str:
    """Change the input between runs so every resume has work to do and old rows go stale (compaction)."""
    good = sorted(p for p, s in state.items() if s == "good")
    changed = [str(p) for p in rng.choice(good, size=40, replace=False)]
    for rel in changed[:36]:  # new content under the same name
        _photo_crop(rng).save(root / rel, format="PNG" if rel.endswith(".png") else "JPEG", quality=90)
    for rel in changed[36:]:  # removed
        (root / rel).unlink()
        del state[rel]
    label = ["cat", "coffee", "space"][step % 3]
    for i in range(4):  # added
        rel = f"{label}/added_{step:02d}_{i}.jpg"
        _photo_crop(rng).save(root / rel, quality=90)
        state[rel] = "good"
    note = f"changed 36, removed {changed[36:]}, added 4 in {label}/"
    if step == 3:  # a good image becomes bad…
        rel = [p for p in good if p not in changed][0]
        data = (root / rel).read_bytes()
        (root / rel).write_bytes(data[: len(data) // 3])
        state[rel] = "bad"
        note += f"; truncated {rel}"
    if step == 6:  # …and a bad one is repaired
        _photo_crop(rng).save(root / "cat/zero.jpg", quality=90)
        state["cat/zero.jpg"] = "good"
        note += "; repaired cat/zero.jpg"
    return note


def features_by_path(out: Path) -> dict[str, np.ndarray]:
    fs = shardformat.read_features(out)  # validates every shard's schema and metadata
    return dict(zip(fs.paths.tolist(), fs.features))


def assert_every_shard_opens(out: Path) -> int:
    rows = 0
    for shard in shardformat.list_shards(out):
        shardformat.read_metadata(shard)
        rows += pq.ParquetFile(shard).read().num_rows
    return rows


def _proc_start(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] == "Z" else fields[19]  # state, starttime


def descendants(pid: int) -> dict[int, str]:
    """pid -> start time of every live descendant (decode workers, the resource tracker)."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    parents[int(entry)] = int(fh.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    found, frontier = {}, [pid]
    while frontier:
        p = frontier.pop()
        for child, parent in parents.items():
            if parent == p and child not in found:
                start = _proc_start(child)
                if start is not None:
                    found[child] = start
                    frontier.append(child)
    return found


def wait_gone(procs: dict[int, str], timeout: float = 15.0) -> dict[int, str]:
    deadline = time.monotonic() + timeout
    alive = dict(procs)
    while alive and time.monotonic() < deadline:
        alive = {p: s for p, s in alive.items() if _proc_start(p) == s}
        time.sleep(0.05)
    return alive


def timed_run(cmd, out_arg: str = "--out") -> tuple[float, float, subprocess.CompletedProcess]:
    """Run to completion; return (seconds, seconds until it held the output lock, result)."""
    out = Path(cmd[cmd.index(out_arg) + 1])
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_lock(proc, out)
    t_locked = time.monotonic() - t0
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    return time.monotonic() - t0, t_locked, subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def wait_for_lock(proc: subprocess.Popen, out: Path, timeout: float = 120) -> bool:
    """Wait until ``proc`` holds the output lock (it writes its pid into OUT/_lock once it has the flock)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if Path(meta_file(out, "lock")).read_text().strip() == str(proc.pid):
                return True
        except OSError:
            pass
        time.sleep(0.002)
    return False


def wait_for_new_shards(proc: subprocess.Popen, out: Path, before: set, n: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if out.exists() and len(set(shardformat.list_shards(out)) - before) >= n:
            return
        time.sleep(0.002)


def lock_is_free(out: Path) -> bool:
    try:
        with OutputLock(str(out)):
            return True
    except Exception:
        return False


# ------------------------------------------------------------------------------------------ kill -9 loop

@pytest.mark.faults
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_kill_9_at_20_random_moments_then_resume_loses_nothing(tmp_path):
    kills_wanted = 20
    rng = np.random.default_rng(SEED)
    root = tmp_path / "images"
    state = make_tree(root, per_class=110)
    tiny = make_tiny_onnx(tmp_path / "tiny.onnx", channels=16)
    out = tmp_path / "out"
    args = ["--images", root, "--out", out, "--onnx", tiny, "--input-size", INPUT_SIZE, "--batch-size", 8,
            "--shard-size", 8, "--workers", 1, "--no-progress"]
    log = [f"kill -9 loop: seed {SEED} (set FAULTS_SEED to replay), {len(state)} inputs"]

    # Calibrate the moments on this machine: a full run (and when, in it, the lock was taken) and a no-op run.
    calib = [tmp_path / "calib" if a == out else a for a in args]
    t_full, t_locked, _ = timed_run(cli(*calib))
    t_noop, _, _ = timed_run(cli(*calib))
    shutil.rmtree(tmp_path / "calib")
    t_work = t_full - t_locked
    log.append(f"calibration: full run {t_full:.2f}s (lock taken at {t_locked:.2f}s), no-op run {t_noop:.2f}s")

    # The moments cycle through three kinds: random from the start of the process (start-up, listing,
    # planning); random after the run has taken the output lock (decoder start-up, inference, writes,
    # compaction, errors table, summary); and a few milliseconds after a random number of new shards appeared
    # (mid-run, with writes in flight). All are drawn from the seeded generator.
    kills = finished = 0
    attempt = 0
    while kills < kills_wanted:
        attempt += 1
        assert attempt <= 3 * kills_wanted, "\n".join(log)
        mode = ("start", "lock", "shards")[attempt % 3]
        delay = float({"start": rng.uniform(0.3 * t_noop, 1.1 * t_full), "lock": rng.uniform(0, 1.2 * t_work),
                       "shards": rng.uniform(0, 0.03)}[mode])
        n_shards = int(rng.integers(1, 8))
        before = set(shardformat.list_shards(out)) if out.exists() else set()
        stderr = tmp_path / f"attempt-{attempt:02d}.err"
        with open(stderr, "wb") as err:
            proc = subprocess.Popen(cli(*args), cwd=REPO, stdout=subprocess.DEVNULL, stderr=err)
        if mode == "lock":
            wait_for_lock(proc, out)
        elif mode == "shards":
            wait_for_new_shards(proc, out, before, n_shards)
        try:
            rc = proc.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            rc = None
        if rc is None:
            children = descendants(proc.pid)
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=60)
            kills += 1
            outcome = f"killed (#{kills}), {len(children)} child process(es)"
            lingering = wait_gone(children)
            assert not lingering, f"processes outlived the killed run: {lingering}\n" + "\n".join(log)
        else:
            finished += 1
            outcome = f"finished first (rc {rc})"
            assert rc == 0, stderr.read_text()
        rows = assert_every_shard_opens(out) if out.exists() else 0
        paths = pq.read_table(out).column("path").to_pylist() if rows else []
        assert lock_is_free(out), "a killed run left the output locked"
        note = mutate(root, state, rng, attempt)
        when = {"start": "start", "lock": "the lock", "shards": f"{n_shards} new shard(s)"}[mode]
        new = len(set(shardformat.list_shards(out)) - before) if out.exists() else 0
        log.append(f"attempt {attempt:2d}: {delay:.3f}s after {when} → {outcome}; {new} new shard(s); "
                   f"{rows} rows ({len(paths) - len(set(paths))} stale, awaiting compaction) in "
                   f"{len(shardformat.list_shards(out)) if out.exists() else 0} shards; then {note}")

    # One uninterrupted run to finish, and a reference run from scratch on the final input.
    r = run(cli(*args))
    assert r.returncode == 0, r.stderr
    ref = tmp_path / "ref"
    extract(root, ref, onnx=tiny, input_size=INPUT_SIZE, progress=False)
    log.append(f"final run: {r.stdout.strip().splitlines()[2].strip()}")

    got, want = features_by_path(out), features_by_path(ref)
    table = pq.read_table(out)
    paths = table.column("path").to_pylist()
    good = {p for p, s in state.items() if s == "good"}
    bad = {p for p, s in state.items() if s == "bad"}
    lost = good - set(got)
    log.append(f"{kills} kills survived, {finished} runs finished before their kill, {len(paths)} rows, "
               f"{len(lost)} lost, {len(paths) - len(set(paths))} duplicated")
    print("\n".join(log))
    assert not lost, f"rows lost: {sorted(lost)}"
    assert len(paths) == len(set(paths)), "an image appears more than once"
    assert set(got) == good == set(want)
    for p in want:
        np.testing.assert_allclose(got[p], want[p], rtol=1e-5, atol=1e-5, err_msg=p)
    labels = dict(zip(paths, table.column("label").to_pylist()))
    assert all(labels[p] == p.split("/")[0] for p in paths)
    errors = {e["path"]: e["reason"] for e in pq.read_table(errors_path(out)).to_pylist()}
    assert set(errors) == bad, (sorted(errors), sorted(bad))
    assert not list(out.glob(".tmp-*")), "temporary files left behind"
    assert lock_is_free(out)
    summary = json.loads(Path(meta_file(out, "run.json")).read_text())
    assert summary["listed"] == len(good) + len(bad) - len(LISTING_PROBLEMS)


# ------------------------------------------------------------------------------ disk full / permissions

@pytest.fixture()
def small_tree(tmp_path):
    root = tmp_path / "images"
    state = make_tree(root, per_class=30)
    tiny = make_tiny_onnx(tmp_path / "tiny.onnx")
    ref = tmp_path / "ref"
    extract(root, ref, onnx=tiny, input_size=INPUT_SIZE, progress=False)
    return root, state, tiny, ref


def _extract(root, out, tiny, **kw):
    return extract(root, out, onnx=tiny, input_size=INPUT_SIZE, batch_size=8, shard_size=8, workers=1,
                   progress=False, **kw)


def _assert_exactly_once_like(out: Path, ref: Path, state: dict) -> None:
    got, want = features_by_path(out), features_by_path(ref)
    paths = pq.read_table(out).column("path").to_pylist()
    assert len(paths) == len(set(paths)) and set(got) == set(want) == {p for p, s in state.items() if s == "good"}
    for p in want:
        np.testing.assert_allclose(got[p], want[p], rtol=1e-5, atol=1e-5)
    errors = {e["path"] for e in pq.read_table(errors_path(out)).to_pylist()}
    assert errors == {p for p, s in state.items() if s == "bad"}


def _failing_write_table(after_shards: int, exc: OSError, *, everything: bool = False):
    """A pq.write_table that writes half of the file and then fails, once ``after_shards`` shards succeeded."""
    real = pq.write_table
    count = {"shards": 0}

    def fake(table, where, *args, **kwargs):
        is_shard = "feature" in table.column_names
        if is_shard:
            count["shards"] += 1
        if (is_shard and count["shards"] > after_shards) or (everything and count["shards"] >= after_shards):
            buf = io.BytesIO()
            real(table, buf, *args, **kwargs)
            where.write(buf.getvalue()[: len(buf.getvalue()) // 2])  # a partial file on disk, then the error
            raise exc
        return real(table, where, *args, **kwargs)

    return fake


@pytest.mark.faults
@pytest.mark.parametrize("everything", [False, True], ids=["shards-only", "disk-completely-full"])
def test_disk_full_while_writing_shards(small_tree, tmp_path, monkeypatch, everything):
    root, state, tiny, ref = small_tree
    out = tmp_path / "out"
    enospc = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(pq, "write_table", _failing_write_table(3, enospc, everything=everything))
    with pytest.raises(OSError) as info:
        _extract(root, out, tiny)
    message = str(info.value)
    # clear: says what failed, where, and why — not only the errors table or summary that failed after it
    assert "No space left on device" in message and "shard" in message and str(out) in message, message
    assert isinstance(info.value, OSError) and errno.ENOSPC in (info.value.errno, getattr(info.value.__cause__, "errno", 0))
    assert 1 <= len(shardformat.list_shards(out)) <= 3
    assert assert_every_shard_opens(out) <= 24  # finished shards are whole
    assert not list(out.glob(".tmp-*")), "a partial temporary file was left"
    monkeypatch.undo()
    s = _extract(root, out, tiny)  # the disk has room again
    assert s.already_done == assert_every_shard_opens(out) - s.extracted
    _assert_exactly_once_like(out, ref, state)
    assert not list(out.glob(".tmp-*"))


@pytest.mark.faults
def test_disk_full_while_compacting_old_shards(small_tree, tmp_path, monkeypatch):
    """Compaction rewrites shards that hold stale rows; a failed rewrite must leave the old shard whole."""
    root, state, tiny, ref = small_tree
    out = tmp_path / "out"
    _extract(root, out, tiny)
    before = {Path(p).name for p in shardformat.list_shards(out)}
    rng = np.random.default_rng(SEED)
    for rel in sorted(p for p, s in state.items() if s == "good")[::7]:  # new content: old rows go stale
        _photo_crop(rng).save(root / rel, format="PNG" if rel.endswith(".png") else "JPEG", quality=90)
    real = pq.write_table

    def fake(table, where, *args, **kwargs):
        name = os.path.basename(getattr(where, "name", "")).removesuffix(".partial")
        if any(name.endswith("-" + b) for b in before):  # rewriting an existing shard: the disk is full
            where.write(b"PAR1 half a shard")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(table, where, *args, **kwargs)

    monkeypatch.setattr(pq, "write_table", fake)
    with pytest.raises(OSError) as info:
        _extract(root, out, tiny)
    assert "No space left on device" in str(info.value) and "part-" in str(info.value), str(info.value)
    assert before <= {Path(p).name for p in shardformat.list_shards(out)}
    assert_every_shard_opens(out)
    assert not list(out.glob(".tmp-*"))
    monkeypatch.undo()
    s = _extract(root, out, tiny)
    assert s.extracted == 0 and s.removed_rows > 0
    ref2 = tmp_path / "ref2"
    _extract(root, ref2, tiny)
    _assert_exactly_once_like(out, ref2, state)


@pytest.mark.faults
def test_disk_full_while_writing_the_run_summary(small_tree, tmp_path, monkeypatch):
    import shardformat.io as writer_module  # the one atomic writer every file (shards, small files) goes through

    root, state, tiny, ref = small_tree
    out = tmp_path / "out"
    real_open = open

    class FullDisk:
        def __init__(self, fh):
            self.fh = fh

        def write(self, data):
            self.fh.write(data[: len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.fh.close()

    def guarded_open(path, mode="r", *args, **kwargs):
        fh = real_open(path, mode, *args, **kwargs)
        return FullDisk(fh) if "w" in mode and "run.json" in os.fspath(path) else fh

    monkeypatch.setattr(writer_module, "open", guarded_open, raising=False)
    with pytest.raises(OSError) as info:
        _extract(root, out, tiny)
    assert "No space left on device" in str(info.value) and "run.json" in str(info.value), str(info.value)
    assert not list(Path(meta_dir(out)).glob(".tmp-*")), "the half-written summary was left behind"
    monkeypatch.undo()
    s = _extract(root, out, tiny)
    assert s.extracted == 0
    _assert_exactly_once_like(out, ref, state)


@pytest.mark.faults
def test_disk_full_via_the_cli_prints_one_clear_line(small_tree, tmp_path, monkeypatch, capsys):
    from stage1_extract.cli import main

    root, state, tiny, ref = small_tree
    out = tmp_path / "out"
    monkeypatch.setattr(pq, "write_table", _failing_write_table(2, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))))
    rc = main(["--images", str(root), "--out", str(out), "--onnx", str(tiny), "--input-size", str(INPUT_SIZE),
               "--batch-size", "8", "--shard-size", "8", "--workers", "1", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1
    assert err.startswith("stage1-extract: error: ") and "No space left on device" in err and "Traceback" not in err
    monkeypatch.undo()
    _extract(root, out, tiny)
    _assert_exactly_once_like(out, ref, state)


@pytest.mark.faults
def test_permission_error_while_writing_a_shard(small_tree, tmp_path, monkeypatch):
    import shardformat.io as sio

    root, state, tiny, ref = small_tree
    out = tmp_path / "out"
    real_open = open
    opened = {"shards": 0}

    def guarded_open(path, mode="r", *args, **kwargs):
        if "w" in mode and "part-" in os.fspath(path):
            opened["shards"] += 1
            if opened["shards"] > 2:
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(path))
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(sio, "open", guarded_open, raising=False)  # shadows the builtin in shardformat.io only
    with pytest.raises(OSError) as info:
        _extract(root, out, tiny)
    assert "Permission denied" in str(info.value) and "shard" in str(info.value), str(info.value)
    assert len(shardformat.list_shards(out)) == 2 and assert_every_shard_opens(out) == 16
    assert not list(out.glob(".tmp-*"))
    monkeypatch.undo()
    _extract(root, out, tiny)
    _assert_exactly_once_like(out, ref, state)


@pytest.mark.faults
def test_read_only_output_directory_for_real(small_tree, tmp_path):
    """Permissions enforced by the kernel (as root: a child without CAP_DAC_OVERRIDE), not by a patch."""
    from tests.stage1.test_bad_inputs import python_obeying_file_modes

    python = python_obeying_file_modes()
    if python is None:
        pytest.skip("running as root and cannot drop CAP_DAC_OVERRIDE here, so file modes cannot be enforced")
    root, state, tiny, ref = small_tree
    out = tmp_path / "out"
    args = ["-m", "stage1_extract", "--images", str(root), "--out", str(out), "--onnx", str(tiny), "--input-size",
            str(INPUT_SIZE), "--batch-size", "8", "--shard-size", "8", "--workers", "1", "--no-progress"]
    out.mkdir()
    (out / "_lock").touch()  # as left by an earlier run; the folder itself is read-only
    out.chmod(0o555)
    try:
        r = run(python + args)
        listing = sorted(os.listdir(out))
    finally:
        out.chmod(0o755)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "Permission denied" in r.stderr and "shard" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert listing == ["_lock"], listing  # nothing partial left behind
    r = run(python + args)
    assert r.returncode == 0, r.stderr
    _assert_exactly_once_like(out, ref, state)


def _mount_tmpfs(where: Path, size: str) -> bool:
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    where.mkdir(parents=True, exist_ok=True)
    try:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True,
                           timeout=30)
    except (OSError, subprocess.SubprocessError):
        return False
    return r.returncode == 0


@pytest.mark.faults
def test_disk_full_on_a_real_small_filesystem(small_tree, tmp_path):
    """A 96 KiB tmpfs fills up part-way through the run; after it is enlarged the next run completes."""
    root, state, tiny, ref = small_tree
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "96k"):
        pytest.skip("cannot mount a small tmpfs here (needs root and CAP_SYS_ADMIN); the patched ENOSPC tests cover it")
    try:
        out = disk / "out"
        args = cli("--images", root, "--out", out, "--onnx", tiny, "--input-size", INPUT_SIZE, "--batch-size", 4,
                   "--shard-size", 4, "--workers", 1, "--no-progress")
        r = run(args)
        assert r.returncode == 1, r.stdout + r.stderr
        assert "No space left on device" in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert_every_shard_opens(out)
        assert not list(out.glob(".tmp-*")), "a partial temporary file was left on the full disk"
        subprocess.run(["mount", "-o", "remount,size=16m", str(disk)], check=True, timeout=30)
        r = run(args)
        assert r.returncode == 0, r.stderr
        _assert_exactly_once_like(out, ref, state)
        assert not list(out.glob(".tmp-*"))
    finally:
        subprocess.run(["umount", "-l", str(disk)], timeout=30)


# ---------------------------------------------------------------------------------------------- locking

@pytest.mark.faults
@pytest.mark.timeout(300)
def test_second_run_on_the_same_output_refuses_while_the_first_writes(tmp_path):
    root = tmp_path / "images"
    state = make_tree(root, per_class=60)
    tiny = make_tiny_onnx(tmp_path / "tiny.onnx")
    out = tmp_path / "out"
    args = cli("--images", root, "--out", out, "--onnx", tiny, "--input-size", INPUT_SIZE, "--batch-size", 2,
               "--shard-size", 2, "--workers", 1, "--no-progress")
    for _ in range(5):  # catch the first run while it holds the lock (it may be quicker than the poll)
        shutil.rmtree(out, ignore_errors=True)
        first = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and first.poll() is None:
            try:
                if Path(meta_file(out, "lock")).read_text().strip() == str(first.pid):
                    break
            except OSError:
                pass
            time.sleep(0.002)
        first.send_signal(signal.SIGSTOP)
        if first.poll() is None:
            break
        first.communicate(timeout=60)
    else:
        pytest.fail("could not catch the first run while it held the lock")
    try:
        before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
        second = run(args, timeout=120)
        after = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    finally:
        first.send_signal(signal.SIGCONT)
    assert second.returncode == 1
    assert f"in use by another stage1-extract run (pid {first.pid})" in second.stderr, second.stderr
    assert before == after, "the refused run touched the output"
    stdout, stderr = first.communicate(timeout=120)
    assert first.returncode == 0, stderr
    paths = pq.read_table(out).column("path").to_pylist()
    assert len(paths) == len(set(paths)) and set(paths) == {p for p, s in state.items() if s == "good"}
    again = run(args, timeout=120)
    assert again.returncode == 0 and "extracted 0" in again.stdout


# -------------------------------------------------------------------------------------------- stage 2

def _stage2_available() -> str | None:
    try:
        import stage2_classify  # noqa: F401
        from stage2_classify.runs.load import MARKER, check_run  # noqa: F401
    except Exception as exc:  # pragma: no cover - stage 2 not written yet
        return f"stage2_classify is not importable yet ({type(exc).__name__}: {exc})"
    if not hasattr(stage2_classify, "train") or not hasattr(stage2_classify, "predict"):
        return "stage2_classify has no train/predict yet"
    return None


@pytest.mark.faults
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_training_killed_mid_way_leaves_no_model_that_predict_would_load(tmp_path):
    reason = _stage2_available()
    if reason:
        pytest.skip(reason)
    import stage2_classify as s2
    from stage2_classify import RunDirError
    from stage2_classify.runs.layout import MARKER

    root = make_image_tree(tmp_path / "images", per_class=30, size=48)
    shards = tmp_path / "shards"
    extract(root, shards, onnx=make_tiny_onnx(tmp_path / "tiny.onnx", channels=16), input_size=INPUT_SIZE,
            progress=False)
    rng = np.random.default_rng(SEED)

    def train_cmd(out):
        return [sys.executable, "-m", "stage2_classify", "train", "--shards", str(shards), "--out", str(out),
                "--epochs", "25", "--patience", "25", "--batch-size", "16", "--quiet"]

    def assert_absent_or_complete(run_dir: Path) -> str:
        if not run_dir.exists():
            with pytest.raises(RunDirError):
                s2.predict(shards, run_dir, tmp_path / "p.csv")
            return "absent"
        s2.load_run(run_dir)  # complete: loads (safe mode) and predicts
        s2.predict(shards, run_dir, tmp_path / "p.csv")
        return "complete"

    env = {**os.environ, "KERAS_BACKEND": "torch"}
    t0 = time.monotonic()
    r = run(train_cmd(tmp_path / "calib"), timeout=300, env=env)
    t_full = time.monotonic() - t0
    assert r.returncode == 0, r.stderr
    log = [f"stage-2 kill loop: seed {SEED}, full training run {t_full:.1f}s"]

    # A run directory that never completed: killed at random moments, it must never appear as a loadable run.
    fresh = tmp_path / "fresh"
    # Re-training over a complete run directory: killed, the old complete run must still be the one found.
    existing = tmp_path / "existing"
    shutil.copytree(tmp_path / "calib", existing)
    kills = mid_write = 0
    plan = [(fresh, "write"), (existing, "write"), (fresh, "time"), (existing, "time")]
    for target, mode in plan:
        delay = float(rng.uniform(0.3, 1.0) * t_full if mode == "time" else rng.uniform(0, 0.15))
        was_complete = (target / MARKER).is_file()
        stale = set(tmp_path.glob(f".tmp-{target.name}-*"))  # left by an earlier killed run

        def writing() -> bool:
            return bool(set(tmp_path.glob(f".tmp-{target.name}-*")) - stale)

        proc = subprocess.Popen(train_cmd(target), cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        if mode == "write":  # kill while the run directory is being written under its temporary name
            deadline = time.monotonic() + 300
            while proc.poll() is None and time.monotonic() < deadline and not writing():
                time.sleep(0.005)
        try:
            rc = proc.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            now_writing = writing()
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=60)
            rc = "killed while writing the run directory" if now_writing else "killed"
            kills += 1
            mid_write += now_writing
        state = assert_absent_or_complete(target)
        if was_complete:
            assert state == "complete", "re-training killed mid-way lost the previous complete run"
        log.append(f"{target.name}: {mode} mode, stopped after {delay:.2f}s ({rc}); run directory {state}; "
                   f"leftovers {sorted(p.name for p in tmp_path.glob('.tmp-*'))}")
    print("\n".join(log))
    assert kills >= 2 and mid_write >= 2, "\n".join(log)  # the timed kills may land after a finished run

    # a run directory without its completion marker (as a crash inside it would leave) is refused
    half = tmp_path / "half"
    shutil.copytree(tmp_path / "calib", half)
    (half / MARKER).unlink()
    with pytest.raises(RunDirError, match="not a complete training run"):
        s2.load_run(half)
    # a later complete run clears what killed runs left behind
    r = run(train_cmd(fresh), timeout=300, env=env)
    assert r.returncode == 0, r.stderr
    assert assert_absent_or_complete(fresh) == "complete"
    assert not list(tmp_path.glob(".tmp-fresh-*"))
