"""ONNX graph surgery: put preprocessing in front of a model and pooling behind it.

Every model stage 1 runs — exported from torch or brought by the user — gets the same interface:
input ``images`` (uint8, N×H×W×3, RGB, already resized and cropped) and output ``features``
(float32, N×D). Casting, NHWC→NCHW and ``(x - mean) / std`` then run inside the inference engine
(on the GPU when there is one), and decode workers ship 4× fewer bytes than float32 would need.
"""

from __future__ import annotations

import numpy as np

from stage1_extract.model.preprocessing import Preprocessing
from stage1_extract.errors import Stage1Error

INPUT_NAME = "images"
OUTPUT_NAME = "features"
FEATURE_MAP_NAME = "feature_map"  # the optional second output: float32 N×D×h×w, averaged into ``features``


class OnnxModelError(Stage1Error, ValueError):
    """An ONNX model cannot be used as a feature extractor."""


def _dims(value_info) -> list:
    shape = value_info.type.tensor_type.shape
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in shape.dim]


def real_inputs(model: onnx.ModelProto) -> list:
    initializers = {i.name for i in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in initializers]


def describe_input(model: onnx.ModelProto) -> tuple[str, int, list]:
    """(name, element type, dims) of the model's single image input."""
    from onnx import TensorProto  # onnx is imported on use: finding a cached export needs none of it (1.4 s)

    inputs = real_inputs(model)
    if len(inputs) != 1:
        raise OnnxModelError(f"expected a model with one image input, found {[i.name for i in inputs]}")
    inp = inputs[0]
    dims = _dims(inp)
    if len(dims) != 4:
        raise OnnxModelError(f"input {inp.name!r} has shape {dims}; expected N×3×H×W")
    if dims[1] not in (3, None):
        raise OnnxModelError(f"input {inp.name!r} has {dims[1]} channels; expected 3 (NCHW RGB)")
    elem = inp.type.tensor_type.elem_type
    if elem not in (TensorProto.FLOAT, TensorProto.FLOAT16):
        raise OnnxModelError(f"input {inp.name!r} must be float32 or float16")
    return inp.name, elem, dims


def add_preprocessing_and_pooling(model: onnx.ModelProto, prep: Preprocessing, *,
                                  feature_map: bool = False) -> onnx.ModelProto:
    """Return a copy of ``model`` whose input is uint8 NHWC ``images`` and output float32 ``features``.

    The model's first output is the feature: N×D is used as is, N×C×H×W is global-average pooled.
    ``feature_map``: also output the N×C×H×W map itself as float32 ``feature_map`` (for heatmaps); the model's
    output must then be that map.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    in_name, elem, dims = describe_input(out)
    if isinstance(dims[0], int) and dims[0] != 0:
        raise OnnxModelError(
            f"input {in_name!r} has a fixed batch size of {dims[0]}; export the model with a dynamic batch axis"
        )
    for axis, d in ((2, dims[2]), (3, dims[3])):
        if isinstance(d, int) and d != prep.input_size:
            raise OnnxModelError(
                f"input {in_name!r} expects {dims[2]}×{dims[3]} images but preprocessing produces "
                f"{prep.input_size}×{prep.input_size}; pass --input-size {d}"
            )
    np_dtype = np.float16 if elem == TensorProto.FLOAT16 else np.float32
    mean = np.asarray(prep.mean, dtype=np_dtype).reshape(1, 3, 1, 1)
    std = np.asarray(prep.std, dtype=np_dtype).reshape(1, 3, 1, 1)

    pre_nodes = [
        helper.make_node("Cast", [INPUT_NAME], ["ht_pre_cast"], to=elem),
        helper.make_node("Transpose", ["ht_pre_cast"], ["ht_pre_nchw"], perm=[0, 3, 1, 2]),
        helper.make_node("Sub", ["ht_pre_nchw", "ht_pre_mean"], ["ht_pre_centred"]),
        helper.make_node("Div", ["ht_pre_centred", "ht_pre_std"], [in_name]),
    ]
    graph.initializer.extend(
        [numpy_helper.from_array(mean, "ht_pre_mean"), numpy_helper.from_array(std, "ht_pre_std")]
    )
    kept_inputs = [i for i in graph.input if i.name != in_name]
    del graph.input[:]
    graph.input.extend(
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.UINT8, ["batch", prep.input_size, prep.input_size, 3])]
        + kept_inputs
    )

    if not graph.output:
        raise OnnxModelError("model has no outputs")
    feat = graph.output[0]
    rank = len(_dims(feat))
    post_nodes = []
    src = feat.name
    if rank == 4:
        post_nodes += [
            helper.make_node("GlobalAveragePool", [src], ["ht_post_gap"]),
            helper.make_node("Flatten", ["ht_post_gap"], ["ht_post_flat"], axis=1),
        ]
        src = "ht_post_flat"
    elif rank != 2:
        raise OnnxModelError(
            f"output {feat.name!r} has rank {rank}; expected a pooled N×D vector or an N×C×H×W feature map"
        )
    elif feature_map:
        raise OnnxModelError(f"output {feat.name!r} is a pooled N×D vector: the model has no feature map to "
                             "output (heatmaps need a model whose output is its N×C×H×W map)")
    post_nodes.append(helper.make_node("Cast", [src], [OUTPUT_NAME], to=TensorProto.FLOAT))
    outputs = [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch", None])]
    if feature_map:
        post_nodes.append(helper.make_node("Cast", [feat.name], [FEATURE_MAP_NAME], to=TensorProto.FLOAT))
        outputs.append(helper.make_tensor_value_info(FEATURE_MAP_NAME, TensorProto.FLOAT,
                                                     ["batch", None, None, None]))
    old_nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend(pre_nodes + old_nodes + post_nodes)
    del graph.output[:]
    graph.output.extend(outputs)
    onnx.checker.check_model(out)
    return out


def expose_feature_map(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of a wrapped extractor whose pooling was added here (a model with an N×C×H×W output) with the map
    before that pooling as a second output, ``feature_map``; the first output and every value are unchanged."""
    import onnx
    from onnx import TensorProto, helper

    pools = [n for n in model.graph.node if n.op_type == "GlobalAveragePool" and list(n.output) == ["ht_post_gap"]]
    if not pools:
        raise OnnxModelError("this extractor's model outputs a pooled vector: it has no feature map to output")
    out = onnx.ModelProto()
    out.CopyFrom(model)
    out.graph.node.append(helper.make_node("Cast", [pools[0].input[0]], [FEATURE_MAP_NAME], to=TensorProto.FLOAT))
    out.graph.output.append(helper.make_tensor_value_info(FEATURE_MAP_NAME, TensorProto.FLOAT,
                                                          ["batch", None, None, None]))
    onnx.checker.check_model(out)
    return out
