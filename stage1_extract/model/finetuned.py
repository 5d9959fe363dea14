"""Fine-tuned backbones: the torch module a fine-tune trains, and the directory stage 1 reads one back from.

Stage 2's ``finetune`` trains the registry's own torch module (:func:`torch_backbone`) and writes, into its
run directory, the weights as ``backbone.safetensors`` (tensors only, no pickle) and ``finetune.json``::

    {"format": 1, "backbone": "efficientnet_lite0", "weights": "backbone.safetensors",
     "input_size": 128, "resize": 146, "provenance": {"kind": "finetuned", "run": ..., ...}}

``stage1-extract --backbone-from DIR`` (:func:`read_finetuned`) rebuilds that backbone from the registry with
those weights, at that input size, and records the provenance in every shard's metadata. The weights file's
hash is the vectors' ``weights_id``, so they never mix with pretrained vectors (or another fine-tune's).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from stage1_extract.errors import InputError, InputNotFoundError, OptionError
from stage1_extract.model.preprocessing import Preprocessing
from stage1_extract.model.registry import DEFAULT_BACKBONE, BackboneSpec, get_backbone

FINETUNE_FILE = "finetune.json"
WEIGHTS_FILE = "backbone.safetensors"
FORMAT = 1


@dataclasses.dataclass(frozen=True)
class FinetunedBackbone:
    """What ``finetune.json`` says: the registry backbone, its weights file and input size, and the provenance."""

    backbone: str
    weights: str
    input_size: int
    resize: int
    provenance: dict


def read_finetuned(path: str | os.PathLike, *, backbone=None, weights=None, onnx=None,
                   input_size=None) -> FinetunedBackbone:
    """Read a fine-tuned run directory (or its ``finetune.json``); options that contradict it are refused."""
    given = Path(path).expanduser()
    info_path = given if given.name == FINETUNE_FILE else given / FINETUNE_FILE
    if not info_path.is_file():
        raise InputNotFoundError(f"--backbone-from {given}: no {FINETUNE_FILE} there (expected a run directory "
                                 "written by `stage2-classify finetune`)")
    try:
        info = json.loads(info_path.read_text())
        if not isinstance(info, dict) or info.get("format") != FORMAT:
            raise ValueError(f"unknown format {info.get('format') if isinstance(info, dict) else info!r}")
        provenance = dict(info.get("provenance") or {})
        if not info.get("staging"):  # a run directory, wherever it is now (copied or moved since): the one read
            provenance["directory"] = str(info_path.parent.absolute())
        tuned = FinetunedBackbone(str(info["backbone"]), str(info_path.parent / info["weights"]),
                                  int(info["input_size"]), int(info["resize"]), provenance)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(f"{info_path}: not a readable fine-tune description ({exc}); fine-tune again") from None
    get_backbone(tuned.backbone)  # still in the registry
    if onnx is not None:
        raise OptionError("--backbone-from and --onnx name two different models: give one")
    for flag, value, mine in (("--backbone", backbone, tuned.backbone), ("--input-size", input_size, tuned.input_size)):
        if value is not None and value != mine:
            raise OptionError(f"{flag} {value} contradicts --backbone-from {given} (fine-tuned {flag[2:]}: {mine}); "
                              f"leave {flag} out")
    if weights is not None and os.path.realpath(weights) != os.path.realpath(tuned.weights):
        raise OptionError(f"--weights {weights} contradicts --backbone-from {given}: its weights are {tuned.weights}")
    if not os.path.isfile(tuned.weights):
        raise InputNotFoundError(f"{tuned.weights}: the fine-tuned weights named by {info_path} are missing; copy "
                                 "the whole run directory")
    return tuned


@dataclasses.dataclass
class TorchBackbone:
    """A registry backbone as the torch module a fine-tune trains: normalised NCHW float in, pooled vector out.

    ``preprocessing`` is what stage 1 would use (at ``input_size`` when given); :meth:`state_dict` gives the full
    classifier state_dict in the layout ``--weights`` / ``backbone.safetensors`` loads."""

    spec: BackboneSpec
    module: object  # torch.nn.Module
    preprocessing: Preprocessing
    weights_id: str
    original: dict = dataclasses.field(repr=False, default_factory=dict)

    def state_dict(self) -> dict:
        from stage1_extract.model.weights import classifier_state_dict

        return classifier_state_dict(self.spec, self.module, self.original)


def torch_backbone(backbone: str | None = None, *, weights: str | os.PathLike | None = None,
                   input_size: int | None = None) -> TorchBackbone:
    """The registry backbone ``backbone`` (default: the default backbone) as a trainable torch module."""
    from stage1_extract.model.weights import build_torch_classifier, feature_view, weights_source

    spec = get_backbone(backbone or DEFAULT_BACKBONE)
    source = weights_source(spec, weights)
    state = source.load_state_dict()
    module = feature_view(spec, build_torch_classifier(spec, state))
    return TorchBackbone(spec, module, spec.preprocessing.at_size(input_size), source.weights_id, state)


def write_finetuned(directory: str | os.PathLike, backbone: TorchBackbone, provenance: dict, *,
                    staging: bool = False) -> dict:
    """Write ``backbone.safetensors`` and ``finetune.json`` into ``directory`` (atomically); returns the provenance
    completed with the weights' hash, as the shards extracted with ``--backbone-from`` will carry it.

    ``staging``: ``directory`` is a working copy and ``provenance["directory"]`` the run directory it will be
    copied to (stage 1 then records that one, not the working copy's)."""
    from safetensors.torch import save_file

    from shardformat import atomic_write_bytes, atomic_write_via_path
    from stage1_extract.model.weights import file_sha256

    directory = Path(directory)
    target = directory / WEIGHTS_FILE
    atomic_write_via_path(target, lambda tmp: save_file(backbone.state_dict(), tmp))
    full = {**provenance, "kind": "finetuned", "base_backbone": backbone.spec.name,
            "weights_sha256": file_sha256(target)}
    prep = backbone.preprocessing
    info = {"format": FORMAT, "backbone": backbone.spec.name, "weights": WEIGHTS_FILE,
            "input_size": prep.input_size, "resize": prep.resize, "provenance": full}
    atomic_write_bytes(directory / FINETUNE_FILE, json.dumps({**info, "staging": staging}, indent=1).encode())
    return full


def finetune_info_for(directory: str | os.PathLike) -> bytes:
    """``finetune.json`` of a staging copy as the run directory keeps it (no ``staging`` mark)."""
    info = json.loads((Path(directory) / FINETUNE_FILE).read_text())
    info.pop("staging", None)
    return json.dumps(info, indent=1).encode()
