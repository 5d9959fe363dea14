"""Backbone registry, ONNX export + verification + cache, and the ImageNet sanity check on real photos."""

import io

import numpy as np
import onnx
import pytest

from stage1_extract.model import export, registry, weights
from stage1_extract.decoding.image import decode_image
from stage1_extract.runtime.session import FeatureSession
from tests.support.helpers import make_tiny_onnx, photo


@pytest.fixture(scope="module")
def lite0():
    return export.export_backbone("efficientnet_lite0")


def test_registry_has_the_promised_backbones():
    names = {s.name for s in registry.list_backbones()}
    assert {"efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2", "resnet50", "efficientnet_b0",
            "mobilenet_v3_large", "convnext_tiny", "densenet121"} <= names
    with pytest.raises(ValueError, match="unknown backbone 'nope'.*efficientnet_lite0"):
        registry.get_backbone("nope")


def test_export_is_verified_and_cached(lite0, monkeypatch):
    info = export.json.loads(open(lite0.onnx_path[:-5] + ".json").read())
    assert info["verified_relative_error"] < 1e-4
    assert lite0.feature_dim == 1280 and lite0.weights_id.startswith("sha256:")
    model = onnx.load(lite0.onnx_path)
    assert [i.name for i in model.graph.input] == ["images"]
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8

    def boom(*a, **k):
        raise AssertionError("a cached export must not be rebuilt")

    monkeypatch.setattr(export, "build_feature_model", boom)
    again = export.export_backbone("efficientnet_lite0")
    assert again.onnx_path == lite0.onnx_path and again.onnx_sha256 == lite0.onnx_sha256


def test_export_that_disagrees_with_torch_is_refused(monkeypatch, tmp_path):
    monkeypatch.setenv("HYBRID_TRANSFER_CACHE", str(tmp_path))
    real = export._torch_to_onnx

    def corrupted(model, prep, precision):
        m = onnx.load_from_string(real(model, prep, precision))
        init = max(m.graph.initializer, key=lambda t: len(t.raw_data))  # a big conv weight
        arr = onnx.numpy_helper.to_array(init).copy()
        arr *= 1.01
        init.CopyFrom(onnx.numpy_helper.from_array(arr, init.name))
        return m.SerializeToString()

    monkeypatch.setattr(export, "_torch_to_onnx", corrupted)
    with pytest.raises(export.ExportVerificationError, match="relative error"):
        export.export_backbone("efficientnet_lite0")
    assert not list(tmp_path.rglob("*.onnx")), "a failed export must not enter the cache"


def test_torchvision_backbone_offline_fails_fast_with_a_fix(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    spec = registry.get_backbone("resnet50")
    source = weights.weights_source(spec)
    with pytest.raises(weights.WeightsUnavailableError, match="--weights"):
        source.load_state_dict()


def test_weights_file_must_be_a_plain_state_dict(tmp_path):
    import pickle

    bad = tmp_path / "evil.pth"
    bad.write_bytes(pickle.dumps({"x": print}))
    source = weights.weights_source(registry.get_backbone("resnet50"), bad)
    with pytest.raises(weights.WeightsUnavailableError, match="weights_only"):
        source.load_state_dict()


@pytest.mark.parametrize("name,expected", [("chelsea", range(281, 286)), ("coffee", [967])])
def test_default_backbone_recognises_real_photos(lite0, name, expected):
    """Full ImageNet classifier = ORT features → the checkpoint's own final Linear layer."""
    import torch

    spec = registry.get_backbone("efficientnet_lite0")
    classifier = weights.build_torch_classifier(spec, weights.weights_source(spec).load_state_dict())
    buf = io.BytesIO()
    photo(name).save(buf, "PNG")
    pixels = decode_image(buf.getvalue(), lite0.preprocessing)
    session = FeatureSession(lite0.onnx_path, provider="cpu", batch_size=4, input_size=224)
    feats = session.run(pixels[None])
    with torch.no_grad():
        logits = classifier.classifier(torch.from_numpy(feats))
    assert int(logits.argmax()) in expected


def test_user_onnx_gets_preprocessing_and_pooling(tmp_path):
    path = make_tiny_onnx(tmp_path / "tiny.onnx", input_size=32, channels=8)
    model = export.wrap_user_onnx(path)  # input size read from the model's fixed 32×32
    assert model.feature_dim == 8 and model.preprocessing.input_size == 32
    assert model.backbone == "onnx:tiny.onnx"
    session = FeatureSession(model.onnx_path, provider="cpu", batch_size=4, input_size=32)
    x = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    feats = session.run(x)
    assert feats.shape == (3, 8) and feats.dtype == np.float32
    # Same thing computed by hand: normalise, conv via ORT on the raw model, global average pool.
    import onnxruntime as ort

    raw = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    xn = (x.astype(np.float32).transpose(0, 3, 1, 2) / 255 - np.array([0.485, 0.456, 0.406]).reshape(1, 3, 1, 1)) \
        / np.array([0.229, 0.224, 0.225]).reshape(1, 3, 1, 1)
    want = raw.run(None, {"x": xn.astype(np.float32)})[0].mean(axis=(2, 3))
    np.testing.assert_allclose(feats, want, rtol=1e-4, atol=1e-5)


def test_provider_cuda_without_gpu_is_a_clear_error(lite0):
    from stage1_extract.runtime.session import ProviderUnavailableError

    with pytest.raises(ProviderUnavailableError, match="cuda"):
        FeatureSession(lite0.onnx_path, provider="cuda", batch_size=2, input_size=224)


def test_fixed_shape_path_pads_the_last_batch(lite0):
    """The CUDA code path (fixed batch shape, preallocated input) exercised on the CPU provider."""
    session = FeatureSession(lite0.onnx_path, provider="cpu", batch_size=4, input_size=224)
    x = np.random.default_rng(1).integers(0, 256, (3, 224, 224, 3), dtype=np.uint8)
    free = session.run(x)
    session.fixed_shape = True
    padded = session.run(x, 3)
    np.testing.assert_allclose(padded, free, rtol=1e-4, atol=1e-5)


def test_fp16_export_is_verified_against_torch_fp32(tmp_path, monkeypatch):
    monkeypatch.setenv("HYBRID_TRANSFER_CACHE", str(tmp_path))
    m = export.export_backbone("efficientnet_lite0", precision="fp16")
    info = export.json.loads(open(m.onnx_path[:-5] + ".json").read())
    assert m.precision == "fp16" and info["verified_relative_error"] < 2e-2
    model = onnx.load(m.onnx_path)
    assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # cast back to fp32
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer)


def test_feature_map_variant_is_separate_and_its_map_averages_to_the_features(lite0):
    """Heatmaps' export: another cached file with a second output; the plain extractor is left as it was."""
    import onnxruntime as ort

    variant = export.export_backbone("efficientnet_lite0", feature_map=True)
    assert variant.feature_map and not lite0.feature_map and variant.onnx_path != lite0.onnx_path
    assert export.export_backbone("efficientnet_lite0").onnx_sha256 == lite0.onnx_sha256  # its key is unchanged
    assert [o.name for o in onnx.load(lite0.onnx_path).graph.output] == ["features"]
    x = np.stack([decode_image(_jpeg(photo("astronaut")), lite0.preprocessing)] * 2)
    features, fmap = ort.InferenceSession(variant.onnx_path, providers=["CPUExecutionProvider"]).run(None, {"images": x})
    plain = ort.InferenceSession(lite0.onnx_path, providers=["CPUExecutionProvider"]).run(None, {"images": x})[0]
    assert fmap.shape == (2, 1280, 7, 7)
    np.testing.assert_allclose(features, plain, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(fmap.mean(axis=(2, 3)), features, rtol=1e-4, atol=1e-5)
    assert all(s.feature_map_layer for s in registry.list_backbones() if s.name != "convnext_tiny")


def test_user_onnx_feature_map_comes_from_its_output_before_pooling(tmp_path):
    path = make_tiny_onnx(tmp_path / "tiny.onnx", input_size=32, channels=8)
    plain = export.wrap_user_onnx(path)
    for variant in (export.wrap_user_onnx(path, feature_map=True), export.with_feature_map(plain)):
        session = FeatureSession(variant.onnx_path, provider="cpu", batch_size=4, input_size=32)
        x = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
        import onnxruntime as ort

        features, fmap = ort.InferenceSession(variant.onnx_path, providers=["CPUExecutionProvider"]).run(
            None, {"images": x})
        assert fmap.shape == (3, 8, 16, 16)
        np.testing.assert_allclose(features, session.run(x), rtol=1e-5)
        np.testing.assert_allclose(fmap.mean(axis=(2, 3)), features, rtol=1e-5, atol=1e-6)


def _jpeg(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95)
    return buf.getvalue()
