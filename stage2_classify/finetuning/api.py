"""``finetune(run, out)``: LP-FT from a trained run, written as an ordinary run directory with its own backbone.

1. the run's split and images (:mod:`.data`): train rows train, validation rows stop early, test rows wait;
2. the run's backbone (stage 1's registry, ``stage1_extract.torch_backbone``) under the run's head (:mod:`.model`),
   trained with ``fit`` and per-epoch checkpoints in ``OUT.checkpoints/`` (:mod:`.checkpoint`, ``resume=True``);
3. the best epoch's backbone saved as ``backbone.safetensors`` + ``finetune.json`` (``stage1_extract.write_finetuned``)
   and every image of the run re-extracted with it by stage 1 (``--backbone-from``) into ``features``;
4. a run directory written as ``train`` writes one (model, metrics, split.csv, predictions, report), plus the
   comparison with the frozen run on the same test images (:mod:`.compare`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np

from stage2_classify.errors import Stage2Error
from stage2_classify.finetuning.options import FinetuneOptions
from stage2_classify.finetuning.results import FinetuneResult, write_finetuned_run


def _device(choice: str) -> str:
    import torch

    if choice == "cuda" and not torch.cuda.is_available():
        raise Stage2Error("--device cuda: no usable CUDA GPU (torch.cuda.is_available() is False); use --device cpu")
    return "cuda" if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()) else "cpu"


def _backbone(loaded, input_size):
    """The run's backbone as a trainable torch module: the registry's weights, or a fine-tuned run's own."""
    from stage1_extract import torch_backbone

    meta = loaded.metadata
    if meta.backbone.startswith("onnx:"):
        raise Stage2Error(f"{loaded.path}: its vectors come from a user ONNX model ({meta.backbone}); fine-tuning "
                          "needs a registry backbone (stage1-extract --backbone …)")
    weights = None
    if meta.provenance.get("kind") == "finetuned":
        from stage1_extract import read_finetuned

        own = loaded.path if (loaded.path / "finetune.json").is_file() else meta.provenance.get("directory")
        weights = read_finetuned(own).weights  # a moved run: its own file first
    tb = torch_backbone(meta.backbone, weights=weights, input_size=input_size or meta.preprocessing["input_size"])
    if weights is None and tb.weights_id != meta.weights_id:
        raise Stage2Error(f"{loaded.path}: its vectors were made with other weights ({meta.weights_id[:24]}) than "
                          f"the registry's ({tb.weights_id[:24]}); fine-tuning starts from the registry's weights only")
    return tb


def _linear_probe(loaded, layer, train, val, rows, progress: bool):
    """LP of LP-FT at the fine-tune's resolution: the run's head definition fitted again, as ``train`` fits it, on
    the frozen backbone's vectors of the train split at that resolution (early-stopped on validation)."""
    from stage2_classify.data.dataset import Dataset
    from stage2_classify.finetuning.model import pooled_vectors
    from stage2_classify.training.heads import fit_head

    opts = _train_options(loaded)
    picked = np.concatenate([train.rows, val.rows])
    x = pooled_vectors(layer, np.concatenate([train.x, val.x]))
    ds = Dataset(features=x, y=rows.y[picked], paths=rows.paths[picked], classes=rows.classes,
                 metadata=loaded.metadata, unlabelled=0, source="linear probe", content_ids=rows.content_ids[picked])
    split = {"train": np.arange(len(train.rows)), "validation": np.arange(len(train.rows), len(picked)),
             "test": np.zeros(0, np.int64)}
    if progress:
        print(f"linear probe at the new resolution: the run's head fitted again on {len(train.rows)} frozen vectors",
              flush=True)
    return fit_head(ds, split, opts, progress=False).model


def _starting_head(loaded, tb, opts, workdir: Path, train, val, rows, resume: bool, progress: bool, device: str):
    """The head fine-tuning starts from, kept in ``OUT.checkpoints/head.keras`` for a resume: the run's own (same
    resolution), the run's head definition fitted again on frozen vectors at the new resolution (LP of LP-FT), or
    (``head_init="random"``, plain fine-tuning, for comparison) a freshly initialised one."""
    import keras

    from stage2_classify.finetuning.model import FrozenStatsBackbone, pooled_vectors

    saved = workdir / "head.keras"
    if resume and saved.is_file():
        return keras.saving.load_model(saved, compile=False, safe_mode=True)
    same_size = tb.preprocessing.input_size == loaded.metadata.preprocessing["input_size"]
    if same_size and opts.head_init == "probe":
        return loaded.model
    module = tb.module.to(device)  # frozen here: only its vectors, without gradients (build_model sets what trains)
    layer = FrozenStatsBackbone(module, tb.preprocessing.mean, tb.preprocessing.std, tb.spec.feature_dim)
    if opts.head_init == "random":
        from stage2_classify.training.fit import column_stats
        from stage2_classify.training.head import build_head

        mean, var = column_stats(pooled_vectors(layer, train.x))
        frozen_opts = _train_options(loaded)
        head = build_head(tb.spec.feature_dim, len(rows.classes), hidden=frozen_opts.hidden,
                          dropout=frozen_opts.dropout, mean=mean, variance=var)
    else:
        head = _linear_probe(loaded, layer, train, val, rows, progress)
    workdir.mkdir(parents=True, exist_ok=True)
    head.save(saved)
    return head


def _train_options(loaded):
    """The frozen run's TrainOptions, from its ``config.json``."""
    from stage2_classify.options import TrainOptions

    config = json.loads((loaded.path / "config.json").read_text())
    fields = {f.name for f in dataclasses.fields(TrainOptions)}
    opts = TrainOptions(**{k: tuple(v) if isinstance(v, list) else v for k, v in config.items() if k in fields})
    return dataclasses.replace(opts, split_file=None)


def _class_weights(run: Path, y: np.ndarray) -> np.ndarray | None:
    used = json.loads((run / "config.json").read_text()).get("class_weight_used")
    return None if not used else np.asarray([used[str(int(c))] for c in y], np.float32)


def check_options(opts: FinetuneOptions) -> None:
    """Refuse options that cannot train, before anything is read."""
    bad = [(f"--epochs {opts.epochs}", opts.epochs < 1), (f"--batch-size {opts.batch_size}", opts.batch_size < 1),
           (f"--lr {opts.learning_rate}", not opts.learning_rate > 0), (f"--patience {opts.patience}", opts.patience < 1),
           (f"--head-lr-scale {opts.head_lr_scale}", not opts.head_lr_scale > 0),
           (f"--warmup {opts.warmup}", not 0 <= opts.warmup < 1),
           (f"--label-smoothing {opts.label_smoothing}", not 0 <= opts.label_smoothing < 1),
           (f"--weight-decay {opts.weight_decay}", opts.weight_decay < 0)]
    wrong = [flag for flag, is_bad in bad if is_bad]
    if wrong:
        raise Stage2Error(f"{', '.join(wrong)}: epochs, batch size and patience are at least 1, learning rates "
                          "positive, warm-up and label smoothing in [0, 1), weight decay not negative")


def check_targets(run: Path, out: Path, features: Path, resume: bool) -> None:
    """``out`` must not be the run fine-tuned from (its baseline) nor inside it; an earlier fine-tune's vectors in
    ``features`` are not silently mixed with (or replaced by) this one's."""
    run = run.absolute()
    if out == run or run in out.parents:
        raise Stage2Error(f"--out {out} is (inside) the run being fine-tuned: it is the frozen baseline the result "
                          "is compared with; choose another --out")
    import shardformat

    if not resume and features.is_dir() and any(features.glob(f"{shardformat.SHARD_PREFIX}*.parquet")):
        raise Stage2Error(f"{features} already holds feature shards (an earlier fine-tune's?): the new backbone's "
                          "vectors cannot join them; pass --features NEW_FOLDER or delete that folder")


def check_unfreeze(tb, unfreeze: str) -> None:
    """``last:K`` within the backbone's blocks, said before decoding."""
    from stage2_classify.finetuning.model import blocks

    if unfreeze.startswith("last:") and int(unfreeze.split(":")[1]) > len(blocks(tb.module)):
        raise Stage2Error(f"--unfreeze {unfreeze}: {tb.spec.name} has {len(blocks(tb.module))} blocks")


def check_workdir(workdir: Path, opts: FinetuneOptions, resume: bool):
    """The interrupted fine-tune in ``workdir`` to resume (None: start afresh); refuses to start over one
    silently, or to resume one with other options."""
    from stage2_classify.finetuning.checkpoint import TrainingState

    wanted = dataclasses.asdict(opts)
    state = TrainingState.read(workdir)
    if state is not None and not resume:
        raise Stage2Error(f"{workdir} holds an interrupted fine-tune ({state.epochs_done} of {opts.epochs} epochs "
                          "done): pass --resume (resume=True) to continue it, or delete that folder to start over")
    defaults = dataclasses.asdict(FinetuneOptions())  # an option added since the checkpoint: its default
    changed = sorted(k for k in wanted if state is not None and k != "device"  # a GPU run may finish on a CPU
                     and state.options.get(k, defaults[k]) != wanted[k])
    if changed:
        raise Stage2Error(f"{workdir}: the interrupted fine-tune used other options ({', '.join(changed)}); resume "
                          "with the same options or delete that folder to start over")
    return state


def _fit(model, layer, head, train, val, opts, workdir: Path, resume: bool, progress: bool, sample_weight):
    """``model.fit`` with the epoch checkpoints; resumes from ``workdir`` when asked. Returns the state."""
    from stage2_classify.finetuning import checkpoint as ck
    from stage2_classify.finetuning.model import Batches
    from stage2_classify.training.fit import keras_verbosity

    k = int(head.outputs[0].shape[-1])
    batches = Batches(train.x, train.y, k, opts.batch_size, shuffle=True, seed=opts.seed, sample_weight=sample_weight)
    val_batches = Batches(val.x, val.y, k, opts.batch_size, shuffle=False) if len(val.y) else None
    state = check_workdir(workdir, opts, resume)
    if state is None:
        state = ck.TrainingState(options=dataclasses.asdict(opts))
        workdir.mkdir(parents=True, exist_ok=True)
    else:
        model.optimizer.build(model.trainable_weights)
        ck.restore(workdir / ck.LAST, layer, head, model.optimizer)
        batches.set_epoch(state.epochs_done)
        print(f"resuming after epoch {state.epochs_done} (best so far: epoch {state.best_epoch}, "
              f"val loss {state.best:.4f})", flush=True)
    t0, before = time.perf_counter(), state.seconds
    callback = ck.EpochCheckpoint(workdir, layer, head, state, monitor="val_loss" if val_batches else "loss",
                                  patience=opts.patience, clock=lambda: before + time.perf_counter() - t0)
    if state.epochs_done < opts.epochs and state.wait < opts.patience:
        import keras

        model.fit(batches, validation_data=val_batches, epochs=opts.epochs, initial_epoch=state.epochs_done,
                  callbacks=[keras.callbacks.TerminateOnNaN(), callback], verbose=keras_verbosity(progress))
    if not (workdir / ck.BEST).is_file():
        raise Stage2Error(f"the fine-tune diverged: no epoch gave a finite {callback.monitor.replace('_', ' ')} "
                          f"(learning rate {opts.learning_rate:g}); lower --lr, and delete {workdir} to start over")
    ck.restore(workdir / ck.BEST, layer, head)
    return state


def _extract(rows, tuned_dir: Path, features: Path, progress: bool):
    """Every image of the run through stage 1 with the fine-tuned backbone, from an exact file list."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    from shardformat import atomic_write_via_path
    from stage1_extract import extract

    listing = tuned_dir.parent / "images.csv"
    table = pa.table({"path": pa.array(list(rows.files), pa.string()),
                      "label": pa.array([rows.classes[i] for i in rows.y], pa.string()),
                      "group": pa.array(list(rows.groups), pa.string())})
    atomic_write_via_path(listing, lambda tmp: pacsv.write_csv(table, tmp))
    return extract(os.fspath(listing), os.fspath(features), backbone_from=os.fspath(tuned_dir), progress=progress)


def finetune(run: str | os.PathLike, out: str | os.PathLike, *, images=None, features=None, resume: bool = False,
             progress: bool = True, options: FinetuneOptions | None = None, **overrides) -> FinetuneResult:
    """Fine-tune ``run``'s backbone end to end, starting from its head (LP-FT), into the run directory ``out``.

    ``images``: the folder or file list the run's vectors came from (default: the root stage 1 recorded).
    ``features``: where the fine-tuned vectors of every image go (default ``OUT.features``). Options: the
    fields of :class:`FinetuneOptions` as keywords (``epochs=5, input_size=128``) or ``options=``.
    Checkpoints go to ``OUT.checkpoints/`` every epoch; ``resume=True`` continues an interrupted fine-tune.
    """
    from stage2_classify.finetuning.data import decode_rows, run_rows, summarise_skips
    from stage2_classify.runs.load import load_run

    opts = dataclasses.replace(options or FinetuneOptions(), **overrides)
    check_options(opts)
    out = Path(out).expanduser().absolute()
    workdir = Path(f"{out}.checkpoints")
    features = Path(features if features is not None else f"{out}.features").expanduser().absolute()
    check_workdir(workdir, opts, resume)  # all before minutes of decoding
    loaded = load_run(run)
    check_targets(loaded.path, out, features, resume)
    rows = run_rows(loaded.path, images)
    device = _device(opts.device)
    tb = _backbone(loaded, opts.input_size)
    check_unfreeze(tb, opts.unfreeze)
    train, val = (decode_rows(rows, rows.take(s), tb.preprocessing) for s in ("train", "validation"))
    notes = [n for n in (summarise_skips(s, p.skipped, len(rows.take(s))) for s, p in
                         (("train", train), ("validation", val))) if n]
    from stage2_classify.finetuning.model import build_model

    steps = opts.epochs * max(1, -(-len(train.y) // opts.batch_size))
    head = _starting_head(loaded, tb, opts, workdir, train, val, rows, resume, progress, device)
    model, layer, counts = build_model(tb, head, opts, steps=steps, device=device)
    if progress:
        print(f"fine-tuning {tb.spec.name} at {tb.preprocessing.input_size} px on {device}: {len(train.y)} train / "
              f"{len(val.y)} validation images of {loaded.path}, {counts[0]:,} of {counts[1]:,} backbone parameters "
              f"trainable (--unfreeze {opts.unfreeze})", flush=True)
    weights = _class_weights(loaded.path, train.y)
    try:
        state = _fit(model, layer, head, train, val, opts, workdir, resume, progress, weights)
    except KeyboardInterrupt:
        print(f"interrupted: every finished epoch is kept in {workdir}; continue with --resume", flush=True)
        raise
    layer.module.to("cpu")
    result = write_finetuned_run(loaded, rows, tb, model_head=head, state=state, opts=opts, out=out,
                                 workdir=workdir, features=features, notes=notes, progress=progress,
                                 extract_fn=_extract, split_sha256=_sha256(loaded.path / "split.csv"))
    shutil.rmtree(workdir, ignore_errors=True)
    return result


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
