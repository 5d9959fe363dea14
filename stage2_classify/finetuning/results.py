"""The end of a fine-tune: its backbone saved, every image re-extracted with it, and the run directory written.

The run directory is the one ``train`` writes (``runs/files.write_run``: model, metrics, split.csv,
predictions, plots, report, open-set detector), on the fine-tuned vectors and the frozen run's own split,
plus ``backbone.safetensors``, ``finetune.json`` (what stage 1's ``--backbone-from`` reads) and
``comparison.json`` (frozen vs fine-tuned on the same test images).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

from stage2_classify.finetuning.compare import compare_with_frozen, format_comparison



@dataclasses.dataclass
class FinetuneResult:
    run_dir: str
    metrics: dict
    comparison: dict
    history: dict
    features: str  # the fine-tuned vectors of every image of the run (a stage-1 feature folder)
    text: str = dataclasses.field(default="", repr=False)

    def format(self) -> str:
        return self.text


def write_finetuned_run(loaded, rows, tb, *, model_head, state, opts, out: Path, workdir: Path, features: Path,
                        notes: list[str], progress: bool, extract_fn, split_sha256: str):
    from stage1_extract import write_finetuned
    from stage2_classify.data.dataset import load_dataset
    from stage2_classify.data.splitfile import split_from_file
    from stage2_classify.runs.files import write_run
    from stage2_classify.runs.writer import RunWriter
    from stage2_classify.training.fit import FittedHead, metrics_by_split, predict_proba

    tuned_dir = workdir / "backbone"
    tuned_dir.mkdir(parents=True, exist_ok=True)
    provenance = {"run": os.fspath(loaded.path.absolute()), "directory": os.fspath(out),
                  "base_weights_id": loaded.metadata.weights_id, "split_sha256": split_sha256,
                  "epochs": state.epochs_done, "best_epoch": state.best_epoch, "unfreeze": opts.unfreeze}
    write_finetuned(tuned_dir, tb, provenance, staging=True)
    summary = extract_fn(rows, tuned_dir, features, progress)
    ds = load_dataset(features)
    split = split_from_file(ds.paths, loaded.path / "split.csv", content_ids=ds.content_ids)
    proba = predict_proba(model_head, ds.features)
    metrics = metrics_by_split(ds, proba, split, seed=opts.seed)
    metrics["classes"] = ds.classes
    metrics["head"] = {"head": f"fine-tuned (LP-FT, --unfreeze {opts.unfreeze}) backbone and"}  # the report's line
    comparison = compare_with_frozen(loaded.path, ds.classes, ds.content_ids, ds.y, proba, split["test"], opts.seed)
    fitted = FittedHead(model_head, state.history, state.best_epoch, state.seconds, None, kind="finetuned")
    info = {"method": "file", "split_file": os.fspath(loaded.path / "split.csv"), "finetuned_from": os.fspath(
        loaded.path.absolute())}
    writer = RunWriter(out)
    try:
        from stage1_extract import finetune_info_for

        shutil.copyfile(tuned_dir / "backbone.safetensors", writer.path("backbone.safetensors"))
        writer.write_text("finetune.json", finetune_info_for(tuned_dir).decode())
        writer.write_json("comparison.json", comparison)
        final = write_run(writer, shards=features, ds=ds, split=split, notes=notes, opts=opts, fitted=fitted,
                          metrics=metrics, proba=proba, split_info=info,
                          extra_marker={"finetuned_from": os.fspath(loaded.path.absolute()),
                                        "extracted": summary.extracted + summary.already_done})
    except BaseException:
        writer.discard()
        raise
    text = _summary(final, tb, state, metrics, comparison, features, notes)
    if progress:
        print(text, flush=True)
    return FinetuneResult(os.fspath(final), metrics, comparison, state.history, os.fspath(features), text)


def _summary(final: Path, tb, state, metrics: dict, comparison: dict, features: Path, notes: list[str]) -> str:
    lines = [f"fine-tune done: {final}",
             f"  backbone   {tb.spec.name} fine-tuned at {tb.preprocessing.input_size} px: {state.epochs_done} epochs "
             f"in {state.seconds:.0f}s, best epoch {state.best_epoch} (weights restored)"]
    lines += format_comparison(comparison) if comparison.get("test_images") else ["  (no test split to compare)"]
    lines += [f"  note       {n}" for n in notes]
    lines.append(f"  vectors    {features} (stage 2 re-trains on them: stage2-classify train --features {features} "
                 f"--split-file {final / 'split.csv'})")
    lines.append(f"  next       stage2-classify predict --run {final} --images NEW  ·  stage2-classify export "
                 f"--run {final} --out model.onnx")
    return "\n".join(lines)


def read_comparison(run: str | os.PathLike) -> dict | None:
    """A fine-tuned run's ``comparison.json``, or None for other runs."""
    path = Path(run) / "comparison.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
