"""torch → ONNX export, once per (backbone, weights, opset, precision), cached by content hash and verified.

The cache lives in ``$HYBRID_TRANSFER_CACHE`` (default ``~/.cache/hybrid-transfer``). Every export is
checked against torch on a random batch before it is used: a mismatch is an error, never a warning.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import warnings
from pathlib import Path

import numpy as np

from shardformat import atomic_write_bytes
from stage1_extract.errors import InputError, InputNotFoundError, OptionError, Stage1Error
from stage1_extract.model.onnx_graph import FEATURE_MAP_NAME, INPUT_NAME, OUTPUT_NAME, add_preprocessing_and_pooling
from stage1_extract.model.preprocessing import Preprocessing
from stage1_extract.model.registry import BackboneSpec, get_backbone
from stage1_extract.model.weights import build_feature_map_model, build_feature_model, file_sha256, weights_source

OPSET = 17
EXPORT_FORMAT = 2  # bump when the exported graph's layout changes, to invalidate caches
TOLERANCE = {"fp32": 1e-4, "fp16": 2e-2}
MAP_TOLERANCE = {"fp32": 1e-4, "fp16": 5e-2}  # element by element, the map rounds more than its average


class ExportVerificationError(Stage1Error, RuntimeError):
    """ONNX Runtime's output does not match torch's: the exported model must not be used."""


@dataclasses.dataclass(frozen=True)
class ExtractorModel:
    """A ready-to-run ONNX feature extractor and everything that identifies it (goes into shard metadata)."""

    backbone: str
    weights_id: str
    onnx_path: str
    onnx_sha256: str
    preprocessing: Preprocessing
    feature_dim: int
    precision: str
    #: where a fine-tuned backbone came from (``--backbone-from``; :mod:`stage1_extract.model.finetuned`), else None
    provenance: dict | None = None
    feature_map: bool = False  # the graph also outputs ``feature_map`` (N×D×h×w; ``features`` is its average)


def cache_dir() -> Path:
    root = os.environ.get("HYBRID_TRANSFER_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "hybrid-transfer")
    path = Path(root) / "onnx"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _cached(key_fields: dict, stem: str) -> tuple[Path, Path, dict | None]:
    key = hashlib.sha256(json.dumps(key_fields, sort_keys=True).encode()).hexdigest()[:16]
    onnx_path = cache_dir() / f"{stem}-{key}.onnx"
    info_path = onnx_path.with_suffix(".json")
    if onnx_path.is_file() and info_path.is_file():
        try:
            info = json.loads(info_path.read_text())
            if info.get("onnx_sha256") == file_sha256(onnx_path):
                return onnx_path, info_path, info
        except (OSError, ValueError):
            pass
    return onnx_path, info_path, None


def _ort_features(onnx_bytes_or_path, images: np.ndarray, providers: list[str]) -> np.ndarray:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(onnx_bytes_or_path, sess_options=opts, providers=providers)
    return sess.run([OUTPUT_NAME], {INPUT_NAME: images})[0]


def _random_batch(prep: Preprocessing, n: int, seed: int):
    """``n`` random uint8 NHWC images and the same, normalised as the graph does, as NCHW float torch input."""
    import torch

    images = np.random.default_rng(seed).integers(0, 256, size=(n, prep.input_size, prep.input_size, 3),
                                                  dtype=np.uint8)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float()
    return images, (x - torch.tensor(prep.mean).view(1, 3, 1, 1)) / torch.tensor(prep.std).view(1, 3, 1, 1)


def _verify(onnx_bytes: bytes, torch_model, prep: Preprocessing, precision: str, name: str) -> float:
    """Compare ORT and torch (fp32) on a random uint8 batch; return the relative error or raise."""
    import torch

    images, x = _random_batch(prep, 3, seed=0)
    with torch.no_grad():
        reference = torch_model.float()(x).numpy()
    from stage1_extract.runtime.session import wants_gpu

    # fp16 is meant for GPUs; verify there when one is usable. ONNX Runtime's CPU kernels also run the
    # fp16 graph (slowly), which still checks the export on machines without a GPU.
    providers = ["CPUExecutionProvider"]
    if precision == "fp16" and wants_gpu("auto"):
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    try:
        got = _ort_features(onnx_bytes, images, providers)
    except Exception as exc:  # e.g. a CPU without fp16 kernels for some op
        raise ExportVerificationError(
            f"{name} ({precision}): ONNX Runtime could not run the exported model on {providers[0]}: {exc}"
        ) from None
    if got.shape != reference.shape:
        raise ExportVerificationError(f"{name}: ONNX output shape {got.shape} != torch {reference.shape}")
    err = float(np.abs(got - reference).max() / max(np.abs(reference).max(), 1e-12))
    if not err < TOLERANCE[precision]:
        raise ExportVerificationError(
            f"{name} ({precision}): ONNX Runtime differs from torch by relative error {err:.2e} "
            f"(limit {TOLERANCE[precision]:.0e}); the export is not used"
        )
    return err


def _verify_map(onnx_bytes: bytes, map_model, prep: Preprocessing, precision: str, name: str) -> None:
    """The ``feature_map`` output against torch's map, and ``features`` against the map's average."""
    import onnxruntime as ort
    import torch

    images, x = _random_batch(prep, 2, seed=1)
    with torch.no_grad():
        reference = map_model.float()(x).numpy()
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(onnx_bytes, sess_options=opts, providers=["CPUExecutionProvider"])
    features, fmap = sess.run([OUTPUT_NAME, FEATURE_MAP_NAME], {INPUT_NAME: images})
    err = float(np.abs(fmap - reference).max() / max(np.abs(reference).max(), 1e-12)) \
        if fmap.shape == reference.shape else np.inf
    pooled = float(np.abs(fmap.mean(axis=(2, 3)) - features).max() / max(np.abs(features).max(), 1e-12))
    if not (err < MAP_TOLERANCE[precision] and pooled < TOLERANCE[precision]):
        raise ExportVerificationError(
            f"{name} ({precision}): the exported feature map differs from torch's (shape {fmap.shape} vs "
            f"{reference.shape}, relative error {err:.2e}) or does not average to the features ({pooled:.2e})")


def _torch_to_onnx(torch_model, prep: Preprocessing, precision: str) -> bytes:
    import torch

    model = torch_model.half() if precision == "fp16" else torch_model.float()
    dtype = torch.float16 if precision == "fp16" else torch.float32
    dummy = torch.zeros(2, 3, prep.input_size, prep.input_size, dtype=dtype)
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (dummy,), buf, dynamo=False, opset_version=OPSET,
            input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}},
        )
    return buf.getvalue()


def export_backbone(
    backbone: str | BackboneSpec,
    *,
    weights: str | os.PathLike | None = None,
    precision: str = "fp32",
    force: bool = False,
    input_size: int | None = None,
    resize: int | None = None,
    provenance: dict | None = None,
    feature_map: bool = False,
) -> ExtractorModel:
    """Return the cached, verified ONNX extractor for a registry backbone, exporting it if needed.

    ``input_size``/``resize`` override the spec's (a backbone fine-tuned at a lower resolution);
    ``provenance`` is recorded as given (see :mod:`stage1_extract.model.finetuned`). ``feature_map``: a separate
    cached variant whose graph also outputs the last convolutional map (``feature_map``, N×D×h×w) that
    ``features`` averages, for heatmaps; the plain extractor is unchanged.
    """
    import onnx

    spec = backbone if isinstance(backbone, BackboneSpec) else get_backbone(backbone)
    if precision not in TOLERANCE:
        raise OptionError(f"precision must be fp32 or fp16, not {precision!r}")
    source = weights_source(spec, weights)
    prep = spec.preprocessing.at_size(input_size, resize)
    key_fields = {"backbone": spec.name, "weights": source.weights_id, "opset": OPSET, "precision": precision,
                  "format": EXPORT_FORMAT, "preprocessing": prep.to_dict()}
    if feature_map:
        _check_feature_map(spec)
        key_fields["feature_map"] = spec.feature_map_layer  # only here: the plain extractor's key is unchanged
    stem = f"{spec.name}-{precision}" + ("-map" if feature_map else "")
    onnx_path, info_path, info = _cached(key_fields, stem)
    if info is None or force:
        state = source.load_state_dict()
        torch_model = build_feature_model(spec, state)
        traced = build_feature_map_model(spec, state) if feature_map else torch_model
        core = onnx.load_from_string(_torch_to_onnx(traced, prep, precision))
        wrapped = add_preprocessing_and_pooling(core, prep, feature_map=feature_map).SerializeToString()
        err = _verify(wrapped, torch_model, prep, precision, spec.name)
        if feature_map:
            _verify_map(wrapped, traced, prep, precision, spec.name)
        atomic_write_bytes(onnx_path, wrapped)
        info = {**key_fields, "onnx_sha256": hashlib.sha256(wrapped).hexdigest(),
                "feature_dim": spec.feature_dim, "verified_relative_error": err}
        atomic_write_bytes(info_path, json.dumps(info, indent=1).encode())
    return ExtractorModel(
        backbone=spec.name,
        weights_id=source.weights_id,
        onnx_path=str(onnx_path),
        onnx_sha256=info["onnx_sha256"],
        preprocessing=prep,
        feature_dim=int(info["feature_dim"]),
        precision=precision,
        provenance=provenance,
        feature_map=feature_map,
    )


def _external_locations(model) -> list[str]:
    """The files a model's tensors keep their data in (ONNX external data), in every graph and subgraph."""
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    found: set[str] = set()

    def tensors_of(graph):
        yield from graph.initializer
        for sparse in graph.sparse_initializer:
            yield from (sparse.values, sparse.indices)
        for node in graph.node:
            for attr in node.attribute:
                if attr.HasField("t"):
                    yield attr.t
                yield from attr.tensors
                for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                    yield from tensors_of(sub)

    for tensor in tensors_of(model.graph):
        if uses_external_data(tensor):
            found.add(ExternalDataInfo(tensor).location)
    for function in model.functions:
        for node in function.node:
            for attr in node.attribute:
                if attr.HasField("t") and uses_external_data(attr.t):
                    found.add(ExternalDataInfo(attr.t).location)
    return sorted(found)


def user_onnx_sha256(src: Path, model) -> str:
    """Identity of a user ONNX model: every byte it loads. The model file's SHA-256 when it holds its weights;
    with external data (weights in ``net.onnx.data`` beside it), the hash of the model file and of each data
    file, so replacing the weights file changes the identity (the export cache key and the shards' weights_id)."""
    own = file_sha256(src)
    locations = _external_locations(model)
    if not locations:
        return own
    h = hashlib.sha256(own.encode())
    for location in locations:
        data = src.parent / location
        if not data.is_file():
            raise InputError(f"--onnx {src}: its weights file {data} (external data) is missing; keep it beside "
                             "the model file")
        h.update(f"\0{location}\0{file_sha256(data)}".encode())
    return h.hexdigest()


def _check_feature_map(spec: BackboneSpec) -> None:
    if spec.feature_map_layer is None:
        raise OptionError(f"backbone {spec.name} has no feature map for heatmaps: its pooled vector is not the "
                          "plain average of its last convolutional map")


def wrap_user_onnx(
    path: str | os.PathLike,
    *,
    input_size: int | None = None,
    resize: int | None = None,
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406),
    std: tuple[float, float, float] = (0.229, 0.224, 0.225),
    interpolation: str = "bilinear",
    feature_map: bool = False,
) -> ExtractorModel:
    """Bring your own ONNX model: add the uint8 preprocessing front and pooling back, cache the result.

    ``mean``/``std`` are on the 0–1 scale (the usual convention); ``input_size`` is read from the model
    when its spatial dimensions are fixed; ``resize`` defaults to ``input_size / 0.875``. ``feature_map``:
    the variant that also outputs the model's N×C×H×W output before pooling (models with a pooled output
    have none).
    """
    import onnx

    from stage1_extract.model.onnx_graph import describe_input

    from onnx.external_data_helper import load_external_data_for_model

    src = Path(path).expanduser()
    if not src.is_file():
        raise InputNotFoundError(f"--onnx {src}: no such file")
    try:
        model = onnx.load(str(src), load_external_data=False)
    except Exception as exc:
        raise InputError(f"--onnx {src}: not a readable ONNX model ({exc})") from None
    user_sha = user_onnx_sha256(src, model)  # before loading the weights: they are hashed as files
    try:
        load_external_data_for_model(model, str(src.parent))
    except Exception as exc:
        raise InputError(f"--onnx {src}: cannot read its external weights ({exc})") from None
    _, elem, dims = describe_input(model)
    if input_size is None:
        if not isinstance(dims[2], int) or dims[2] <= 0:
            raise InputError(f"--onnx {src}: the model's input size is dynamic; pass --input-size")
        input_size = dims[2]
    prep = Preprocessing.from_fractions(input_size, resize or round(input_size / 0.875), interpolation, mean, std)
    precision = "fp16" if elem == onnx.TensorProto.FLOAT16 else "fp32"
    key_fields = {"user_onnx": user_sha, "format": EXPORT_FORMAT, "preprocessing": prep.to_dict()}
    if feature_map:
        key_fields["feature_map"] = True
    onnx_path, info_path, info = _cached(key_fields, f"user-{src.stem}" + ("-map" if feature_map else ""))
    if info is None:
        wrapped = add_preprocessing_and_pooling(model, prep, feature_map=feature_map).SerializeToString()
        probe = np.zeros((1, prep.input_size, prep.input_size, 3), dtype=np.uint8)
        providers = ["CUDAExecutionProvider"] if precision == "fp16" else ["CPUExecutionProvider"]
        try:
            dim = int(_ort_features(wrapped, probe, providers).shape[1])
        except Exception as exc:
            raise InputError(f"--onnx {src}: ONNX Runtime cannot run the model: {exc}") from None
        atomic_write_bytes(onnx_path, wrapped)
        info = {**key_fields, "onnx_sha256": hashlib.sha256(wrapped).hexdigest(), "feature_dim": dim}
        atomic_write_bytes(info_path, json.dumps(info, indent=1).encode())
    return ExtractorModel(
        backbone=f"onnx:{src.name}",
        weights_id=f"sha256:{user_sha}",
        onnx_path=str(onnx_path),
        onnx_sha256=info["onnx_sha256"],
        preprocessing=prep,
        feature_dim=int(info["feature_dim"]),
        precision=precision,
        feature_map=feature_map,
    )


def with_feature_map(model: ExtractorModel) -> ExtractorModel:
    """The ``feature_map`` variant of a cached extractor whose pooling stage 1 added (a user ONNX model with an
    N×C×H×W output), made from the extractor's own file: no need for the user's model file again."""
    import onnx

    from stage1_extract.model.onnx_graph import expose_feature_map

    key_fields = {"from_onnx_sha256": model.onnx_sha256, "format": EXPORT_FORMAT, "feature_map": True}
    onnx_path, info_path, info = _cached(key_fields, Path(model.onnx_path).stem + "-map")
    if info is None:
        data = expose_feature_map(onnx.load(model.onnx_path)).SerializeToString()
        atomic_write_bytes(onnx_path, data)
        info = {**key_fields, "onnx_sha256": hashlib.sha256(data).hexdigest(), "feature_dim": model.feature_dim}
        atomic_write_bytes(info_path, json.dumps(info, indent=1).encode())
    return dataclasses.replace(model, onnx_path=str(onnx_path), onnx_sha256=info["onnx_sha256"], feature_map=True)


def prepare_model(backbone: str | None = None, *, weights=None, onnx=None, precision: str = "fp32",
                  input_size=None, resize=None, mean=None, std=None, interpolation=None,
                  backbone_from=None, feature_map: bool = False) -> ExtractorModel:
    """The ONNX extractor for a registry backbone (exported and cached), a fine-tuned one (``backbone_from``: a
    fine-tuned run directory) or a user's ONNX file. ``input_size``/``resize`` apply to registry backbones too;
    ``feature_map``: the variant that also outputs the last convolutional map (for heatmaps)."""
    if backbone_from is not None:
        from stage1_extract.model.finetuned import read_finetuned

        tuned = read_finetuned(backbone_from, backbone=backbone, weights=weights, onnx=onnx, input_size=input_size)
        return export_backbone(tuned.backbone, weights=tuned.weights, precision=precision,
                               input_size=tuned.input_size, resize=tuned.resize, provenance=tuned.provenance,
                               feature_map=feature_map)
    if onnx is not None:
        kwargs = {k: v for k, v in dict(input_size=input_size, resize=resize, mean=mean, std=std,
                                        interpolation=interpolation).items() if v is not None}
        return wrap_user_onnx(onnx, feature_map=feature_map, **kwargs)
    from stage1_extract.model.registry import DEFAULT_BACKBONE

    return export_backbone(backbone or DEFAULT_BACKBONE, weights=weights, precision=precision,
                           input_size=input_size, resize=resize, feature_map=feature_map)
