"""One deployable file: the backbone and the head merged into a single ONNX graph, pixels in, probabilities out.

Input ``images``: uint8, ``N×S×S×3`` RGB (S = ``input_size``), already resized (shorter side to ``resize``
with ``interpolation``) and centre-cropped to S×S — exactly what stage 1 feeds its model. Inside the graph:
cast, NHWC→NCHW, ``(x - mean) / std`` (0–255 scale), the backbone (stage 1's verified export, found by the
run's ``onnx_sha256``), the head's standardisation, dense layers and softmax (converted from the Keras
weights), and the open-set distance. Outputs: ``probabilities`` (float32 N×C, columns in ``labels`` order)
and, when the run has an open-set detector, ``ood_score`` (float32 N; ``> ood_threshold`` means unknown).

With ``heatmap=True`` the backbone is stage 1's ``feature_map`` variant and a third output ``heatmap``
(float32 N×S×S over the input crop, in [0, 1]) explains the predicted class, computed in the graph by the
closed form of :mod:`stage2_classify.inference.explain` (CAM / Grad-CAM as products of the head's weight
matrices and ReLU masks: no autograd), and verified against :meth:`Classifier.explain`'s arithmetic.

``metadata_props``: ``labels`` (JSON list), ``preprocessing`` (JSON: input_size, resize, interpolation, crop,
mean, std), ``ood_threshold``, ``backbone``, ``precision``. The file is verified before it is written:
the merged graph and the two-stage path (stage-1 ONNX → Keras head) must agree on the same pixels, real
images when given; the largest probability difference is reported and a larger one than the tolerance is
an error. ``precision="fp16"`` uses stage 1's fp16 export of the backbone (for GPUs; the small head stays
float32).
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

from shardformat import atomic_write_bytes
from stage2_classify.errors import ExportError
from stage2_classify.inference.head_arrays import head_layers

TOLERANCE = {"fp32": 1e-4, "fp16": 5e-2}  # largest |Δ probability| accepted against the two-stage fp32 path
MAX_IR_VERSION = 10  # onnxruntime 1.31 loads IR ≤ 13; stage 1's opset-17 exports are IR 8
VERIFY_IMAGES = 64
PREFIX = "ht_head_"


@dataclasses.dataclass
class ExportResult:
    path: str
    precision: str
    labels: list[str]
    preprocessing: dict
    max_probability_difference: float
    max_ood_score_difference: float | None
    verified_on: str  # what the check ran on
    verified_images: int
    ir_version: int
    opset: int
    size_bytes: int
    verified_provider: str = "CPUExecutionProvider"  # where the merged model ran for the check
    max_heatmap_difference: float | None = None  # None: no heatmap output

    def format(self) -> str:
        ood = (f", ood_score within {self.max_ood_score_difference:.1e} (relative)"
               if self.max_ood_score_difference is not None else "")
        return "\n".join([
            f"exported {self.path} ({self.size_bytes / 2**20:.1f} MiB, {self.precision}, IR {self.ir_version}, "
            f"opset {self.opset})",
            f"  input    images uint8 N×{self.preprocessing['input_size']}×{self.preprocessing['input_size']}×3 "
            f"(resize shorter side to {self.preprocessing['resize']}, {self.preprocessing['interpolation']}, "
            "centre crop)",
            f"  outputs  probabilities N×{len(self.labels)}" + (", ood_score N" if self.max_ood_score_difference
                                                                   is not None else ""),
            f"  verified ({self.verified_provider}) against the two-stage path on {self.verified_images} "
            f"{self.verified_on}: largest "
            f"probability difference {self.max_probability_difference:.2e}{ood}",
        ] + ([f"  heatmap  N×{self.preprocessing['input_size']}×{self.preprocessing['input_size']} over the input "
              f"crop, within {self.max_heatmap_difference:.1e} of Classifier.explain"]
             if self.max_heatmap_difference is not None else []))


def heatmap_nodes(steps, logits: str, grid: tuple[int, int], size: int, const, const_i64):
    """Nodes computing ``heatmap`` (N×S×S) from ``feature_map`` and the head's ``logits`` for the predicted
    class: the closed-form channel weights, their weighted sum of the map, ReLU, ÷max, bilinear upsampling
    (as matrices, the same arithmetic as :mod:`stage2_classify.inference.explain`)."""
    from onnx import TensorProto, helper

    from stage2_classify.inference.explain import EPS, upsample_matrix

    P = PREFIX + "hm_"
    dense = [(i, p) for i, (kind, p) in enumerate(steps) if kind == "dense"]
    last = dense[-1][1]
    nodes = [helper.make_node("ArgMax", [logits], [P + "target"], axis=1, keepdims=0),
             helper.make_node("Gather", [const("hm_last_t", last["kernel"].T), P + "target"], [P + "g"], axis=0)]
    g = P + "g"
    for i, p in reversed(dense[:-1]):
        nodes += [helper.make_node("Greater", [f"{PREFIX}pre_{i}", const(f"hm_zero_{i}", np.zeros(1))], [P + f"on_{i}"]),
                  helper.make_node("Cast", [P + f"on_{i}"], [P + f"mask_{i}"], to=TensorProto.FLOAT),
                  helper.make_node("Mul", [g, P + f"mask_{i}"], [P + f"gm_{i}"]),
                  helper.make_node("MatMul", [P + f"gm_{i}", const(f"hm_kt_{i}", p["kernel"].T)], [P + f"g_{i}"])]
        g = P + f"g_{i}"
    for kind, p in steps:
        if kind == "standardise":
            nodes.append(helper.make_node("Div", [g, const("hm_std", p["std"])], [P + "alpha"]))
            g = P + "alpha"
    dim = int(dense[0][1]["kernel"].shape[0])  # the feature vector's length: the map's channels
    h, w = grid
    nodes += [
        helper.make_node("Unsqueeze", [g, const_i64("hm_axis1", [1])], [P + "alpha3"]),
        helper.make_node("Reshape", ["feature_map", const_i64("hm_flat", [0, dim, h * w])], [P + "map3"]),
        helper.make_node("MatMul", [P + "alpha3", P + "map3"], [P + "cam3"]),
        helper.make_node("Reshape", [P + "cam3", const_i64("hm_grid", [0, h, w])], [P + "cam"]),
        helper.make_node("Relu", [P + "cam"], [P + "pos"]),
        helper.make_node("ReduceMax", [P + "pos"], [P + "top"], axes=[1, 2], keepdims=1),
        helper.make_node("Max", [P + "top", const("hm_eps", np.full(1, EPS))], [P + "topc"]),
        helper.make_node("Div", [P + "pos", P + "topc"], [P + "unit"]),
        helper.make_node("MatMul", [const("hm_ry", upsample_matrix(size, h)), P + "unit"], [P + "rows"]),
        helper.make_node("MatMul", [P + "rows", const("hm_rxt", upsample_matrix(size, w).T)], ["heatmap"]),
    ]
    return nodes, helper.make_tensor_value_info("heatmap", TensorProto.FLOAT, ["batch", size, size])


def merge(backbone_onnx: str, steps, detector, metadata_props: dict[str, str], heatmap: dict | None = None):
    """The backbone graph (``images`` → ``features``) extended by the head and the open-set distance, and
    with ``heatmap`` (``{"grid": (h, w), "size": S}``) the heatmap of the predicted class."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(backbone_onnx)
    graph = model.graph
    features = graph.output[0].name
    nodes, inits = [], []

    def const(name: str, value: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(np.asarray(value, np.float32), PREFIX + name))
        return PREFIX + name

    x = features
    for i, (kind, p) in enumerate(steps):
        if kind == "standardise":
            nodes += [helper.make_node("Sub", [x, const("mean", p["mean"])], [PREFIX + "centred"]),
                      helper.make_node("Div", [PREFIX + "centred", const("std", p["std"])], [PREFIX + "standard"])]
            x = PREFIX + "standard"
            continue
        nodes += [helper.make_node("MatMul", [x, const(f"kernel_{i}", p["kernel"])], [f"{PREFIX}mm_{i}"]),
                  helper.make_node("Add", [f"{PREFIX}mm_{i}", const(f"bias_{i}", p["bias"])], [f"{PREFIX}pre_{i}"])]
        x = f"{PREFIX}pre_{i}"
        if p["activation"] == "relu":
            nodes.append(helper.make_node("Relu", [x], [f"{PREFIX}relu_{i}"]))
            x = f"{PREFIX}relu_{i}"
        elif p["activation"] == "softmax":
            nodes.append(helper.make_node("Softmax", [x], ["probabilities"], axis=-1))
            x = "probabilities"
    n_classes = int(steps[-1][1]["kernel"].shape[1])
    outputs = [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", n_classes])]
    if detector is not None:
        # min over classes of ||z - c||² = ||z||² - 2 z·c + ||c||², z = features @ W
        c = detector.centres.astype(np.float64)
        nodes += [
            helper.make_node("MatMul", [features, const("ood_w", detector.whitening)], [PREFIX + "z"]),
            helper.make_node("Mul", [PREFIX + "z", PREFIX + "z"], [PREFIX + "z2"]),
            helper.make_node("ReduceSum", [PREFIX + "z2", _const_i64(inits, "axis1", [1])], [PREFIX + "zn"],
                             keepdims=1),
            helper.make_node("MatMul", [PREFIX + "z", const("ood_ct2", -2.0 * c.T)], [PREFIX + "zc"]),
            helper.make_node("Add", [PREFIX + "zc", PREFIX + "zn"], [PREFIX + "d2a"]),
            helper.make_node("Add", [PREFIX + "d2a", const("ood_cn", (c * c).sum(axis=1))], [PREFIX + "d2"]),
            helper.make_node("ReduceMin", [PREFIX + "d2"], [PREFIX + "d2min"], axes=[1], keepdims=0),
            helper.make_node("Relu", [PREFIX + "d2min"], [PREFIX + "d2pos"]),  # rounding can dip below 0
            helper.make_node("Sqrt", [PREFIX + "d2pos"], ["ood_score"]),
        ]
        outputs.append(helper.make_tensor_value_info("ood_score", TensorProto.FLOAT, ["batch"]))
    if heatmap is not None:
        last = max(i for i, (kind, _) in enumerate(steps) if kind == "dense")
        more, out = heatmap_nodes(steps, f"{PREFIX}pre_{last}", heatmap["grid"], heatmap["size"], const,
                                  lambda name, value: _const_i64(inits, name, value))
        nodes += more
        outputs.append(out)
    graph.node.extend(nodes)
    graph.initializer.extend(inits)
    del graph.output[:]
    graph.output.extend(outputs)
    graph.name = "pixels_to_probabilities"
    del model.metadata_props[:]
    for key, value in metadata_props.items():
        model.metadata_props.add(key=key, value=value)
    model.ir_version = min(model.ir_version, MAX_IR_VERSION)
    onnx.checker.check_model(model)
    return model


def _const_i64(inits: list, name: str, value) -> str:
    from onnx import numpy_helper

    inits.append(numpy_helper.from_array(np.asarray(value, np.int64), PREFIX + name))
    return PREFIX + name


def _default_providers(precision: str) -> list[str]:
    """fp16 is meant for GPUs: check it on one when ONNX Runtime and torch both see a usable CUDA device
    (onnxruntime-gpu lists CUDA even where there is none). Otherwise the CPU, which runs fp16 too, slowly."""
    import onnxruntime as ort

    if precision == "fp16" and "CUDAExecutionProvider" in ort.get_available_providers():
        import torch

        if torch.cuda.is_available():
            return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def _session(model_or_path, providers):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(model_or_path, sess_options=opts, providers=providers)


def _verification_pixels(images, preprocessing: dict) -> tuple[np.ndarray, str]:
    """Up to ``VERIFY_IMAGES`` real images decoded as stage 1 does (``stage1_extract.load_pixels``); random
    pixels when none are given."""
    from stage1_extract import load_pixels

    size = int(preprocessing["input_size"])
    if images is None:
        rng = np.random.default_rng(0)
        return rng.integers(0, 256, size=(8, size, size, 3), dtype=np.uint8), "random-pixel images (pass images= " \
            "/ --images to verify on real ones)"
    pixels = load_pixels(images, preprocessing, limit=VERIFY_IMAGES)
    if len(pixels.paths) == 0:
        raise ExportError(f"none of the images in {images} could be decoded to verify the export "
                          f"(e.g. {pixels.errors[:1]})")
    return pixels.array, "real images"


def export(classifier, out: str | os.PathLike, *, precision: str = "fp32", images=None,
           weights: str | os.PathLike | None = None, onnx: str | os.PathLike | None = None,
           providers: list[str] | None = None, heatmap: bool = False) -> ExportResult:
    """Merge ``classifier``'s backbone and head into ``out`` (one ONNX file), verify it, write it atomically.

    ``images`` (a file, folder, file list or list of paths) are used for the check; without them it runs on
    random pixels and says so. ``weights``/``onnx``: as for :func:`stage1_extract.find_model`, when the
    backbone export must be rebuilt. ``heatmap``: add the ``heatmap`` output (see the module docstring).
    """
    from stage1_extract import find_model

    from stage2_classify.inference.explain import head_is_linear

    if precision not in TOLERANCE:
        raise ValueError(f"precision must be fp32 or fp16, not {precision!r}")
    meta = classifier.metadata
    weights = weights if weights is not None else getattr(classifier, "backbone_weights", None)
    backbone = find_model(meta, weights=weights, onnx=onnx, precision=precision, feature_map=heatmap)
    reference_backbone = backbone if precision == "fp32" else find_model(meta, weights=weights, onnx=onnx,
                                                                         precision="fp32", feature_map=heatmap)
    steps = head_layers(classifier.model)
    detector = classifier.ood
    prep = {k: meta.preprocessing[k] for k in ("input_size", "resize", "interpolation", "crop", "mean", "std")
            if k in meta.preprocessing}
    props = {"labels": json.dumps(classifier.classes), "preprocessing": json.dumps(prep),
             "backbone": meta.backbone, "precision": precision,
             "producer": "hybrid-transfer stage2-classify export"}
    if detector is not None:
        props["ood_threshold"] = repr(float(detector.threshold))
    pixels, source = _verification_pixels(images, prep)
    reference = _session(reference_backbone.onnx_path, ["CPUExecutionProvider"]).run(None, {"images": pixels})
    features = reference[0]
    shape = None
    if heatmap:
        shape = {"grid": tuple(int(d) for d in reference[1].shape[2:]), "size": int(prep["input_size"])}
        props["heatmap"] = json.dumps({"output": "heatmap", "over": "the input crop, N×S×S, in [0, 1]",
                                       "class": "predicted", "grid": list(shape["grid"]),
                                       "method": "CAM" if head_is_linear(steps) else "Grad-CAM (closed form)"})
    merged = merge(backbone.onnx_path, steps, detector, props, heatmap=shape)
    data = merged.SerializeToString()

    providers = providers or _default_providers(precision)
    session = _session(data, providers)
    got = session.run(None, {"images": pixels})
    expected = classifier.predict_proba(features)
    diff = float(np.abs(got[0] - expected).max())
    if not diff <= TOLERANCE[precision]:
        raise ExportError(f"the merged model differs from the two-stage path by {diff:.2e} in probability "
                          f"(limit {TOLERANCE[precision]:.0e}) on {len(pixels)} {source}; nothing was written")
    ood_diff = None
    if detector is not None:
        want = detector.score(features)
        ood_diff = float((np.abs(got[1] - want) / np.maximum(np.abs(want), 1.0)).max())
        if not ood_diff <= (1e-3 if precision == "fp32" else 5e-2):
            raise ExportError(f"the merged model's ood_score differs by {ood_diff:.2e} (relative) from the "
                              "detector's; nothing was written")
    heat_diff = _check_heatmap(steps, reference, got[0], got[-1], expected, prep, precision) if heatmap else None
    out = os.fspath(out)
    atomic_write_bytes(out, data)  # temporary name, fsync, rename: an ordinary file mode, not mkstemp's 0600
    return ExportResult(out, precision, classifier.classes, prep, diff, ood_diff, source, len(pixels),
                        merged.ir_version, max(o.version for o in merged.opset_import if o.domain in ("", "ai.onnx")),
                        len(data), session.get_providers()[0], heat_diff)


def _check_heatmap(steps, reference, probabilities: np.ndarray, got: np.ndarray, expected: np.ndarray, prep: dict,
                   precision: str) -> float:
    """The graph's ``heatmap`` against the explain module's arithmetic on the fp32 backbone's outputs (rows
    whose predicted class is the same on both paths): the largest difference (fp32, at most 1e-3), or for fp16
    the per-image correlation (at least 0.97: a heatmap is a difference of large weighted sums, which
    half-precision rounding moves more than the probabilities)."""
    from stage2_classify.inference.explain import class_maps, crop_heatmaps

    target = expected.argmax(axis=1)
    agree = probabilities.argmax(axis=1) == target  # a near tie may pick another class on the fp16 path
    want = crop_heatmaps(class_maps(steps, reference[0], reference[1], target), int(prep["input_size"]))
    if got.shape != want.shape:
        raise ExportError(f"the merged model's heatmap has shape {got.shape}, Classifier.explain's {want.shape}")
    diff = float(np.abs(got - want)[agree].max(initial=0.0))
    a, b = (x[agree].reshape(int(agree.sum()), -1).astype(np.float64) for x in (got, want))
    a, b = a - a.mean(axis=1, keepdims=True), b - b.mean(axis=1, keepdims=True)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    corr = float(np.where(norms > 1e-12, (a * b).sum(axis=1) / np.maximum(norms, 1e-12), 1.0).min(initial=1.0))
    if not (diff <= 1e-3 if precision == "fp32" else corr >= 0.97):
        raise ExportError(f"the merged model's heatmap differs from Classifier.explain's by {diff:.2e} (lowest "
                          f"per-image correlation {corr:.4f}); nothing was written")
    return diff
