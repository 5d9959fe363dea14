"""A backbone's weights and torch model: where the weights come from (a file, the bundled package, torchvision's
cache or download), their identity for the shard metadata, and the torch module the export traces.

Separate from the registry (:mod:`stage1_extract.model.registry`), which only names backbones: torch, timm and
torchvision are imported here, inside functions, only when a model must be exported, so a run with a cached
ONNX file never imports them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import os
import socket
from pathlib import Path
from typing import Callable

from stage1_extract.errors import Stage1Error
from stage1_extract.model.registry import BackboneSpec


class WeightsUnavailableError(Stage1Error, RuntimeError):
    """Pretrained weights cannot be found locally or downloaded."""


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclasses.dataclass(frozen=True)
class WeightsSource:
    """Where a backbone's weights come from, and a stable identity for them (goes into shard metadata)."""

    weights_id: str
    load_state_dict: Callable[[], dict]


def _load_file(path: Path) -> dict:
    import torch

    if path.suffix == ".safetensors":  # a fine-tuned backbone (stage2-classify finetune): tensors only, by design
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as exc:
            raise WeightsUnavailableError(f"{path}: not a readable safetensors file ({exc}); copy it again or "
                                          "fine-tune again") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # weights_only refuses pickled code: say so plainly
        raise WeightsUnavailableError(
            f"{path}: could not be loaded as a plain state_dict with torch.load(weights_only=True): {exc}. "
            "Only tensor state_dicts are accepted; pickled models or code are refused."
        ) from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise WeightsUnavailableError(f"{path}: expected a state_dict (a dict of tensors), got {type(state).__name__}")
    return state


def weights_source(spec: BackboneSpec, weights_file: str | os.PathLike | None = None) -> WeightsSource:
    """Resolve the weights for ``spec``: an explicit file, the bundled package, or torchvision's cache/download.

    Never falls back to random weights: if nothing can be found, raises :class:`WeightsUnavailableError`
    saying how to supply them.
    """
    if weights_file is not None:
        path = Path(weights_file).expanduser()
        if not path.is_file():
            raise WeightsUnavailableError(f"--weights {path}: no such file")
        return WeightsSource(f"sha256:{file_sha256(path)}", lambda: _load_file(path))
    if spec.family == "lite":
        try:
            pkg = importlib.import_module(spec.weights_package)
        except ImportError:
            dist = spec.weights_package.replace("_", "-")
            raise WeightsUnavailableError(
                f"backbone {spec.name} needs the weights package: pip install {dist}  (or pass --weights FILE)"
            ) from None
        models = Path(pkg.__file__).parent / "models"
        files = sorted(models.glob("*.pth"))
        if not files:
            raise WeightsUnavailableError(f"no .pth file inside {models}; reinstall {spec.weights_package}")
        return WeightsSource(f"sha256:{file_sha256(files[0])}", lambda: _load_file(files[0]))
    return _torchvision_weights(spec)


def _torchvision_weights(spec: BackboneSpec) -> WeightsSource:
    import torch
    from torchvision.models import get_model_weights

    weights = get_model_weights(spec.arch).DEFAULT
    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)

    def load() -> dict:
        if cached.is_file():
            return _load_file(cached)
        previous = socket.getdefaulttimeout()
        socket.setdefaulttimeout(20)
        try:
            return weights.get_state_dict(progress=True, check_hash=True)
        except Exception as exc:
            raise WeightsUnavailableError(
                f"backbone {spec.name}: torchvision weights {weights} are not cached at {cached} and could not be "
                f"downloaded ({type(exc).__name__}: {exc}).\nFix: on a machine with internet download {weights.url} "
                f"and either copy it to {cached} or pass --weights /path/to/{os.path.basename(weights.url)}. "
                f"Offline, use the default backbone 'efficientnet_lite0', whose weights ship in a package."
            ) from None
        finally:
            socket.setdefaulttimeout(previous)

    return WeightsSource(f"torchvision:{weights}", load)


def build_torch_classifier(spec: BackboneSpec, state_dict: dict):
    """The full ImageNet classifier (logits), with weights loaded; eval mode."""
    if spec.family == "lite":
        import timm

        model = timm.create_model(spec.arch, pretrained=False)
        own = model.state_dict()
        if set(own) == set(state_dict):  # timm's own names (a fine-tuned backbone): by name, in any order
            model.load_state_dict(state_dict)
            return model.eval()
        if len(own) != len(state_dict):
            raise WeightsUnavailableError(
                f"weights for {spec.name} have {len(state_dict)} tensors, {spec.arch} expects {len(own)}"
            )
        # The weights package uses another implementation's names; the tensors line up by position.
        remapped = {}
        for (name, tensor), (their_name, theirs) in zip(own.items(), state_dict.items()):
            if tuple(tensor.shape) != tuple(theirs.shape):
                raise WeightsUnavailableError(
                    f"weights for {spec.name}: tensor {their_name} {tuple(theirs.shape)} does not fit "
                    f"{name} {tuple(tensor.shape)}"
                )
            remapped[name] = theirs
        model.load_state_dict(remapped)
    else:
        import torchvision

        model = torchvision.models.get_model(spec.arch, weights=None)
        missing, unexpected = model.load_state_dict(state_dict, strict=False)
        if missing or unexpected:
            raise WeightsUnavailableError(
                f"weights do not fit {spec.arch}: missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
    return model.eval()


def build_feature_model(spec: BackboneSpec, state_dict: dict):
    """A torch module mapping normalised NCHW float input to the pooled (N, feature_dim) vector."""
    return feature_view(spec, build_torch_classifier(spec, state_dict))


def feature_view(spec: BackboneSpec, model):
    """``model`` (the full ImageNet classifier) seen as a feature extractor: its pooled vector, not its logits.

    Lite backbones are wrapped (``.net`` is the classifier, untouched); torchvision ones have their feature layer
    replaced by ``Identity`` in place. :func:`classifier_state_dict` turns either back into a full state_dict."""
    import torch

    if spec.family == "lite":

        class Pooled(torch.nn.Module):
            def __init__(self, net):
                super().__init__()
                self.net = net

            def forward(self, x):
                return self.net.forward_head(self.net.forward_features(x), pre_logits=True)

        return Pooled(model).eval()
    parent = model
    *path, last = spec.feature_layer.split(".")
    for part in path:
        parent = getattr(parent, part) if not part.isdigit() else parent[int(part)]
    if last.isdigit():
        parent[int(last)] = torch.nn.Identity()
    else:
        setattr(parent, last, torch.nn.Identity())
    return model.eval()


def classifier_state_dict(spec: BackboneSpec, features, original: dict) -> dict:
    """The full classifier state_dict of a (possibly fine-tuned) :func:`feature_view`, in the layout ``--weights``
    loads: for torchvision the replaced feature layer's tensors come from ``original``, untouched."""
    if spec.family == "lite":
        return {k: v.detach().contiguous() for k, v in features.net.state_dict().items()}
    state = {k: v.detach().contiguous() for k, v in features.state_dict().items()}
    removed = spec.feature_layer + "."
    state.update({k: v for k, v in original.items() if k.startswith(removed)})
    return state


def _module(model, dotted: str):
    for part in dotted.split("."):
        model = model[int(part)] if part.isdigit() else getattr(model, part)
    return model


def build_feature_map_model(spec: BackboneSpec, state_dict: dict):
    """A torch module mapping normalised NCHW float input to the last convolutional map (N, feature_dim, h, w),
    whose global average is :func:`build_feature_model`'s pooled vector (the export checks that it is).

    The map is the output of the registry's ``feature_map_layer``, caught by a forward hook (the layers after
    it do not reach the output, so the exported graph leaves them out).
    """
    import torch

    if spec.feature_map_layer is None:
        raise Stage1Error(f"backbone {spec.name}: its pooled vector is not the plain average of a convolutional "
                          "map, so it has no feature map for heatmaps")
    model = build_torch_classifier(spec, state_dict)
    layer = _module(model, spec.feature_map_layer)
    relu = spec.feature_map_activation == "relu"

    class FeatureMap(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net
            self.caught = []
            layer.register_forward_hook(lambda _m, _i, out: self.caught.append(out))

        def forward(self, x):
            self.caught.clear()
            self.net(x)
            out = self.caught[-1]
            self.caught.clear()
            return torch.relu(out) if relu else out

    return FeatureMap(model).eval()
