"""The decode pool: every image back exactly once with the right pixels at any batch size, and no hang and
no innocent image blamed whatever happens to a worker (killed idle or busy, segfault, hang, SIGBUS).

Faults are placed deterministically with ``STAGE1_FAULTS`` (see ``tests/support/faults.py``): a
worker crashes or blocks on a chosen file, and the test acts at that point instead of racing the clock.
"""

from __future__ import annotations

import os
import signal
import threading
import types
import time
from pathlib import Path

import numpy as np
import pytest

from stage1_extract.decoding.image import decode_image
from stage1_extract.decoding.pool import DecodePool, DecodePoolError
from stage1_extract.model.preprocessing import Preprocessing
from tests.support.helpers import make_image_tree
from tests.support.faults import fault_env

PREP = Preprocessing(32, 37)
pytestmark = pytest.mark.timeout(300)  # a hang fails the test instead of the suite


@pytest.fixture(scope="module")
def paths(tmp_path_factory) -> list[str]:
    root = make_image_tree(tmp_path_factory.mktemp("pool") / "imgs", per_class=8, size=48)
    found = sorted(str(p) for p in root.rglob("*.jpg"))
    (root / "garbage.jpg").write_bytes(b"not a picture at all" * 5)
    return found[:10] + [str(root / "garbage.jpg"), str(root / "missing.jpg")] + found[10:]


@pytest.fixture
def faults(monkeypatch, tmp_path):
    """Set the fault plan for workers started after this call; markers of ``block`` go to tmp_path."""

    def plan(*pairs: tuple[str, str]) -> Path:
        plan = ";".join(f"{action}:{os.path.basename(p)}" for action, p in pairs)
        for name, value in fault_env(plan, tmp_path).items():
            monkeypatch.setenv(name, value)
        return tmp_path

    return plan


def collect(pool: DecodePool, paths: list[str]) -> dict[int, object]:
    """Run the pool; check each image comes back once, with exactly the pixels decode_image gives."""
    seen = {}
    for batch in pool.run(paths):
        ok = [it for it in batch.items if it.row >= 0]
        assert [it.row for it in ok] == list(range(len(ok))) and len(batch.pixels) == len(ok)
        for it in batch.items:
            assert it.index not in seen, f"{paths[it.index]} came back twice"
            seen[it.index] = it
            if it.row >= 0:
                want = decode_image(Path(paths[it.index]).read_bytes(), PREP)
                assert np.array_equal(batch.pixels[it.row], want), paths[it.index]
    assert sorted(seen) == list(range(len(paths)))
    return seen


def errors(seen: dict, paths: list[str]) -> dict[str, tuple[str, bool]]:
    return {os.path.basename(paths[i]): (it.reason, it.transient) for i, it in seen.items() if it.row < 0}


EXPECTED = {"garbage.jpg": ("not an image PIL can identify", False),
            "missing.jpg": ("cannot open: No such file or directory", False)}


@pytest.mark.parametrize("batch_size", [1, 5, 16, 64])
def test_every_image_once_with_the_right_pixels_at_any_batch_size(paths, batch_size):
    with DecodePool(PREP, batch_size=batch_size, workers=2) as pool:
        assert 1 <= pool.task_size <= min(batch_size, 32)
        assert errors(collect(pool, paths), paths) == EXPECTED
        assert errors(collect(pool, paths), paths) == EXPECTED  # a pool runs more than once


def test_a_batch_is_shared_by_all_workers(paths):
    with DecodePool(PREP, batch_size=64, workers=4) as pool:
        assert pool.task_size == 16  # 64 / 4 workers: the first batch is ready after 16 images each


def test_workers_killed_while_idle(paths):
    with DecodePool(PREP, batch_size=8, workers=2) as pool:
        collect(pool, paths)  # now both wait for work
        for pid in pool.worker_pids():
            os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)
        assert errors(collect(pool, paths), paths) == EXPECTED


def _kill_when_blocked(marker: Path, found: list) -> threading.Thread:
    def watch():
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if marker.exists() and marker.read_text():
                pid = int(marker.read_text())
                found.append(pid)
                os.kill(pid, signal.SIGKILL)
                return
            time.sleep(0.01)

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    return t


def test_worker_killed_while_busy_loses_nothing_and_blames_nobody(paths, faults):
    target = paths[14]
    folder = faults(("block", target))
    killed: list[int] = []
    with DecodePool(PREP, batch_size=16, workers=2) as pool:
        watcher = _kill_when_blocked(folder / (os.path.basename(target) + ".blocked"), killed)
        seen = collect(pool, paths)
        watcher.join()
    assert killed, "the worker never reached the blocking file"
    assert errors(seen, paths) == EXPECTED  # the images of the killed task were all decoded again


def test_a_decoder_that_segfaults_on_chosen_files(paths, faults):
    bad = [paths[3], paths[17]]
    faults(("segv", bad[0]), ("segv", bad[1]))
    with DecodePool(PREP, batch_size=16, workers=2) as pool:
        got = errors(collect(pool, paths), paths)
    crashed = ("decoder process crashed on this file (SIGSEGV)", False)  # the file's fault: remembered
    assert got == {**EXPECTED, os.path.basename(bad[0]): crashed, os.path.basename(bad[1]): crashed}


def test_a_worker_killed_twice_on_the_same_file_is_a_transient_error(paths, faults):
    faults(("kill", paths[5]))
    with DecodePool(PREP, batch_size=16, workers=2) as pool:
        got = errors(collect(pool, paths), paths)
    reason, transient = got.pop(os.path.basename(paths[5]))
    assert "killed (SIGKILL)" in reason and transient  # e.g. the OOM killer: retried next run
    assert got == EXPECTED


def test_watchdog_stops_a_worker_stuck_on_one_image(paths, faults):
    faults(("hang", paths[8]))
    t0 = time.monotonic()
    with DecodePool(PREP, batch_size=16, workers=2, item_timeout=1.0) as pool:
        got = errors(collect(pool, paths), paths)
    reason, transient = got.pop(os.path.basename(paths[8]))
    assert "took over 1 s" in reason and transient
    assert got == EXPECTED
    assert time.monotonic() - t0 < 30


def test_sigbus_is_reported_as_shared_memory_never_blamed_on_an_image(paths, faults):
    faults(("bus", paths[2]))
    with DecodePool(PREP, batch_size=16, workers=2) as pool:
        with pytest.raises(DecodePoolError, match="SIGBUS.*/dev/shm"):
            collect(pool, paths)


def test_workers_that_cannot_start_stop_the_run_with_a_message(paths, monkeypatch):
    with DecodePool(PREP, batch_size=16, workers=2) as pool:
        broken = types.SimpleNamespace(input_size=32, to_dict=lambda: {"no such field": 1})
        monkeypatch.setattr(pool, "prep", broken)  # a replacement worker now fails at start-up
        for pid in pool.worker_pids():
            os.kill(pid, signal.SIGKILL)
        with pytest.raises(DecodePoolError, match="keep dying before decoding anything"):
            collect(pool, paths)


def test_abandoned_run_leaves_the_pool_usable(paths):
    with DecodePool(PREP, batch_size=4, workers=2) as pool:
        for _ in pool.run(paths):
            break  # e.g. --strict stopping at the first bad image
        assert errors(collect(pool, paths), paths) == EXPECTED
