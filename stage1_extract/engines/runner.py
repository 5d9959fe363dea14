"""One runner for every engine: the run's start and end exist once, an engine only processes the planned items.

    list inputs ─► prepare the model ─► open the run (lock, plan) ─► engine.process(run, model) ─► finish the run
                                                                     (local processes, or Ray)    (errors, run.json)

The start (check ``out``, list ``images``, export or find the model, lock, compatibility check, incremental
plan) and the end (errors table, strict check, compaction, summary) are :mod:`stage1_extract.run.lifecycle`'s;
here they are called in one order for every engine, and the engine is chosen in this one place.
"""

from __future__ import annotations

import os
import time

from stage1_extract.model.export import prepare_model
from stage1_extract.options import ENGINES, ExtractOptions
from stage1_extract.run.lifecycle import ExtractSummary, list_inputs, open_run
from stage1_extract.errors import OptionError


def make_engine(options: ExtractOptions):
    """The engine ``options.engine`` names, checked against the options before any work is done."""
    if options.engine == "local":
        from stage1_extract.engines.local import LocalEngine

        return LocalEngine(options)
    if options.engine == "ray":
        from stage1_extract.engines.ray_driver import RayEngine

        return RayEngine(options)
    raise OptionError(f"engine must be {' or '.join(map(repr, ENGINES))}, not {options.engine!r}")


def run_extraction(images: str | os.PathLike, out: str | os.PathLike, options: ExtractOptions) -> ExtractSummary:
    """Extract ``images`` into ``out`` with ``options`` (see :func:`stage1_extract.extract`)."""
    engine = make_engine(options)
    t_start = time.perf_counter()
    # first: a wrong --images or --out is reported before the model export
    out, listing = list_inputs(images, out, group_regex=options.group_regex, dicom_frames=options.dicom_frames,
                               dicom_group=options.dicom_group, group_salt=options.group_salt)
    model = prepare_model(options.backbone, weights=options.weights, onnx=options.onnx,
                          precision=options.precision, input_size=options.input_size, resize=options.resize,
                          mean=options.mean, std=options.std, interpolation=options.interpolation,
                          backbone_from=options.backbone_from)
    with open_run(listing, out, model, provider=options.provider, strict=options.strict, t_start=t_start,
                  lock_wait=options.lock_wait) as run:
        if run.todo:
            engine.process(run, model)
    return run.summary
