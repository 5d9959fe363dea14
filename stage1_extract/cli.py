"""``stage1-extract``: command-line front end of :func:`stage1_extract.extract` (heavy imports stay inside main)."""

from __future__ import annotations

import argparse
import json
import sys


def _triple(text: str) -> tuple[float, float, float]:
    parts = [float(p) for p in text.split(",")]
    if len(parts) != 3:
        raise argparse.ArgumentTypeError("give three comma-separated numbers, e.g. 0.485,0.456,0.406")
    return tuple(parts)


def _group_regex(text: str) -> str:
    from stage1_extract.inputs.listing import compile_group_regex

    try:
        compile_group_regex(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("--group-regex ")) from None
    return text


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="stage1-extract",
        description="Extract pooled ImageNet-backbone features for a collection of images into Parquet shards. "
        "Reruns are incremental: only new or changed images are processed.",
        epilog="Examples:\n"
        "  stage1-extract --images data/animal_mnist --out work/features\n"
        "  stage1-extract --images photos.csv --out feats --backbone resnet50 --provider cuda --precision fp16\n"
        "  stage1-extract --images imgs --out feats --onnx my_model.onnx --input-size 224\n"
        "  stage1-extract --list-backbones",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--images", help="class-folder tree (folder = label), flat folder, or CSV/Parquet list with 'path' "
                   "[, 'label', 'group']")
    p.add_argument("--group-regex", type=_group_regex, default=None,
                   help="folder inputs: a regex with one capture group, searched in each relative path, giving the "
                   r"image's group (e.g. a patient: '(patient\d+)'); stage 2 never splits a group")
    p.add_argument("--dicom-group", choices=["patient", "study", "none"], default="patient",
                   help="DICOM rows' group when none is given: a salted hash of PatientID (default) or "
                   "StudyInstanceUID; the salt comes from HYBRID_TRANSFER_GROUP_SALT or a per-user secret file")
    p.add_argument("--dicom-frames", choices=["first", "all"], default="first",
                   help="multi-frame DICOM: the first frame (default) or one row per frame ('scan.dcm#frame=3')")
    p.add_argument("--out", help="output directory for the shards (created if needed)")
    p.add_argument("--backbone", default=None, help="registry name (default efficientnet_lite0; see --list-backbones)")
    p.add_argument("--weights", default=None, help="state_dict file for the backbone (torch.load weights_only)")
    p.add_argument("--onnx", default=None, help="bring your own ONNX model (N×3×H×W float input) instead of --backbone")
    p.add_argument("--input-size", type=int, default=None, help="--onnx: square input size (read from the model if fixed)")
    p.add_argument("--resize", type=int, default=None, help="--onnx: shorter side before centre crop (default input/0.875)")
    p.add_argument("--mean", type=_triple, default=None, help="--onnx: RGB mean on the 0–1 scale (default ImageNet)")
    p.add_argument("--std", type=_triple, default=None, help="--onnx: RGB std on the 0–1 scale (default ImageNet)")
    p.add_argument("--interpolation", choices=["bilinear", "bicubic", "nearest", "lanczos"], default=None,
                   help="--onnx: resize filter (default bilinear)")
    p.add_argument("--batch-size", type=int, default=None, help="images per inference batch (default 16 on CPU, 256 on GPU)")
    p.add_argument("--provider", choices=["auto", "cuda", "cpu", "tensorrt"], default="auto",
                   help="ONNX Runtime execution provider (auto: CUDA when a GPU is usable)")
    p.add_argument("--precision", choices=["fp32", "fp16"], default="fp32", help="fp16 is for GPUs")
    p.add_argument("--workers", type=int, default=None, help="decode worker processes (default: by provider and cores)")
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads (default: all cores)")
    p.add_argument("--shard-size", type=int, default=2048, help="rows per Parquet shard (default 2048)")
    p.add_argument("--draft", action="store_true", help="fast JPEG draft decoding for images ≥2× the needed size")
    p.add_argument("--decode", choices=["cpu", "gpu", "torch-cpu", "nvimgcodec-cpu"], default="cpu",
                   help="cpu: PIL in worker processes (default); gpu: the GPU's hardware JPEG decoder "
                   "(nvImageCodec, pip install 'hybrid-transfer[gpu-decode]'; else torchvision's nvJPEG) + resize "
                   "on the GPU (other files fall back to PIL); torch-cpu, nvimgcodec-cpu: a gpu decoder's code on "
                   "the CPU, for checking")
    p.add_argument("--cuda-graph", action="store_true",
                   help="--provider cuda: replay inference as one CUDA graph (+1.8%% on an H200, off by default)")
    p.add_argument("--strict", action="store_true", help="stop with a non-zero exit at the first bad image")
    p.add_argument("--engine", choices=["local", "ray"], default="local",
                   help="local: processes on this machine (default); ray: Ray Data tasks and actors on a Ray "
                   "cluster (pip install hybrid-transfer[ray]; see docs/ray.md)")
    p.add_argument("--ray-address", default=None,
                   help="--engine ray: cluster to use (auto, HOST:6379 or ray://HOST:10001; default: RAY_ADDRESS, "
                   "else a local Ray instance)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--list-backbones", action="store_true", help="list the registry and exit")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.list_backbones:
        from stage1_extract.model.registry import list_backbones

        for spec in list_backbones():
            prep = spec.preprocessing
            print(f"{spec.name:20s} {spec.feature_dim:5d}-d  {prep.input_size}px  {spec.description}")
        return 0
    if not args.images or not args.out:
        build_parser().error("--images and --out are required")
    if args.onnx and args.backbone:
        build_parser().error("give either --backbone or --onnx, not both")
    from stage1_extract import extract

    options = {}
    if args.engine == "ray":
        from stage1_extract.engines.ray_driver import extract_ray as extract

        options["ray_address"] = args.ray_address
    elif args.ray_address:
        build_parser().error("--ray-address needs --engine ray")
    if args.cuda_graph:
        from stage1_extract.runtime.session import CudaOptions

        options["cuda"] = CudaOptions(cuda_graph=True)
    try:
        summary = extract(
            args.images, args.out, **options, backbone=args.backbone, weights=args.weights, onnx=args.onnx,
            input_size=args.input_size, resize=args.resize, mean=args.mean, std=args.std,
            interpolation=args.interpolation, batch_size=args.batch_size, provider=args.provider,
            precision=args.precision, workers=args.workers, threads=args.threads, strict=args.strict,
            shard_size=args.shard_size, draft=args.draft, decode=args.decode, progress=not args.no_progress,
            group_regex=args.group_regex, dicom_group=args.dicom_group, dicom_frames=args.dicom_frames,
        )
    except KeyboardInterrupt as exc:
        said = str(exc) or "finished shards are kept; rerun the same command to resume"
        notes = "".join(f"; {note}" for note in getattr(exc, "__notes__", []))
        by = getattr(exc, "signal_name", "Ctrl-C")
        print(f"interrupted ({by}): {said}{notes}", file=sys.stderr)
        return getattr(exc, "exit_code", 130)
    except (OSError, ValueError, RuntimeError) as exc:
        print(f"stage1-extract: error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(summary.as_dict(), indent=1) if args.json else summary.format())
    return 0
