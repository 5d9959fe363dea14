"""With the real default backbone (EfficientNet-Lite0) on real images: the open-set flag on photographs given
to an Animal-MNIST classifier, and the exported ONNX file against the two-stage prediction."""

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from stage1_extract import extract
from stage2_classify import Classifier, train
from tests.support.helpers import photo

REPO = Path(__file__).resolve().parents[2]
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field")


def _prepare_module():
    spec = importlib.util.spec_from_file_location("_prepare_animal_mnist_i13", REPO / "data" / "prepare_animal_mnist.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def animals(tmp_path_factory):
    """An Animal-MNIST classifier (10 classes, 30 images each) on EfficientNet-Lite0 features."""
    root = tmp_path_factory.mktemp("animals")
    _prepare_module().prepare(root / "images", per_class=30, seed=0, progress=False)
    extract(root / "images", root / "features", progress=False)
    result = train(root / "features", root / "run", epochs=30, patience=5, batch_size=32, progress=False)
    photos = root / "photos"
    photos.mkdir()
    for name in PHOTOS:
        photo(name).save(photos / f"{name}.jpg", quality=90)
    return dict(root=root, images=root / "images", run=Path(result.run_dir), photos=photos)


def test_photographs_are_unknown_to_an_animal_mnist_classifier(animals):
    clf = Classifier.load(animals["run"])
    split = pd.read_csv(animals["run"] / "split.csv")
    test_paths = split.loc[split["split"] == "test", "path"].tolist()  # never trained or calibrated on
    held_out = clf.predict([str(animals["images"] / p) for p in test_paths], progress=False)
    outside = clf.predict(animals["photos"], progress=False)
    assert len(outside) == len(PHOTOS) and outside["error"].isna().all()
    # the softmax alone is often confident on photographs; the open-set flag is not fooled
    assert outside["unknown"].all(), outside[["path", "predicted", "probability", "ood_score"]]
    assert held_out["unknown"].mean() <= 0.2, held_out["ood_score"].describe()
    assert outside["ood_score"].min() > held_out["ood_score"].quantile(0.95)
    assert (held_out["predicted"] == [p.split("/")[0] for p in test_paths]).mean() >= 0.8
    assert clf.ood.info["calibrated_on"] == "validation" and clf.ood.info["feature_dim"] == 1280


def test_exported_onnx_agrees_with_predict_on_real_images(animals, tmp_path):
    import onnx
    import onnxruntime as ort
    from PIL import Image

    clf = Classifier.load(animals["run"])
    result = clf.export(tmp_path / "model.onnx", images=animals["images"])
    assert result.verified_on == "real images" and result.verified_images == 64
    assert result.max_probability_difference < 1e-4
    model = onnx.load(tmp_path / "model.onnx")
    assert model.ir_version <= 10
    props = {p.key: p.value for p in model.metadata_props}
    assert json.loads(props["labels"]) == clf.classes
    prep = json.loads(props["preprocessing"])
    assert prep["input_size"] == 224 and {"resize", "interpolation", "mean", "std"} <= set(prep)

    # The README's recipe: plain PIL resize of the shorter side + centre crop, plain onnxruntime.
    def pixels(path):
        img = Image.open(path).convert("RGB")
        s = prep["resize"] / min(img.size)
        img = img.resize((round(img.width * s), round(img.height * s)), getattr(Image.Resampling,
                                                                               prep["interpolation"].upper()))
        left, top = round((img.width - prep["input_size"]) / 2), round((img.height - prep["input_size"]) / 2)
        return np.asarray(img.crop((left, top, left + prep["input_size"], top + prep["input_size"])))

    paths = sorted(animals["photos"].glob("*.jpg")) + sorted(animals["images"].glob("*/*_0*.png"))[::7]
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    probs, scores = session.run(None, {"images": np.stack([pixels(p) for p in paths])})
    frame = clf.predict([str(p) for p in paths], progress=False)
    top = np.asarray(clf.classes)[probs.argmax(axis=1)]
    assert list(top) == list(frame["predicted"])
    assert np.abs(probs.max(axis=1) - frame["probability"].to_numpy(float)).max() < 1e-3
    unknown = scores > float(props["ood_threshold"])
    assert list(unknown) == list(frame["unknown"])
    # and the README's example, as written there, runs and names the same class
    photo_path = sorted(animals["photos"].glob("*.jpg"))[0]
    code = _readme_block("## One deployable file").replace('"model.onnx"', repr(str(tmp_path / "model.onnx")))
    printed = _run_printing(code.replace('"photo.jpg"', repr(str(photo_path))))
    path, label = printed.split()[:2]  # the snippet prints: path, class, probability[, unknown]
    assert path == str(photo_path) and label == frame.set_index("path").loc[str(photo_path), "predicted"]
    assert printed.rstrip().endswith("unknown")  # a photograph, to an Animal-MNIST model


def _readme_block(heading: str) -> str:
    text = (REPO / "README.md").read_text()
    section = text[text.index(heading):]
    return section[section.index("```python") + len("```python"):section.index("```", section.index("```python") + 9)]


def _run_printing(code: str, namespace: dict | None = None) -> str:
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        exec(compile(code, "README.md", "exec"), {} if namespace is None else namespace)
    return buf.getvalue()


def test_readme_notebook_example_runs(animals, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = (_readme_block("## In a notebook").replace('"data/animal_mnist"', repr(str(animals["images"])))
            .replace('"new_photos/"', repr(str(animals["photos"])))
            .replace('"data/held_out/"', repr(str(animals["images"]))))  # (warns: not held out; fine here)
    namespace = {}
    namespace["printed"] = _run_printing(code, namespace)
    df = namespace["df"]
    assert len(df) == len(PHOTOS) and df["unknown"].all()
    assert "accuracy" in namespace["printed"]


@pytest.mark.slow
def test_fp16_export_runs_through_the_same_code_on_the_cpu(animals, tmp_path):
    result = Classifier.load(animals["run"]).export(tmp_path / "model16.onnx", precision="fp16",
                                                    images=animals["photos"])
    assert result.precision == "fp16" and result.max_probability_difference < 5e-2
    import onnx

    model = onnx.load(tmp_path / "model16.onnx")
    assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in model.graph.initializer)
    assert {p.key: p.value for p in model.metadata_props}["precision"] == "fp16"


def _cuda_usable() -> bool:
    try:
        import onnxruntime as ort
        import torch
    except ImportError:
        return False
    return "CUDAExecutionProvider" in ort.get_available_providers() and torch.cuda.is_available()


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda_usable(), reason="needs a CUDA GPU for ONNX Runtime")
def test_fp16_export_on_the_gpu(animals, tmp_path):
    result = Classifier.load(animals["run"]).export(tmp_path / "model16.onnx", precision="fp16",
                                                    images=animals["images"],
                                                    providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert result.verified_provider == "CUDAExecutionProvider"
    assert result.max_probability_difference < 5e-2
    print(result.format())
