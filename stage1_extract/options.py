"""Every option of a stage-1 run, defined once: its default, its CLI flag, help text, choices and parser.

:func:`stage1_extract.extract` takes its keyword defaults from :class:`ExtractOptions` (a field's class
attribute is its default), ``stage1-extract`` builds its flags from it (``add_options``), and so does the
pipeline's CLI for its stage-1 flags; ``tests/stage1/test_options.py`` checks that ``extract()``'s keywords and
defaults stay equal to the fields. This module stays light (no numpy, no onnxruntime): ``--help`` must be instant.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from hybrid_common import option
from stage1_extract.decoding.factory import DECODERS

#: where the backbone runs (``--provider``); ``auto``: CUDA when a GPU is usable
PROVIDERS = ("auto", "cpu", "cuda", "tensorrt")
#: where stage 1 runs (``--engine``)
ENGINES = ("local", "ray")
#: how images are decoded (``--decode``): the decoders :mod:`stage1_extract.decoding.factory` can make
DECODE_CHOICES = tuple(DECODERS)
INTERPOLATIONS = ("bilinear", "bicubic", "nearest", "lanczos")


def parse_triple(text: str) -> tuple[float, float, float]:
    """``--mean`` / ``--std``: three comma-separated numbers."""
    parts = [float(p) for p in text.split(",")]
    if len(parts) != 3:
        raise argparse.ArgumentTypeError("give three comma-separated numbers, e.g. 0.485,0.456,0.406")
    return tuple(parts)


def parse_group_regex(text: str) -> str:
    """``--group-regex``: refused at parse time when it is not a regex with exactly one capture group."""
    from stage1_extract.inputs.groups import compile_group_regex

    try:
        compile_group_regex(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("--group-regex ")) from None
    return text


@dataclasses.dataclass
class ExtractOptions:
    """The options of :func:`stage1_extract.extract` (everything but ``images`` and ``out``)."""

    engine: str = option("local", choices=ENGINES,
                         help="local: processes on this machine (default); ray: Ray Data tasks and actors on a Ray "
                         "cluster (pip install hybrid-transfer[ray]; see docs/ray.md)")
    backbone: str | None = option(None, help="registry name (default efficientnet_lite0; see --list-backbones)")
    weights: str | None = option(None, help="state_dict file for the backbone (torch.load weights_only)")
    onnx: str | None = option(None, help="bring your own ONNX model (N×3×H×W float input) instead of --backbone")
    backbone_from: str | None = option(None, help="a fine-tuned run directory (stage2-classify finetune): its backbone, "
                                       "weights and input size; the shards record where they came from")
    input_size: int | None = option(None, parse=int,
                                    help="square input size: --onnx (read from the model if fixed) or a registry "
                                    "backbone at another resolution")
    resize: int | None = option(None, parse=int,
                                help="shorter side before centre crop (default: input size / the backbone's crop ratio)")
    mean: tuple[float, float, float] | None = option(None, parse=parse_triple,
                                                     help="--onnx: RGB mean on the 0–1 scale (default ImageNet)")
    std: tuple[float, float, float] | None = option(None, parse=parse_triple,
                                                    help="--onnx: RGB std on the 0–1 scale (default ImageNet)")
    interpolation: str | None = option(None, choices=INTERPOLATIONS, help="--onnx: resize filter (default bilinear)")
    batch_size: int | None = option(None, parse=int,
                                    help="images per inference batch (default 16 on CPU, 256 on GPU)")
    provider: str = option("auto", choices=PROVIDERS,
                           help="ONNX Runtime execution provider (auto: CUDA when a GPU is usable)")
    precision: str = option("fp32", choices=("fp32", "fp16"), help="fp16 is for GPUs")
    workers: int | None = option(None, parse=int,
                                 help="decode worker processes (default: by provider and cores); --engine ray: most "
                                 "decode tasks at once")
    threads: int | None = option(None, parse=int, help="ONNX Runtime intra-op threads (default: all cores)")
    strict: bool = option(False, action="store_true", help="stop with a non-zero exit at the first bad image")
    shard_size: int = option(2048, help="rows per Parquet shard (default 2048)")
    draft: bool = option(False, action="store_true", help="fast JPEG draft decoding for images ≥2× the needed size")
    decode: str = option("cpu", choices=DECODE_CHOICES,
                         help="cpu: PIL in worker processes (default); gpu: the GPU's hardware JPEG decoder "
                         "(nvImageCodec, pip install 'hybrid-transfer[gpu-decode]'; else torchvision's nvJPEG) + "
                         "resize on the GPU (other files fall back to PIL); torch-cpu, nvimgcodec-cpu: a gpu "
                         "decoder's code on the CPU, for checking")
    #: progress bar; on the command line ``--no-progress`` (old spelling ``--quiet``, hybrid_common.add_progress_flag)
    progress: bool = True
    group_regex: str | None = option(None, parse=parse_group_regex,
                                     help="folder inputs: a regex with one capture group, searched in each relative "
                                     r"path, giving the image's group (e.g. a patient: '(patient\d+)'); stage 2 "
                                     "never splits a group")
    dicom_frames: str = option("first", choices=("first", "all"),
                               help="multi-frame DICOM: the first frame (default) or one row per frame "
                               "('scan.dcm#frame=3')")
    dicom_group: str = option("patient", choices=("patient", "study", "none"),
                              help="DICOM rows' group when none is given: a salted hash of PatientID (default) or "
                              "StudyInstanceUID; the salt comes from HYBRID_TRANSFER_GROUP_SALT or a per-user "
                              "secret file")
    lock_wait: float = option(0.0, parse=float,
                              help="seconds to wait for another run writing the same --out to finish (default 0: "
                              "stop at once with the other run's pid)")
    #: the salt of DICOM groups (Python only; the CLI reads HYBRID_TRANSFER_GROUP_SALT or the per-user file)
    group_salt: str | None = None
    #: CUDA provider tuning, a :class:`~stage1_extract.runtime.session.CudaOptions` (CLI: ``--cuda-graph``)
    cuda: Any = None
    ray_address: str | None = option(None, help="--engine ray: cluster to use (auto, HOST:6379 or ray://HOST:10001; "
                                     "default: RAY_ADDRESS, else a local Ray instance)")
    #: --engine ray: size of the inference actor pool (default: one per GPU, or one per node on CPU-only clusters)
    actors: int | None = None

    def as_kwargs(self) -> dict[str, Any]:
        """The fields as ``extract()`` keywords (not :func:`dataclasses.asdict`: that would copy ``cuda``)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


#: the options that only the Ray engine reads
RAY_ONLY = ("ray_address", "actors")
