"""Stage 1 on a real GPU: CUDA against CPU vectors, fp16 against fp32, overlapped inference and IO binding,
CUDA graphs, the hardware JPEG decoder against PIL, TensorRT when its libraries are installed.

Marked ``gpu``; each test skips when no GPU is usable. The test suite hides GPUs by default
(``tests/conftest.py``), so run these with one made visible:

    CUDA_VISIBLE_DEVICES=0 python -m pytest -m gpu tests/stage1/test_gpu.py
"""

import numpy as np
import pytest

from shardformat.layout import errors_path
from stage1_extract.model import export
from stage1_extract.model.registry import get_backbone
from tests.support.helpers import make_image_tree

pytestmark = pytest.mark.gpu


def _gpu_usable() -> bool:
    try:
        import onnxruntime as ort
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available() and "CUDAExecutionProvider" in ort.get_available_providers()


@pytest.fixture(autouse=True)
def _need_gpu():
    if not _gpu_usable():
        pytest.skip("no usable GPU (CUDA_VISIBLE_DEVICES=0 to use one; onnxruntime-gpu and torch with CUDA)")


@pytest.fixture(scope="module")
def lite0():
    return export.export_backbone("efficientnet_lite0")


@pytest.fixture(scope="module")
def lite0_fp16():
    return export.export_backbone("efficientnet_lite0", precision="fp16")


@pytest.fixture(scope="module")
def pixels():
    """Real photographs, decoded by the reference path: 40 images (not a multiple of the batch size)."""
    import tempfile
    from pathlib import Path

    from stage1_extract.decoding.image import decode_image

    prep = get_backbone("efficientnet_lite0").preprocessing
    tree = make_image_tree(Path(tempfile.mkdtemp()) / "img", per_class=14, size=320)
    files = sorted(tree.rglob("*.jpg"))[:40]
    return np.stack([decode_image(f.read_bytes(), prep) for f in files])


def _cosine(a, b):
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def _features(model, pixels, provider, batch_size=16, **options):
    from stage1_extract.runtime.session import FeatureSession

    session = FeatureSession(model.onnx_path, provider=provider, batch_size=batch_size, input_size=224,
                             precision=model.precision, **options)
    assert session.provider == provider
    return np.concatenate([session.run(pixels[i:i + batch_size]) for i in range(0, len(pixels), batch_size)])


def test_cuda_vectors_match_cpu_ones(lite0, pixels):
    cpu = _features(lite0, pixels, "cpu")
    cuda = _features(lite0, pixels, "cuda")
    assert _cosine(cpu, cuda).min() >= 0.9999  # measured on an H200: ≥ 0.99998


def test_fp16_vectors_match_fp32_ones(lite0, lite0_fp16, pixels):
    fp32 = _features(lite0, pixels, "cpu")
    fp16 = _features(lite0_fp16, pixels, "cuda")
    assert fp16.dtype == np.float32
    assert _cosine(fp32, fp16).min() >= 0.999  # measured on an H200: ≥ 0.9991


@pytest.mark.parametrize("options", [{}, {"prefer_nhwc": False, "conv_algo_search": "HEURISTIC"},
                                     {"cuda_graph": True}], ids=["default", "nchw-heuristic", "cuda-graph"])
def test_cuda_options_change_speed_not_vectors(lite0, pixels, options):
    from stage1_extract.runtime.session import CudaOptions

    ref = _features(lite0, pixels, "cpu")
    got = _features(lite0, pixels, "cuda", cuda=CudaOptions(**options))
    assert _cosine(ref, got).min() >= 0.9999


@pytest.mark.parametrize("cuda_graph", [False, True], ids=["slots", "cuda-graph"])
def test_overlapped_inference_on_device_buffers_matches_plain_runs(lite0, pixels, cuda_graph):
    """IO binding on device slots, async copies from page-locked staging, results in order, last batch short."""
    import torch

    from stage1_extract.runtime.inference import OverlappedInference
    from stage1_extract.runtime.session import CudaOptions, FeatureSession

    session = FeatureSession(lite0.onnx_path, provider="cuda", batch_size=16, input_size=224,
                             cuda=CudaOptions(cuda_graph=cuda_graph))
    want = np.concatenate([session.run(pixels[i:i + 16]) for i in range(0, len(pixels), 16)])
    got = []
    with OverlappedInference(session) as infer:
        assert infer.overlapped
        for k, start in enumerate(range(0, len(pixels), 16)):
            chunk = pixels[start:start + 16]
            src = torch.from_numpy(chunk).cuda() if k % 2 else chunk.copy()  # device batches too (GPU decoder)
            infer.submit(src, len(chunk), start)
            got += list(infer.ready())
        got += list(infer.drain())
    assert [tag for tag, _ in got] == list(range(0, len(pixels), 16))
    np.testing.assert_allclose(np.concatenate([f for _, f in got]), want, rtol=1e-4, atol=1e-4)


def test_hardware_jpeg_decoder_matches_pil(tmp_path):
    pytest.importorskip("nvidia.nvimgcodec")
    import torch

    from stage1_extract.decoding.image import decode_image
    from stage1_extract.decoding.nvimgcodec import NvImageCodecDecoder

    prep = get_backbone("efficientnet_lite0").preprocessing
    tree = make_image_tree(tmp_path / "img", per_class=6, size=400)
    (tree / "cat" / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    paths = sorted(str(p) for p in tree.rglob("*.jpg"))
    seen = 0
    with NvImageCodecDecoder(prep, batch_size=8, device="cuda") as dec:
        for batch in dec.run(paths):
            assert isinstance(batch.pixels, torch.Tensor) and batch.pixels.is_cuda
            host = batch.pixels.cpu().numpy()
            for item in batch.items:
                if paths[item.index].endswith("bad.jpg"):
                    assert item.row == -1 and item.reason.startswith("cannot decode image")
                    continue
                ref = decode_image(open(paths[item.index], "rb").read(), prep).astype(int)
                # the hardware decoder's chroma upsampling differs from libjpeg's by a level or two
                assert np.abs(host[item.row].astype(int) - ref).mean() < 2.5
                seen += 1
    assert seen == len(paths) - 1


def test_extract_with_gpu_decoding_matches_cpu_decoding(tmp_path):
    pytest.importorskip("nvidia.nvimgcodec")
    import pyarrow.parquet as pq

    import shardformat
    from stage1_extract import extract

    tree = make_image_tree(tmp_path / "img", per_class=20, size=320)
    (tree / "cat" / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    a = extract(tree, tmp_path / "a", provider="cuda", batch_size=16, progress=False)
    b = extract(tree, tmp_path / "b", provider="cuda", batch_size=16, decode="gpu", progress=False)
    assert a.extracted == b.extracted == 60 and a.errors == b.errors == 1
    fa, fb = shardformat.read_features(tmp_path / "a"), shardformat.read_features(tmp_path / "b")
    xa, xb = fa.features[np.argsort(fa.paths)], fb.features[np.argsort(fb.paths)]
    assert _cosine(xa, xb).min() > 0.98
    assert pq.read_table(errors_path(tmp_path / "a")).to_pylist() == \
        pq.read_table(errors_path(tmp_path / "b")).to_pylist()


def test_tensorrt_vectors_match_cuda_ones(lite0_fp16, pixels, tmp_path):
    from stage1_extract.runtime.session import ProviderUnavailableError, load_tensorrt_libraries

    try:
        load_tensorrt_libraries()
    except ProviderUnavailableError:
        pytest.skip("TensorRT libraries not installed ([tensorrt] extra)")
    cuda = _features(lite0_fp16, pixels, "cuda")
    try:
        trt = _features(lite0_fp16, pixels, "tensorrt", trt_cache=str(tmp_path / "engines"))
    except ProviderUnavailableError as exc:  # libraries present, but not ones this onnxruntime can use
        pytest.skip(str(exc))
    assert _cosine(cuda, trt).min() >= 0.999
    assert any((tmp_path / "engines").iterdir())  # the engine was cached for the next run
