"""The GPU decoder's code (torchvision decode_jpeg + resize on the device), run on the CPU device here."""

import numpy as np
import pytest
import torch

from stage1_extract.model.registry import get_backbone
from stage1_extract.decoding.image import decode_image
from stage1_extract.decoding.torch_decoder import TorchDecoder
from tests.support.helpers import make_image_tree

PREP = get_backbone("efficientnet_lite0").preprocessing


def test_matches_the_pil_decoder_and_records_bad_files(tmp_path):
    tree = make_image_tree(tmp_path / "img", per_class=3, size=300)
    (tree / "cat" / "empty.jpg").write_bytes(b"")
    (tree / "cat" / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    from PIL import Image

    Image.new("RGBA", (50, 40), (0, 0, 255, 128)).save(tree / "space" / "alpha.png")  # non-JPEG → PIL path
    Image.new("RGB", (4000, 30), (9, 9, 9)).save(tree / "space" / "strip.jpg")  # extreme shape → PIL path
    paths = sorted(str(p) for p in tree.rglob("*.*"))
    seen = {}
    with TorchDecoder(PREP, batch_size=4, device="cpu") as dec:
        for batch in dec.run(paths):
            assert isinstance(batch.pixels, np.ndarray) and batch.pixels.dtype == np.uint8
            for item in batch.items:
                seen[paths[item.index]] = item
                if item.row >= 0:
                    ref = decode_image(open(paths[item.index], "rb").read(), PREP).astype(int)
                    assert np.abs(batch.pixels[item.row].astype(int) - ref).mean() < 1.0
    assert set(seen) == set(paths)
    assert "empty file" in seen[str(tree / "cat" / "empty.jpg")].reason
    assert seen[str(tree / "cat" / "bad.jpg")].reason
    assert seen[str(tree / "space" / "alpha.png")].row >= 0


def test_gpu_device_without_a_gpu_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(RuntimeError, match="CUDA GPU"):
        TorchDecoder(PREP, batch_size=4, device="cuda")


def test_extract_with_the_torch_decoder_matches_the_default(tmp_path):
    import shardformat
    from stage1_extract import extract

    tree = make_image_tree(tmp_path / "img", per_class=2, size=200)
    a = extract(tree, tmp_path / "a", progress=False)
    b = extract(tree, tmp_path / "b", decode="torch-cpu", progress=False)
    assert a.extracted == b.extracted == 6
    fa, fb = shardformat.read_features(tmp_path / "a"), shardformat.read_features(tmp_path / "b")
    order_a, order_b = np.argsort(fa.paths), np.argsort(fb.paths)
    xa, xb = fa.features[order_a], fb.features[order_b]
    cos = (xa * xb).sum(1) / np.linalg.norm(xa, axis=1) / np.linalg.norm(xb, axis=1)
    assert cos.min() > 0.98
