"""Stage 1's options are defined once (ExtractOptions), its errors share one base, and it leaves no global state."""

from __future__ import annotations

import dataclasses
import inspect
import logging

import pytest

import stage1_extract
from stage1_extract import ExtractOptions, Stage1Error, extract, extract_ray
from stage1_extract.cli import build_parser


def test_extract_keywords_and_defaults_are_extract_options_fields():
    params = inspect.signature(extract).parameters
    keywords = {name: p.default for name, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}
    fields = {f.name: (f.default if f.default is not dataclasses.MISSING else f.default_factory())
              for f in dataclasses.fields(ExtractOptions)}
    assert list(params)[:2] == ["images", "out"]
    assert keywords == fields


def test_extract_ray_is_extract_with_the_ray_engine(monkeypatch):
    import stage1_extract.api as api

    seen = {}
    monkeypatch.setattr(api, "run_extraction", lambda images, out, options: seen.update(vars(options)) or "done")
    assert extract_ray("imgs", "out", ray_address="auto", provider="cpu") == "done"
    assert seen["engine"] == "ray" and seen["ray_address"] == "auto" and seen["provider"] == "cpu"


def test_cli_flags_come_from_the_options():
    parser = build_parser()
    args = parser.parse_args(["--images", "i", "--out", "o", "--quiet", "--provider", "tensorrt", "--strict"])
    assert args.progress is False and args.provider == "tensorrt" and args.strict is True
    assert parser.parse_args([]).progress is True
    with pytest.raises(SystemExit):
        parser.parse_args(["--provider", "gpu"])
    flags = {s for a in parser._actions for s in a.option_strings}
    for field in dataclasses.fields(ExtractOptions):
        if "hybrid_common.option" in field.metadata:
            assert "--" + field.name.replace("_", "-") in flags


def test_every_error_stage1_raises_on_purpose_derives_from_stage1error():
    from stage1_extract.decoding.dicom import DicomError
    from stage1_extract.decoding.files import DecodeError
    from stage1_extract.decoding.nvimgcodec import GpuDecodeUnavailableError
    from stage1_extract.decoding.pool import DecodePoolError
    from stage1_extract.decoding.shm import SharedMemoryTooSmallError
    from stage1_extract.engines.ray_driver import RayUnavailableError
    from stage1_extract.errors import InputError, InputNotFoundError, NonFiniteFeaturesError, OptionError
    from stage1_extract.inputs.records import NoImagesError
    from stage1_extract.model.export import ExportVerificationError
    from stage1_extract.model.onnx_graph import OnnxModelError
    from stage1_extract.run.lock import OutputLockedError
    from stage1_extract.run.writer import ShardWriteError
    from stage1_extract.runtime.session import ProviderUnavailableError

    kept = {NoImagesError: ValueError, OnnxModelError: ValueError, ShardWriteError: OSError,
            stage1_extract.StrictModeError: RuntimeError, stage1_extract.WeightsUnavailableError: RuntimeError,
            OutputLockedError: RuntimeError, DecodePoolError: RuntimeError, ExportVerificationError: RuntimeError,
            ProviderUnavailableError: RuntimeError, RayUnavailableError: RuntimeError,
            SharedMemoryTooSmallError: RuntimeError, GpuDecodeUnavailableError: RuntimeError,
            DecodeError: Exception, DicomError: DecodeError, OptionError: ValueError, InputError: ValueError,
            InputNotFoundError: FileNotFoundError, NonFiniteFeaturesError: FloatingPointError}
    for cls, base in kept.items():
        assert issubclass(cls, Stage1Error) and issubclass(cls, base), cls


def test_the_pydicom_log_filter_is_installed_only_while_reading():
    from stage1_extract.decoding.dicom import quiet_pydicom

    logger = logging.getLogger("pydicom")
    before = list(logger.filters)
    with quiet_pydicom():
        assert len(logger.filters) == len(before) + 1
        with quiet_pydicom():
            assert len(logger.filters) == len(before) + 1
    assert logger.filters == before


def test_importing_the_package_loads_neither_numpy_nor_onnxruntime():
    import subprocess
    import sys

    code = "import sys, stage1_extract, stage1_extract.cli; print('numpy' in sys.modules, 'onnxruntime' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_a_wrong_option_is_an_option_error_and_still_a_value_error(tmp_path):
    from stage1_extract.errors import OptionError

    with pytest.raises(OptionError, match="engine must be 'local' or 'ray', not 'spark'"):
        extract(tmp_path, tmp_path / "out", engine="spark")
    with pytest.raises(ValueError, match="decode must be one of"):
        extract(tmp_path, tmp_path / "out", decode="fpga")
