"""How decode workers start and what they leave behind (issue 24): a sandbox that forbids processes gets
in-process decoding with one warning; ``kill -9`` of a whole run leaves no ``/dev/shm`` block for ever; no
resource-tracker process (whose loss ended runs in ``KeyError: '/psm_…'``) is involved."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from stage1_extract.decoding import factory, worker
from stage1_extract.decoding.image import decode_image
from stage1_extract.model.preprocessing import Preprocessing
from tests.support.helpers import make_image_tree

REPO = Path(__file__).resolve().parents[2]
PREP = Preprocessing(32, 37)
pytestmark = pytest.mark.timeout(120)

HOLD_A_POOL = """
import os, sys, time
from stage1_extract.decoding.pool import DecodePool
from stage1_extract.model.preprocessing import Preprocessing
pool = DecodePool(Preprocessing(32, 37), batch_size=4, workers=2)
print(os.path.join("/dev/shm", os.path.basename(pool._shm.name)), flush=True)
time.sleep(600)
"""

USE_A_POOL = """
import sys
from stage1_extract.decoding.pool import DecodePool
from stage1_extract.model.preprocessing import Preprocessing
with DecodePool(Preprocessing(32, 37), batch_size=4, workers=2) as pool:
    n = sum(len(b.items) for b in pool.run(sys.argv[1:]))
print(n, "multiprocessing.resource_tracker" in sys.modules)
"""


@pytest.fixture(scope="module")
def paths(tmp_path_factory) -> list[str]:
    root = make_image_tree(tmp_path_factory.mktemp("start") / "imgs", per_class=2, size=40)
    (root / "garbage.jpg").write_bytes(b"not an image" * 10)
    return sorted(str(p) for p in root.rglob("*.jpg"))


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


def test_where_no_process_can_start_decoding_happens_in_process_said_once(paths, monkeypatch, caplog):
    def forbidden(*args, **kwargs):
        raise PermissionError(1, "Operation not permitted")  # what a seccomp/sandbox gives

    monkeypatch.setattr(worker.subprocess, "Popen", forbidden)
    monkeypatch.setattr(factory, "_warned", False)
    with caplog.at_level(logging.WARNING, logger="stage1_extract.decoding.factory"):
        for _ in range(2):
            with factory.make_decoder("cpu", PREP, 3, 2, False) as dec:
                assert isinstance(dec, factory.InProcessDecoder)
                seen = {}
                for batch in dec.run(paths):
                    for it in batch.items:
                        seen[it.index] = it
                        if it.row >= 0:
                            want = decode_image(Path(paths[it.index]).read_bytes(), PREP)
                            assert np.array_equal(batch.pixels[it.row], want)
    assert sorted(seen) == list(range(len(paths)))
    assert [os.path.basename(paths[i]) for i, it in seen.items() if it.row < 0] == ["garbage.jpg"]
    said = [r.getMessage() for r in caplog.records if "decoding in this process" in r.getMessage()]
    assert len(said) == 1 and "cannot start a decode worker process" in said[0], said


def test_the_pool_needs_no_resource_tracker(paths):
    r = subprocess.run([sys.executable, "-c", USE_A_POOL, *paths], capture_output=True, text=True, env=_env(),
                       timeout=100)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [str(len(paths)), "False"], r.stdout + r.stderr
    assert "leaked" not in r.stderr and "KeyError" not in r.stderr, r.stderr


@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="no /dev/shm")
def test_kill_9_of_the_whole_run_leaves_nothing_in_dev_shm_after_the_next_start():
    proc = subprocess.Popen([sys.executable, "-c", HOLD_A_POOL], stdout=subprocess.PIPE, text=True, env=_env(),
                            start_new_session=True)
    try:
        block = proc.stdout.readline().strip()
        assert block and os.path.exists(block), block
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the run, its workers and any helper process, at once
        proc.wait()
    time.sleep(0.5)  # nobody could clean up (unless another stage-1 run started meanwhile: it sweeps too)
    from stage1_extract.decoding.pool import DecodePool

    with DecodePool(PREP, batch_size=2, workers=1) as pool:  # the next run's start sweeps it
        assert not os.path.exists(block), f"{block} is still in /dev/shm"
        mine = os.path.join("/dev/shm", os.path.basename(pool._shm.name))
        assert os.path.exists(mine)
    assert not os.path.exists(mine)


def test_a_live_runs_block_is_never_swept(tmp_path):
    from stage1_extract.decoding import shm

    block, _, _ = shm.allocate_slots(64, 1024, 2, 1)
    try:
        os.utime(block.name, (0, 0))  # old, and (for the sweeper) owned by a live process: still held
        assert block.name not in shm.sweep_stale()
        assert os.path.exists(block.name)
    finally:
        block.close()
        block.unlink()


def test_a_replacement_worker_outlives_the_run_that_started_it(paths):
    """A worker that dies is replaced from the pool's dispatcher thread, which ends with the run: Linux's
    parent-death signal follows that thread, so the replacement must not rely on it."""
    from stage1_extract.decoding.pool import DecodePool

    many = paths * 6  # more batches than slots: the dispatcher is alive while the caller holds a batch
    with DecodePool(PREP, batch_size=2, workers=2) as pool:
        dead = pool.worker_pids()[0]
        os.kill(dead, signal.SIGKILL)  # idle: the run's dispatcher replaces it first thing
        for i, _ in enumerate(pool.run(many)):
            if i == 0:
                time.sleep(3.0)  # the replacement gets going (and, before the fix, armed its death signal)
        time.sleep(0.5)
        assert dead not in pool.worker_pids()
        assert all(w.proc.exitcode is None for w in pool._workers.values()), \
            [w.proc.exitcode for w in pool._workers.values()]
        assert sum(len(b.items) for b in pool.run(paths)) == len(paths)
