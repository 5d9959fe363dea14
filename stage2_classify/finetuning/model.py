"""The Keras model a fine-tune trains: augmentation → the registry's torch backbone → the run's own head.

The backbone is stage 1's torch module inside ``keras.layers.TorchModuleWrapper`` (the torch backend's way to
train a torch module with ``compile``/``fit``), subclassed only to keep BatchNorm in inference mode (its
running statistics are the ImageNet ones; small batches would wreck them) and to run in bfloat16 autocast on a
GPU. The head is the frozen run's trained Keras head (LP-FT: fine-tuning starts from a converged head).
:class:`TwoRateAdamW` gives the backbone and the head their own AdamW and learning rate (discriminative rates),
through the optimizer API that ``fit`` calls (``build``/``apply``).
"""

from __future__ import annotations

import numpy as np

from stage2_classify.backend import check_backend
from stage2_classify.errors import Stage2Error

check_backend()
import keras  # noqa: E402
import torch  # noqa: E402


class FrozenStatsBackbone(keras.layers.TorchModuleWrapper):
    """A torch backbone as a Keras layer: uint8-valued NHWC float pixels in, the pooled vector out.

    Normalisation (the backbone's mean/std on the 0–255 scale) happens inside, as in stage 1's ONNX graph."""

    def __init__(self, module, mean, std, feature_dim: int, autocast: bool = False, **kwargs):
        super().__init__(module, output_shape=(None, feature_dim), **kwargs)
        device = next(module.parameters()).device
        self.mean = torch.tensor(mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        self.autocast = autocast

    def call(self, inputs, training=None):
        self.module.train(bool(training))
        for layer in self.module.modules():  # BatchNorm stays in inference mode, always
            if isinstance(layer, torch.nn.modules.batchnorm._BatchNorm):
                layer.eval()
        x = (inputs.permute(0, 3, 1, 2) - self.mean) / self.std
        if self.autocast:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                return self.module(x).float()
        return self.module(x)

    def compute_output_spec(self, inputs, training=None):
        return keras.KerasTensor((inputs.shape[0], self.output_shape[-1]), dtype="float32")


def blocks(module) -> list[list[str]]:
    """The backbone's parameter names in blocks, input to output: a block is a prefix up to the first numeric
    part of a name (``blocks.5``, ``layer3.2``); names without one join the block before them (the stem the
    first block)."""
    out: list[list[str]] = []
    keys: list[str] = []
    for name, _ in module.named_parameters():
        parts = name.split(".")
        numeric = next((i for i, p in enumerate(parts) if p.isdigit()), None)
        key = ".".join(parts[:numeric + 1]) if numeric is not None else None
        if key is not None and keys == [""]:  # the stem joins the first numbered block
            keys[0] = key
        elif key is not None and (not keys or keys[-1] != key):
            keys.append(key)
            out.append([])
        if not out:
            out.append([])
            keys.append("")
        out[-1].append(name)
    return out


def set_trainable(module, unfreeze: str, input_size: int) -> tuple[int, int]:
    """Mark what trains (``all``, ``bn`` or ``last:K``); parameters that do not reach the pooled vector (an
    ImageNet classifier layer) never train. Returns (trainable, total) parameter counts."""
    params = dict(module.named_parameters())
    for p in params.values():
        p.requires_grad_(True)
    module.eval()
    probe = torch.zeros(1, 3, min(input_size, 64), min(input_size, 64), device=next(module.parameters()).device)
    module(probe).sum().backward()
    used = {n for n, p in params.items() if p.grad is not None}
    module.zero_grad(set_to_none=True)
    if unfreeze == "all":
        chosen = used
    elif unfreeze == "bn":
        chosen = {f"{m}.{p}" if m else p for m, layer in module.named_modules()
                  if isinstance(layer, torch.nn.modules.batchnorm._BatchNorm) for p, _ in layer.named_parameters()}
    else:
        k = int(unfreeze.split(":")[1])
        groups = blocks(module)
        if k > len(groups):
            raise Stage2Error(f"--unfreeze {unfreeze}: the backbone has {len(groups)} blocks")
        chosen = {n for g in groups[-k:] for n in g}
    for name, p in params.items():
        p.requires_grad_(name in chosen and name in used)
    return sum(p.numel() for p in params.values() if p.requires_grad), sum(p.numel() for p in params.values())


def augmentation(kind: str, seed: int) -> list:
    """Keras augmentation layers (active in training only): small shifts, scale and rotation, brightness and
    contrast, the usual safe set for medical images; horizontal flips only when asked (``medical+flip``)."""
    from keras import layers

    if kind == "none":
        return []
    steps = [layers.RandomTranslation(0.06, 0.06, fill_mode="constant", seed=seed),
             layers.RandomZoom((-0.1, 0.1), fill_mode="constant", seed=seed + 1),
             layers.RandomRotation(10 / 360, fill_mode="constant", seed=seed + 2),
             layers.RandomBrightness(0.1, value_range=(0, 255), seed=seed + 3),
             layers.RandomContrast(0.15, value_range=(0, 255), seed=seed + 4)]
    if kind == "medical+flip":
        steps.append(layers.RandomFlip("horizontal", seed=seed + 5))
    return steps


class TwoRateAdamW(keras.optimizers.Optimizer):
    """Two AdamW optimizers behind one: the backbone's variables get ``backbone``, all others ``head``."""

    def __init__(self, head, backbone, backbone_variables, **kwargs):
        super().__init__(learning_rate=0.0, name="two_rate_adamw", **kwargs)
        self.head, self.backbone = head, backbone
        self._backbone_ids = {id(v) for v in backbone_variables}

    def _parts(self, variables):
        bb = [i for i, v in enumerate(variables) if id(v) in self._backbone_ids]
        hd = [i for i, v in enumerate(variables) if id(v) not in self._backbone_ids]
        return hd, bb

    def build(self, variables):
        hd, bb = self._parts(variables)
        for opt, idx in ((self.head, hd), (self.backbone, bb)):
            chosen = [variables[i] for i in idx]
            opt.build(chosen)
            flat = [v for v in chosen if len(v.shape) <= 1]
            if len(flat) == len(chosen) or not opt.weight_decay:  # nothing to decay (--unfreeze bn): no empty call
                opt.weight_decay = None
            else:
                opt.exclude_from_weight_decay(var_list=flat)
        super().build(variables)

    def apply(self, grads, trainable_variables=None):
        variables = list(trainable_variables if trainable_variables is not None else self._trainable_variables)
        if not self.built:
            self.build(variables)
        for opt, idx in zip((self.head, self.backbone), self._parts(variables)):
            if idx:
                opt.apply([grads[i] for i in idx], [variables[i] for i in idx])
        self.iterations.assign_add(1)

    def state(self) -> list:
        """Every optimizer variable (moments, step counters), for checkpoints, in a fixed order."""
        return list(self.head.variables) + list(self.backbone.variables)


def schedule(peak: float, steps: int, warmup: float):
    """Linear warm-up to ``peak`` over ``warmup`` of the steps, then cosine decay to zero."""
    warm = max(1, int(round(steps * warmup)))
    return keras.optimizers.schedules.CosineDecay(0.0, max(1, steps - warm), alpha=0.0, warmup_target=peak,
                                                  warmup_steps=warm)


def build_model(backbone, head, opts, *, steps: int, device: str):
    """The compiled fine-tune model (uint8-valued pixels in, probabilities out) and its backbone layer."""
    module = backbone.module.to(device)
    prep = backbone.preprocessing
    trainable, total = set_trainable(module, opts.unfreeze, prep.input_size)
    if trainable == 0:
        raise Stage2Error(f"--unfreeze {opts.unfreeze} leaves nothing of the backbone to train")
    layer = FrozenStatsBackbone(module, prep.mean, prep.std, backbone.spec.feature_dim,
                                autocast=device == "cuda", name="backbone")
    inputs = keras.Input((prep.input_size, prep.input_size, 3), name="pixels")
    x = inputs
    for step in augmentation(opts.augment, opts.seed):
        x = step(x)
    model = keras.Model(inputs, head(layer(x)), name="finetune")
    rates = [(opts.learning_rate * opts.head_lr_scale), opts.learning_rate]
    head_opt, bb_opt = (keras.optimizers.AdamW(schedule(r, steps, opts.warmup), weight_decay=opts.weight_decay)
                        for r in rates)
    model.compile(optimizer=TwoRateAdamW(head_opt, bb_opt, layer.trainable_weights),
                  loss=keras.losses.CategoricalCrossentropy(label_smoothing=opts.label_smoothing),
                  metrics=["accuracy"])
    return model, layer, (trainable, total)


class Batches(keras.utils.PyDataset):
    """uint8 pixels → float32 batches with one-hot targets, reshuffled (seeded) every epoch; no worker processes."""

    def __init__(self, x: np.ndarray, y: np.ndarray, n_classes: int, batch_size: int, *, shuffle: bool,
                 seed: int = 0, sample_weight: np.ndarray | None = None):
        super().__init__()
        self.x, self.y, self.k, self.bs, self.shuffle = x, y, n_classes, batch_size, shuffle
        self.w, self.seed = sample_weight, seed
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        """The order of epoch ``epoch`` (0-based): the same after a resume as in an uninterrupted run."""
        self.epoch = epoch
        rng = np.random.default_rng([self.seed, epoch])
        self.order = rng.permutation(len(self.x)) if self.shuffle else np.arange(len(self.x))

    def __len__(self) -> int:
        return max(1, -(-len(self.x) // self.bs))

    def __getitem__(self, i: int):
        idx = np.sort(self.order[i * self.bs:(i + 1) * self.bs])
        x = self.x[idx].astype(np.float32)
        y = np.eye(self.k, dtype=np.float32)[self.y[idx]]
        return (x, y) if self.w is None else (x, y, self.w[idx])

    def on_epoch_end(self) -> None:
        self.set_epoch(self.epoch + 1)


def pooled_vectors(layer, x: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """The frozen backbone's vectors of uint8 pixels (inference mode, no gradients), for the linear-probe step."""
    out = []
    with torch.no_grad():
        for s in range(0, len(x), batch_size):
            out.append(keras.ops.convert_to_numpy(layer(x[s:s + batch_size].astype(np.float32), training=False)))
    return np.concatenate(out) if out else np.zeros((0, layer.output_shape[-1]), np.float32)
