"""The GPU code paths of stage 1, run here on the CPU: the shared run lifecycle, the CUDA/TensorRT provider
options, overlapped inference (synchronous on the CPU), and the nvImageCodec decoder on its CPU back end.
What needs a GPU to run at all is in ``test_gpu.py`` (marked ``gpu``)."""

import os
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

import shardformat
from shardformat.layout import errors_path
from shardformat import shard_name
from stage1_extract import extract
from stage1_extract.run import lifecycle
from stage1_extract.model.registry import get_backbone
from stage1_extract.decoding.image import decode_image
from stage1_extract.runtime.inference import OverlappedInference
from stage1_extract.runtime.session import (
    CudaOptions,
    FeatureSession,
    ProviderUnavailableError,
    load_tensorrt_libraries,
    tensorrt_provider_options,
    trt_engine_dir,
)
from tests.support.helpers import make_image_tree, make_tiny_onnx

PREP = get_backbone("efficientnet_lite0").preprocessing


def _tiny_session(tmp_path, batch_size=4):
    from stage1_extract.model import export

    model = export.wrap_user_onnx(make_tiny_onnx(tmp_path / "tiny.onnx", input_size=32, channels=8))
    return FeatureSession(model.onnx_path, provider="cpu", batch_size=batch_size, input_size=32)


# ------------------------------------------------------------------------------------------- lifecycle

def test_shard_names_sort_by_run_and_retries_rewrite_the_same_file():
    assert shard_name("20260101T000000-abc", seq=3) == "part-20260101T000000-abc-00003.parquet"
    a = shard_name("S", paths=["x/1.jpg", "x/2.jpg"])
    assert a == shard_name("S", paths=["x/1.jpg", "x/2.jpg"]) != shard_name("S", paths=["x/1.jpg"])
    assert a.startswith("part-S-") and a.endswith(".parquet")
    with pytest.raises(ValueError):
        shard_name("S")


def test_nonfinite_rows_are_named_and_refused():
    feats = np.ones((3, 4), np.float32)
    assert lifecycle.nonfinite_message(feats, ["a", "b", "c"]) is None
    feats[1, 2] = np.nan
    feats[2, 0] = np.inf
    assert lifecycle.nonfinite_message(feats, ["a", "b", "c"]) == \
        "the model produced non-finite features for 2 image(s), e.g. b"
    with pytest.raises(FloatingPointError, match="e.g. b"):
        lifecycle.check_finite(feats, ["a", "b", "c"])


def test_one_batch_size_default_for_every_engine():
    from stage1_extract.engines import ray_driver as ray_engine

    assert lifecycle.default_batch_size(False) == 16 and lifecycle.default_batch_size(True) == 256
    # the Ray engine takes its defaults from the same function (its CPU default used to be 32)
    assert "default_batch_size(False)" in open(ray_engine.__file__).read()


def test_a_failed_run_records_the_errors_found_so_far(tmp_path):
    """The lifecycle's failure path: an exception inside the run still leaves the errors table behind."""
    from stage1_extract.model import export

    tree = make_image_tree(tmp_path / "img", per_class=1, size=64)
    (tree / "cat" / "broken.jpg").write_bytes(b"\xff\xd8\xff nope")
    (tree / "cat" / "notes.txt").write_text("not an image")
    model = export.wrap_user_onnx(make_tiny_onnx(tmp_path / "tiny.onnx", input_size=32))
    out = tmp_path / "out"
    with pytest.raises(KeyError):
        out_path, listing = lifecycle.list_inputs(tree, out)
        with lifecycle.open_run(listing, out_path, model, provider="cpu", strict=False) as run:
            run.add_error("cat/broken.jpg", "cannot decode image: test")
            raise KeyError("boom")
    errors = pq.read_table(errors_path(out)).to_pylist()
    assert [e["path"] for e in errors] == ["cat/broken.jpg", "cat/notes.txt"]  # the loop's and the listing's
    assert not (out / lifecycle.SUMMARY_FILE).exists()  # a failed run writes no summary


# ----------------------------------------------------------------------------------- provider options

def test_cuda_options_defaults_are_the_measured_ones():
    opts = CudaOptions().provider_options(device_id=1)
    assert opts == {"device_id": "1", "cudnn_conv_use_max_workspace": "1", "cudnn_conv_algo_search": "EXHAUSTIVE",
                    "prefer_nhwc": "1", "enable_cuda_graph": "0"}
    assert CudaOptions(cuda_graph=True, prefer_nhwc=False).provider_options()["enable_cuda_graph"] == "1"
    with pytest.raises(ValueError, match="EXHAUSTIVE"):
        CudaOptions(conv_algo_search="FAST")


def test_tensorrt_engines_are_cached_beside_the_onnx_file_under_its_key(tmp_path):
    onnx = tmp_path / "onnx" / "resnet50-fp16-0123456789abcdef.onnx"
    assert trt_engine_dir(str(onnx)) == str(tmp_path / "onnx" / "trt" / "resnet50-fp16-0123456789abcdef")
    opts = tensorrt_provider_options(str(onnx), device_id=0, batch_size=256, input_size=224, fp16=True)
    assert opts["trt_engine_cache_path"] == opts["trt_timing_cache_path"] == trt_engine_dir(str(onnx))
    assert opts["trt_fp16_enable"] == "True" and opts["trt_engine_cache_enable"] == "True"
    assert opts["trt_profile_min_shapes"] == opts["trt_profile_max_shapes"] == "images:256x224x224x3"
    assert tensorrt_provider_options(str(onnx), device_id=0, batch_size=8, input_size=32, fp16=False,
                                     cache_dir="/x")["trt_fp16_enable"] == "False"


def test_tensorrt_without_its_libraries_names_the_extra(tmp_path):
    try:
        load_tensorrt_libraries()
    except ProviderUnavailableError as exc:
        assert "hybrid-transfer[tensorrt]" in str(exc) and "tensorrt-cu13" in str(exc)
    else:
        pytest.skip("the TensorRT libraries are installed here")
    model_path = make_tiny_onnx(tmp_path / "tiny.onnx")
    with pytest.raises(ProviderUnavailableError, match="tensorrt"):
        FeatureSession(str(model_path), provider="tensorrt", batch_size=2, input_size=32)


# --------------------------------------------------------------------------------- overlapped inference

def test_overlapped_inference_returns_every_batch_in_order(tmp_path):
    import torch

    session = _tiny_session(tmp_path, batch_size=4)
    rng = np.random.default_rng(0)
    batches = [rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8) for _ in range(5)]
    want = [session.run(b, n) for b, n in zip(batches, (4, 4, 3, 4, 1))]
    got = []
    with OverlappedInference(session) as infer:
        assert not infer.overlapped  # CPU: synchronous, same class
        for k, (b, n) in enumerate(zip(batches, (4, 4, 3, 4, 1))):
            src = torch.from_numpy(b) if k % 2 else b  # a decoder may hand over torch tensors
            infer.submit(src, n, k)
            b[...] = 0  # the caller may reuse its buffer as soon as submit returns
            got += list(infer.ready())
        infer.submit(batches[0], 0, "empty")  # nothing to run: no result
        got += list(infer.drain())
    assert [tag for tag, _ in got] == [0, 1, 2, 3, 4]
    for (_, feats), ref in zip(got, want):
        np.testing.assert_allclose(feats, ref, rtol=1e-5, atol=1e-6)
    assert infer.infer_seconds > 0


def test_the_inference_thread_keeps_order_and_recycles_slots(tmp_path):
    """The GPU side's thread, queues and slot recycling, run from host slots on the CPU provider."""
    session = _tiny_session(tmp_path, batch_size=4)
    rng = np.random.default_rng(1)
    batches = [rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8) for _ in range(9)]  # 3× the slots
    sizes = [4, 3, 4, 4, 1, 4, 2, 4, 4]
    want = [session.run(b, n) for b, n in zip(batches, sizes)]
    got = []
    with OverlappedInference(session, depth=2, threaded=True) as infer:
        assert infer.overlapped
        for k, (b, n) in enumerate(zip(batches, sizes)):
            infer.submit(b, n, k)
            b[...] = 255  # staged: overwriting the caller's buffer changes nothing
            got += list(infer.ready())
        got += list(infer.drain())
    assert [tag for tag, _ in got] == list(range(9))
    for (_, feats), ref, n in zip(got, want, sizes):
        assert feats.shape == (n, 8)
        np.testing.assert_allclose(feats, ref, rtol=1e-5, atol=1e-6)


def test_a_failure_on_the_inference_thread_reaches_the_caller(tmp_path):
    session = _tiny_session(tmp_path, batch_size=4)
    calls = []
    real_run = session.run

    def failing_run(batch, n=None):  # the third batch fails, as a GPU out of memory would
        calls.append(n)
        if len(calls) == 3:
            raise RuntimeError("CUDA out of memory (simulated)")
        return real_run(batch, n)

    session.run = failing_run
    x = np.zeros((4, 32, 32, 3), np.uint8)
    with pytest.raises(RuntimeError, match="simulated"):
        with OverlappedInference(session, depth=1, threaded=True) as infer:
            for k in range(20):
                infer.submit(x, 4, k)
                list(infer.ready())
            list(infer.drain())
    assert len(calls) == 3  # nothing ran after the failure


# ------------------------------------------------------------------------------ nvImageCodec decoder

nvimgcodec = pytest.importorskip("stage1_extract.decoding.nvimgcodec")


def _needs_nvimgcodec():
    if not nvimgcodec.nvimgcodec_available():
        pytest.skip("nvImageCodec ([gpu-decode] extra) is not installed")


def _awkward_tree(tmp_path):
    from PIL import Image

    tree = make_image_tree(tmp_path / "img", per_class=3, size=300)
    (tree / "cat" / "empty.jpg").write_bytes(b"")
    (tree / "cat" / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    Image.new("RGBA", (50, 40), (0, 0, 255, 128)).save(tree / "space" / "alpha.png")  # not a JPEG → PIL
    Image.new("RGB", (4000, 30), (9, 9, 9)).save(tree / "space" / "strip.jpg")  # extreme shape → PIL
    Image.new("CMYK", (90, 60), (10, 20, 30, 40)).save(tree / "space" / "cmyk.jpg")  # CMYK JPEG → PIL
    Image.new("L", (120, 90), 77).save(tree / "coffee" / "gray.jpg")  # grayscale JPEG → device, as RGB
    Image.new("RGB", (200, 150), (200, 10, 10)).save(tree / "coffee" / "progressive.jpg", progressive=True)
    return tree


def test_nvimgcodec_decoder_matches_pil_and_records_the_same_reasons(tmp_path):
    _needs_nvimgcodec()
    from stage1_extract.decoding.pool import DecodePool

    tree = _awkward_tree(tmp_path)
    paths = sorted(str(p) for p in tree.rglob("*.*"))
    seen = {}
    with nvimgcodec.NvImageCodecDecoder(PREP, batch_size=4, device="cpu", io_threads=2) as dec:
        assert not dec.pixels_on_device
        for batch in dec.run(paths):
            assert isinstance(batch.pixels, np.ndarray) and batch.pixels.dtype == np.uint8
            for item in batch.items:
                seen[paths[item.index]] = item
                if item.row >= 0:
                    ref = decode_image(open(paths[item.index], "rb").read(), PREP).astype(int)
                    assert np.abs(batch.pixels[item.row].astype(int) - ref).mean() < 1.0, paths[item.index]
    pool_reasons = {}
    with DecodePool(PREP, batch_size=4, workers=1) as pool:
        for batch in pool.run(paths):
            for item in batch.items:
                pool_reasons[paths[item.index]] = item.reason
    assert set(seen) == set(paths)
    assert {p: it.reason for p, it in seen.items()} == pool_reasons  # the same errors table
    assert seen[str(tree / "cat" / "empty.jpg")].reason == "empty file (0 bytes)"
    for ok in ("alpha.png", "strip.jpg", "cmyk.jpg", "gray.jpg", "progressive.jpg"):
        assert next(it for p, it in seen.items() if p.endswith(ok)).row >= 0, ok


def test_extract_with_the_nvimgcodec_decoder_matches_the_default(tmp_path):
    _needs_nvimgcodec()
    tree = _awkward_tree(tmp_path)
    a = extract(tree, tmp_path / "a", progress=False)
    b = extract(tree, tmp_path / "b", decode="nvimgcodec-cpu", progress=False)
    assert a.extracted == b.extracted == 14 and a.errors == b.errors == 2
    fa, fb = shardformat.read_features(tmp_path / "a"), shardformat.read_features(tmp_path / "b")
    assert sorted(fa.paths) == sorted(fb.paths)
    xa, xb = fa.features[np.argsort(fa.paths)], fb.features[np.argsort(fb.paths)]
    cos = (xa * xb).sum(1) / np.linalg.norm(xa, axis=1) / np.linalg.norm(xb, axis=1)
    assert cos.min() > 0.98
    ea = pq.read_table(errors_path(tmp_path / "a")).to_pylist()
    eb = pq.read_table(errors_path(tmp_path / "b")).to_pylist()
    assert ea == eb


def test_gpu_decoding_without_a_gpu_is_a_clear_error():
    _needs_nvimgcodec()
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(nvimgcodec.GpuDecodeUnavailableError, match="CUDA GPU"):
        nvimgcodec.NvImageCodecDecoder(PREP, batch_size=4, device="cuda")


def test_without_nvimgcodec_the_message_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "nvidia.nvimgcodec", None)  # as if the extra were not installed
    with pytest.raises(nvimgcodec.GpuDecodeUnavailableError, match=r"hybrid-transfer\[gpu-decode\]"):
        nvimgcodec.NvImageCodecDecoder(PREP, batch_size=4, device="cpu")


def test_file_reading_gives_the_pool_reasons(tmp_path):
    assert nvimgcodec.read_file(str(tmp_path / "missing.jpg"))[1].startswith("cannot open:")
    os.mkfifo(tmp_path / "fifo.jpg")
    assert nvimgcodec.read_file(str(tmp_path / "fifo.jpg"))[1] == "not a regular file"
    (tmp_path / "empty.jpg").write_bytes(b"")
    assert nvimgcodec.read_file(str(tmp_path / "empty.jpg"))[1] == "empty file (0 bytes)"


def test_a_decoder_that_refuses_everything_is_reported_once(caplog):
    _needs_nvimgcodec()
    with nvimgcodec.NvImageCodecDecoder(PREP, batch_size=4, device="cpu", io_threads=2) as dec:
        with caplog.at_level("WARNING", logger="stage1_extract.decoding.nvimgcodec"):
            dec._warn_if_all_refused(16, 3)  # some decoded: nothing to say
            dec._warn_if_all_refused(16, 16)
            dec._warn_if_all_refused(16, 16)
    assert [r.message.count("refused all 16 JPEGs") for r in caplog.records] == [1]


def test_cli_takes_the_gpu_options():
    from stage1_extract.cli import build_parser

    args = build_parser().parse_args(["--images", "i", "--out", "o", "--decode", "nvimgcodec-cpu", "--cuda-graph",
                                      "--provider", "tensorrt"])
    assert (args.decode, args.cuda_graph, args.provider) == ("nvimgcodec-cpu", True, "tensorrt")
