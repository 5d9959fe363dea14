"""The local engine: decoders (worker processes or the GPU's) → ONNX Runtime → shard writer, on this machine.

Decoding, copies to the device and inference overlap (:mod:`stage1_extract.runtime.inference`), shards are
written by a background thread (:mod:`stage1_extract.run.writer`), and the loop times each part, so the
summary shows at once which part is the wall. The run's start and end are the runner's
(:mod:`stage1_extract.engines.runner`).
"""

from __future__ import annotations

import logging
import os
import sys
import time

from stage1_extract.decoding.factory import check_decode, make_decoder
from stage1_extract.options import ExtractOptions
from stage1_extract.run.lifecycle import check_finite, default_batch_size
from stage1_extract.run.writer import Interrupted, ShardWriter, run_stamp

log = logging.getLogger(__name__)


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover
        return os.cpu_count() or 1


def default_workers(on_gpu: bool) -> int:
    """On CPU one decode worker per core: they share the cores with ONNX Runtime, and idle (blocked on a free
    slot) whenever the model is the slower side, so extra workers cost nothing on small images, while large
    photographs (~25 ms each to decode, 3× the model's time per image) need them all."""
    cores = _cpu_count()
    return max(1, cores - 1) if on_gpu else cores


def progress_bar(total: int, enabled: bool):
    from tqdm import tqdm

    # None: no bar when stderr is not a terminal (a redirected log would fill with carriage-return frames)
    return tqdm(total=total, unit="img", desc="extracting", disable=None if enabled else True, dynamic_ncols=True,
                smoothing=0.1, file=sys.stderr)


class LocalEngine:
    """Processes a run's planned images on this machine."""

    def __init__(self, options: ExtractOptions) -> None:
        check_decode(options.decode)
        self.options = options

    def process(self, run, model) -> None:
        from stage1_extract.runtime.session import FeatureSession, wants_gpu

        o = self.options
        bs = o.batch_size or default_batch_size(wants_gpu(o.provider))
        session = FeatureSession(model.onnx_path, provider=o.provider, input_size=model.preprocessing.input_size,
                                 batch_size=bs, threads=o.threads, cuda=o.cuda, precision=model.precision)
        run.summary.provider = session.provider
        n_workers = o.workers or default_workers(session.on_gpu)
        writer = ShardWriter(run.out, run.meta, shard_size=o.shard_size, stamp=run_stamp())
        bar = progress_bar(len(run.todo), o.progress)
        t_loop = time.perf_counter()
        try:
            self._loop(run, model, session, n_workers, writer, bar)
            writer.close()
        except BaseException as exc:
            if isinstance(exc, KeyboardInterrupt):  # the rows computed so far are complete: keep them
                try:
                    writer.close()
                except Exception as write_exc:
                    log.warning("could not save the rows computed before the interrupt: %s", write_exc)
                raise Interrupted(run.out, writer.written_rows, run.plan.done, by=exc) from None
            writer.abort()
            raise
        finally:
            bar.close()
        run.timings["write"] = writer.write_seconds
        run.loop_done(seconds=time.perf_counter() - t_loop, extracted=writer.written_rows, shards=len(writer.shards))

    def _loop(self, run, model, session, n_workers: int, writer: ShardWriter, bar) -> None:
        from stage1_extract.runtime.inference import OverlappedInference

        o, timings, todo = self.options, run.timings, run.todo

        def write(done) -> None:
            for ok, feats in done:  # features come back in submission order
                recs = [todo[it.index] for it in ok]
                check_finite(feats, [r.path for r in recs])
                writer.add([r.path for r in recs], [r.label for r in recs], [it.content_id for it in ok],
                           [it.file_size for it in ok], [it.mtime_ns for it in ok], feats,
                           groups=[r.group for r in recs])

        with make_decoder(o.decode, model.preprocessing, session.batch_size, n_workers, o.draft) as pool, \
                OverlappedInference(session) as infer:
            t_wait = time.perf_counter()
            for batch in pool.run([r.abspath for r in todo]):
                timings["wait_decode"] += time.perf_counter() - t_wait
                timings["decode_worker"] += batch.decode_seconds
                ok = [it for it in batch.items if it.row >= 0]
                for it in batch.items:
                    if it.row < 0:
                        run.add_error(todo[it.index].path, it.reason, it.content_id, it.file_size,
                                      it.mtime_ns, transient=it.transient)
                if run.stop_for_strict:
                    break
                # the pixels are staged before submit returns: the pool may reuse the batch's slot
                infer.submit(batch.pixels, len(ok), ok)
                write(infer.ready())
                bar.update(len(batch.items))
                bar.set_postfix(errors=len(run.new_errors), refresh=False)
                t_wait = time.perf_counter()
            write(infer.drain())
            timings["infer"] += infer.infer_seconds
