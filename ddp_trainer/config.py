"""Typed, validated run configuration: built-in defaults < YAML file < ``key=value`` overrides.

Every section is a frozen dataclass; :func:`load` checks every key and value before anything else
runs, so a typo is reported (with the closest valid key) before a process group exists. The
defaults equal ``configs/default.yaml`` (a test keeps them in step).
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import signal
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Optional, Sequence

import yaml

from .errors import ConfigError

MAX_LR = 3.0e38  # float32's range: past it the rate itself becomes inf in the optimizer (large finite rates are allowed: a diverging run is reported as such)
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
AUGMENTATIONS = ("flip", "random_resized_crop", "trivialaugment", "randaugment", "autoaugment", "random_erasing")
POLICIES = ("trivialaugment", "randaugment", "autoaugment")  # at most one of these (or a timm string) per run
TIMM_AUGMENT_PREFIXES = ("rand-", "augmix-")  # timm's augmentation strings (data/timm_augment.py), e.g. rand-m7-mstd0.5-inc1
# what checkpoint.monitor may name: columns of each epoch's metrics row (the *_ema ones need train.ema_decay)
MONITORABLE_METRICS = ("val_loss", "val_acc", "val_acc5", "train_loss", "val_loss_ema", "val_acc_ema")


@dataclass(frozen=True)
class DataConfig:
    """Where the images are and how they are fed."""

    root: str = "demo"  # a folder holding train/ (and val/), or "demo" for the built-in data
    train_dir: str = "train"
    val_dir: str = "val"  # when missing, val_fraction of train/ is held out
    classes: Optional[list[str]] = None  # class order; default: sorted folder names
    image_size: int = 32
    train_image_size: Optional[int] = None  # training crop side; null: image_size (torchvision's --train-crop-size)
    batch_size: int = 64  # per process
    drop_last: bool = True  # leave out each epoch's partial last step (false: fold it into the step before)
    sampler: Literal["plan", "distributed", "repeated_augment", "class_balanced", "shard_window"] = "plan"  # each epoch's order
    shard_window: int = 4  # sampler shard_window: consecutive shards whose samples are shuffled together
    ra_repeats: int = 3  # sampler repeated_augment: copies of each sample per epoch (timm's --aug-repeats)
    class_weights: Optional[dict[str, float]] = None  # sampler class_balanced: weight per class name (default 1)
    num_workers: int = 2
    bad_images: Literal["error", "skip"] = "error"
    val_fraction: float = 0.1
    mean: list[float] = field(default_factory=lambda: list(IMAGENET_MEAN))
    std: list[float] = field(default_factory=lambda: list(IMAGENET_STD))
    augment: list[str] = field(default_factory=lambda: ["flip"])  # flip, random_resized_crop; [] or none
    pin_memory: Optional[bool] = None  # default: on with CUDA
    persistent_workers: bool = True
    prefetch_factor: Optional[int] = None  # default: torch's (2) when num_workers > 0
    decoder: Literal["auto", "torchcodec", "torchvision", "pil"] = "auto"  # auto: TorchCodec where it imports, else torchvision.io
    decode_device: Literal["cpu", "cuda"] = "cpu"  # cuda: training JPEGs decoded by the batch on the GPU; workers read bytes
    reduced_decode: bool = True  # JPEGs drafted at 1/4-1/8 scale (1/2 too under PIL) when the crop / cache side needs no more pixels
    index_cache: bool = True  # remember folder listings in <cache root>/index; a restart lists only changed folders
    cache: Literal["none", "decoded"] = "none"  # decoded: one memory-mapped uint8 file per split and size
    cache_dir: Optional[str] = None  # where decoded caches live; default: <cache root>/decoded
    cache_size: Optional[int] = None  # stored side of training images when cropping randomly; ceil(1.15 x image_size)
    shard_cache_dir: Optional[str] = None  # a URL data.root's node-local shard cache; default: <cache root>/shards
    shard_cache_bytes: int = 100 * 2**30  # that cache's budget; least recently used shards are deleted past it
    rrc_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])  # random_resized_crop: area fraction range
    rrc_ratio: list[float] = field(default_factory=lambda: [0.75, 4 / 3])  # random_resized_crop: aspect ratio range
    interpolation: Literal["bilinear", "bicubic"] = "bilinear"  # every resize (antialiased)
    val_crop_pct: float = 1.0  # validation: shorter side to image_size / val_crop_pct, centre crop image_size
    random_erasing_p: float = 0.1  # data.augment random_erasing: the chance per image (torchvision's recipe: 0.1)
    max_image_pixels: int = 89_478_485  # a larger image is refused before it is decoded (PIL's default limit)
    mixup_alpha: float = 0.0  # MixUp's Beta(alpha, alpha) (torchvision's recipe: 0.2); 0: off
    cutmix_alpha: float = 0.0  # CutMix's Beta(alpha, alpha) (torchvision's recipe: 1.0); 0: off
    # a timm model's own image_size, interpolation, mean, std and val_crop_pct for every one of these
    # keys not set; auto: when model.weights is set (pretrained weights expect their statistics)
    from_model: Literal["auto", True, False] = "auto"

    def __post_init__(self) -> None:
        _check(8 <= self.image_size <= 8192, "data.image_size", self.image_size, "use 8 to 8192")
        _check(len(self.rrc_scale) == 2 and 0 < self.rrc_scale[0] <= self.rrc_scale[1] <= 1, "data.rrc_scale",
               self.rrc_scale, "give [min, max] area fractions with 0 < min <= max <= 1, e.g. [0.08, 1.0]")
        _check(len(self.rrc_ratio) == 2 and 0 < self.rrc_ratio[0] <= self.rrc_ratio[1], "data.rrc_ratio",
               self.rrc_ratio, "give [min, max] aspect ratios with 0 < min <= max, e.g. [0.75, 1.3333]")
        _check(0 < self.val_crop_pct <= 1, "data.val_crop_pct", self.val_crop_pct,
               "use a fraction in (0, 1], e.g. 0.875 (224 of 256)")
        _check(self.batch_size >= 1, "data.batch_size", self.batch_size, "use at least 1")
        _check(self.max_image_pixels >= 1, "data.max_image_pixels", self.max_image_pixels,
               "use a positive number of pixels (width x height), e.g. 89478485")
        _check(self.num_workers >= 0, "data.num_workers", self.num_workers, "use 0 or more")
        _check(0.0 <= self.val_fraction < 1.0, "data.val_fraction", self.val_fraction,
               "use a fraction in [0, 1)")
        _check(len(self.mean) == 3, "data.mean", self.mean, "give three numbers (R, G, B)")
        _check(len(self.std) == 3 and all(s > 0 for s in self.std), "data.std", self.std,
               "give three positive numbers (R, G, B)")
        for name in self.augment:
            if name not in AUGMENTATIONS and not name.startswith(TIMM_AUGMENT_PREFIXES):
                raise ConfigError(f"data.augment: unknown augmentation {name!r}; "
                                  f"choose from {', '.join(AUGMENTATIONS)}, a timm string (rand-m9-mstd0.5-inc1, "
                                  f"augmix-m5-w4-d2) or none{_hint(name, AUGMENTATIONS)}")
        policies = [a for a in self.augment if a in POLICIES or a.startswith(TIMM_AUGMENT_PREFIXES)]
        _check(len(policies) <= 1, "data.augment", self.augment,
               f"use at most one of {', '.join(POLICIES)} and timm's strings")
        # Beta(a, a) below 1e-3 puts all its mass at 0 and 1 (nothing mixes), and torch's sampler
        # fails on tiny values (1e-300): refused here rather than at the first mixed batch
        for key, alpha in (("data.mixup_alpha", self.mixup_alpha), ("data.cutmix_alpha", self.cutmix_alpha)):
            _check(alpha == 0 or alpha >= 1e-3, key, alpha, "use 0 (off) or a number from 0.001, e.g. 0.2 or 1.0")
        _check(0.0 <= self.random_erasing_p <= 1.0, "data.random_erasing_p", self.random_erasing_p,
               "use a probability in [0, 1]")
        if self.classes is not None:
            _check(len(self.classes) >= 2, "data.classes", self.classes, "name at least two classes")
            _check(len(set(self.classes)) == len(self.classes), "data.classes", self.classes,
                   "remove the repeated class names")
        _check(self.ra_repeats >= 1, "data.ra_repeats", self.ra_repeats, "use 1 or more, e.g. 3")
        _check(self.shard_window >= 1, "data.shard_window", self.shard_window, "use 1 or more shards, e.g. 4")
        _check(self.shard_cache_bytes >= 1, "data.shard_cache_bytes", self.shard_cache_bytes,
               "use a positive number of bytes, e.g. 107374182400 (100 GiB)")
        if self.class_weights is not None:
            _check(self.sampler == "class_balanced", "data.class_weights", self.class_weights,
                   "set data.sampler=class_balanced with it, or remove it")
            for name, w in self.class_weights.items():
                _check(w >= 0, f"data.class_weights.{name}", w, "use 0 or more (relative chance of the class)")
        _check(self.prefetch_factor is None or self.prefetch_factor >= 1, "data.prefetch_factor",
               self.prefetch_factor, "use at least 1, or null")
        _check(self.train_image_size is None or 8 <= self.train_image_size <= 8192, "data.train_image_size",
               self.train_image_size, "use 8 to 8192 (pixels), e.g. 176, or null (data.image_size)")
        _check(self.cache_size is None or self.cache_size >= self.train_size, "data.cache_size", self.cache_size,
               f"use at least the training side ({self.train_size}), or null")

    @property
    def train_size(self) -> int:
        """The side of training images (``train_image_size``, else ``image_size``); validation uses
        ``image_size``."""
        return self.train_image_size if self.train_image_size is not None else self.image_size

    def input_sides(self) -> dict[str, int]:
        """The square sides the model sees, by the key that sets each (training's first)."""
        key = "data.train_image_size" if self.train_image_size is not None else "data.image_size"
        return {key: self.train_size, "data.image_size": self.image_size}

    @property
    def val_resize(self) -> Optional[int]:
        """The shorter side validation images are resized to before the centre crop (None: image_size)."""
        return None if self.val_crop_pct == 1.0 else int(self.image_size / self.val_crop_pct)

    @property
    def train_cache_size(self) -> int:
        """The side the decoded cache stores training images at: larger than ``image_size`` only
        when random_resized_crop crops from it (so the crop is not taken from a downscaled picture)."""
        if "random_resized_crop" not in self.augment:
            return self.train_size
        return self.cache_size if self.cache_size is not None else math.ceil(self.train_size * 1.15)


@dataclass(frozen=True)
class ModelConfig:
    name: str = "resnet18"  # torchvision builder, timm/NAME, tiny_cnn / tiny_cnn_bn, or package.module:callable
    init_from: Optional[str] = None  # weights-only start (fine-tuning)
    weights: Optional[str] = None  # torchvision pretrained weights (DEFAULT, IMAGENET1K_V1, ...) from torch's hub cache
    sync_batchnorm: bool = False
    drop_rate: float = 0.0  # dropout before the classifier (timm's --drop; torchvision's dropout); 0: the model's default
    drop_path_rate: float = 0.0  # stochastic depth (timm's --drop-path; torchvision's stochastic_depth_prob); 0: the model's default

    def __post_init__(self) -> None:
        for key, rate in (("model.drop_rate", self.drop_rate), ("model.drop_path_rate", self.drop_path_rate)):
            _check(0.0 <= rate < 1.0, key, rate, "use a probability in [0, 1), e.g. 0.1")
        _check(not (self.init_from and self.weights), "model.weights", self.weights,
               "give model.weights or model.init_from, not both")


@dataclass(frozen=True)
class OptimConfig:
    name: Literal["sgd", "adamw", "lamb"] = "adamw"  # lamb: timm's LAMB with its defaults (needs timm)
    lr: float = 0.002  # not rescaled with the global batch: set it for yours
    momentum: float = 0.9  # sgd only
    weight_decay: float = 0.05
    nesterov: bool = False  # sgd only: Nesterov momentum
    lr_scale: Literal["none", "linear"] = "none"  # linear: lr x global batch / 256 (Goyal et al.)
    norm_weight_decay: Optional[float] = None  # null: no decay on biases and norm weights; a number: that decay
    #                                            on normalisation layers, weight_decay on everything else

    def __post_init__(self) -> None:
        _check(0 < self.lr <= MAX_LR, "optim.lr", self.lr,
               f"use a positive, finite learning rate (at most {MAX_LR:g}), e.g. 0.1 (sgd) or 0.001 (adamw)")
        _check(self.momentum >= 0, "optim.momentum", self.momentum, "use 0 or more")
        _check(self.weight_decay >= 0, "optim.weight_decay", self.weight_decay, "use 0 or more")
        _check(self.norm_weight_decay is None or self.norm_weight_decay >= 0, "optim.norm_weight_decay",
               self.norm_weight_decay, "use 0 or more, or null")
        _check(not self.nesterov or (self.name == "sgd" and self.momentum > 0), "optim.nesterov", self.nesterov,
               "Nesterov momentum needs optim.name=sgd and optim.momentum > 0")


@dataclass(frozen=True)
class SchedConfig:
    name: Literal["cosine", "step", "none"] = "cosine"
    warmup_epochs: float = 0.5
    warmup_start_factor: float = 0.0  # the warmup starts at lr x this (torchvision's --lr-warmup-decay, 0.01 in its recipe)
    step_epochs: int = 30  # step: multiply the lr by gamma every step_epochs
    gamma: float = 0.1
    min_lr: float = 0.0  # cosine floor

    def __post_init__(self) -> None:
        _check(self.warmup_epochs >= 0, "sched.warmup_epochs", self.warmup_epochs, "use 0 or more")
        _check(0 <= self.warmup_start_factor <= 1, "sched.warmup_start_factor", self.warmup_start_factor,
               "use a factor from 0 (warm up from lr 0) to 1 (no warmup), e.g. 0.01")
        _check(self.step_epochs >= 1, "sched.step_epochs", self.step_epochs, "use at least 1")
        _check(0 < self.gamma <= 1, "sched.gamma", self.gamma, "use a factor in (0, 1], e.g. 0.1")
        _check(self.min_lr >= 0, "sched.min_lr", self.min_lr, "use 0 or a positive learning rate below optim.lr")


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 6  # total epochs of the run, numbered from 0
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    grad_accum_steps: int = 1
    clip_grad_norm: Optional[float] = None
    channels_last: bool = False
    compile: bool = False
    # true: deterministic kernels only (an op without one is an error naming it), cuBLAS's fixed
    # workspace, no cudnn.benchmark: what exact resume needs on GPU; warn: the same, but such an op
    # only warns (and that run is not exact); false: the fastest kernels
    deterministic: Literal[False, True, "warn"] = False
    tf32: bool = True  # on GPUs: fp32 matmuls and convolutions on TF32 tensor cores (Ampere and newer)
    log_every_steps: int = 50
    stop_on_nonfinite: bool = True  # a nan/inf training loss stops the run, keeping the last good checkpoint
    label_smoothing: float = 0.0  # training loss only; validation loss stays plain cross-entropy
    loss: Literal["ce", "bce"] = "ce"  # bce: timm's BinaryCrossEntropy (its --bce-loss), smoothing = label_smoothing
    bce_target_threshold: Optional[float] = None  # bce: targets above it become 1, the rest 0 (timm's --bce-target-thresh)
    ema_decay: Optional[float] = None  # an EMA of the weights (e.g. 0.9998), validated each epoch; null: off
    ema_every_steps: int = 1  # update the EMA every N optimizer steps (torchvision's --model-ema-steps)
    # torchvision: ema_decay is its --model-ema-decay, rescaled to 1 - (1 - decay) x global batch x
    # ema_every_steps / train.epochs, and the EMA copies the weights during the warmup epochs
    ema_decay_adjust: Literal["none", "torchvision"] = "none"
    val_tta: Literal["none", "flip"] = "none"  # flip: validate on the mean logits of each image and its mirror

    def __post_init__(self) -> None:
        _check(self.epochs >= 1, "train.epochs", self.epochs, "use at least 1")
        _check(self.grad_accum_steps >= 1, "train.grad_accum_steps", self.grad_accum_steps,
               "use at least 1")
        _check(self.clip_grad_norm is None or self.clip_grad_norm > 0, "train.clip_grad_norm",
               self.clip_grad_norm, "use a positive number, or null")
        _check(self.log_every_steps >= 1, "train.log_every_steps", self.log_every_steps,
               "use at least 1")
        _check(self.ema_decay is None or 0.0 < self.ema_decay < 1.0, "train.ema_decay", self.ema_decay,
               "use a number in (0, 1), e.g. 0.9998, or null")
        _check(self.ema_every_steps >= 1, "train.ema_every_steps", self.ema_every_steps,
               "use at least 1 (torchvision's recipe: 32)")
        _check(0.0 <= self.label_smoothing < 1.0, "train.label_smoothing", self.label_smoothing,
               "use a number in [0, 1), e.g. 0.1")
        if self.bce_target_threshold is not None:
            _check(self.loss == "bce", "train.bce_target_threshold", self.bce_target_threshold,
                   "set train.loss=bce with it, or remove it")
            _check(0.0 <= self.bce_target_threshold < 1.0, "train.bce_target_threshold", self.bce_target_threshold,
                   "use a number in [0, 1), e.g. 0.2 (timm's recipes), or null")


@dataclass(frozen=True)
class DistConfig:
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    mode: Literal["auto", "ddp", "dp", "single"] = "auto"
    timeout_s: float = 300.0  # a collective that waits longer fails the job (from the first optimizer step on)
    init_timeout_s: float = 3600.0  # the same until then: start-up, data scan, verification, cache build

    def __post_init__(self) -> None:
        _check(self.timeout_s > 0, "dist.timeout_s", self.timeout_s, "use a positive number of seconds")
        _check(self.init_timeout_s > 0, "dist.init_timeout_s", self.init_timeout_s,
               "use a positive number of seconds")


@dataclass(frozen=True)
class CheckpointConfig:
    every_epochs: int = 1  # 0: no per-epoch saves
    every_steps: int = 0  # 0: no mid-epoch saves
    keep_last: int = 3  # epoch_NNNN.pt files kept
    keep_best: int = 1  # best.pt; more: also best_epoch_NNNN.pt for each of the K best epochs by monitor
    monitor: str = "val_loss"
    mode: Literal["min", "max"] = "min"
    async_: bool = field(default=True, metadata={"key": "async"})  # write in a background thread
    on_data_change: Literal["restart_epoch", "error"] = "restart_epoch"  # training set changed under a mid-epoch resume

    def __post_init__(self) -> None:
        _check(self.every_epochs >= 0, "checkpoint.every_epochs", self.every_epochs, "use 0 or more")
        _check(self.every_steps >= 0, "checkpoint.every_steps", self.every_steps, "use 0 or more")
        _check(self.keep_last >= 0, "checkpoint.keep_last", self.keep_last, "use 0 or more")
        _check(self.keep_best >= 1, "checkpoint.keep_best", self.keep_best, "use 1 or more")
        _check(self.monitor in MONITORABLE_METRICS, "checkpoint.monitor", self.monitor,
               f"choose one of {', '.join(MONITORABLE_METRICS)}")


def signal_name(name: str) -> str:
    """A signal as ``preempt.signals`` may spell it (``usr1``, ``SIGUSR1``) -> ``SIGUSR1``."""
    key = name.upper()
    return key if key.startswith("SIG") else f"SIG{key}"


@dataclass(frozen=True)
class PreemptConfig:
    signals: list[str] = field(default_factory=lambda: ["SIGUSR1", "SIGTERM", "SIGINT"])
    check_every_steps: int = 1  # how often the ranks agree on a stop (one tiny CPU all-reduce)
    orphan_deadline_s: float = 120.0  # a worker whose torchrun agent died: time to stop at a checkpoint

    def __post_init__(self) -> None:
        for name in self.signals:
            key = signal_name(name)
            if key not in signal.Signals.__members__ or key in ("SIGKILL", "SIGSTOP"):
                raise ConfigError(f"preempt.signals: {name!r} is not a signal that can be caught; "
                                  f"use names such as SIGUSR1, SIGTERM, SIGINT")
        _check(self.check_every_steps >= 1, "preempt.check_every_steps", self.check_every_steps, "use at least 1")
        _check(self.orphan_deadline_s > 0, "preempt.orphan_deadline_s", self.orphan_deadline_s,
               "use a positive number of seconds")


@dataclass(frozen=True)
class LogConfig:
    progress: Literal["auto", "on", "off"] = "auto"  # auto: a bar when stderr is a terminal
    tensorboard: bool = False  # scalars in <output_dir>/tensorboard (needs the tensorboard package)
    wandb: bool = False  # Weights & Biases (pip install -e '.[wandb]'): the config once, each epoch's row
    wandb_project: str = "ddp_trainer"
    wandb_name: Optional[str] = None  # the run's name; null: output_dir's folder name
    wandb_tags: list[str] = field(default_factory=list)
    wandb_mode: Literal["offline", "online"] = "offline"  # offline: files in <output_dir>/wandb, `wandb sync` later
    mlflow: bool = False  # MLflow (pip install -e '.[mlflow]'): the config once, each epoch's row
    mlflow_uri: Optional[str] = None  # tracking URI; null: MLFLOW_TRACKING_URI, else the folder ./mlruns
    mlflow_experiment: str = "ddp_trainer"


@dataclass(frozen=True)
class DebugConfig:
    steps_per_epoch: int = 5
    epochs: int = 1

    def __post_init__(self) -> None:
        _check(self.steps_per_epoch >= 1, "debug.steps_per_epoch", self.steps_per_epoch, "use at least 1")
        _check(self.epochs >= 1, "debug.epochs", self.epochs, "use at least 1")


@dataclass(frozen=True)
class Config:
    output_dir: str = "runs/default"
    seed: int = 0
    resume: str = "auto"  # auto | none | PATH
    overwrite: bool = False  # allow resume=none over an output folder holding checkpoints
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sched: SchedConfig = field(default_factory=SchedConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    preempt: PreemptConfig = field(default_factory=PreemptConfig)
    log: LogConfig = field(default_factory=LogConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)

    def __post_init__(self) -> None:
        _check(bool(str(self.output_dir).strip()), "output_dir", self.output_dir,
               "name a folder for the run, e.g. output_dir=runs/exp1")
        _check(0 <= self.seed < 2 ** 63, "seed", self.seed, "use a whole number from 0 to 2**63 - 1")
        _check(not self.checkpoint.monitor.endswith("_ema") or self.train.ema_decay is not None,
               "checkpoint.monitor", self.checkpoint.monitor, "set train.ema_decay too (the EMA is off)")
        _check(self.sched.min_lr <= self.optim.lr or self.sched.name != "cosine", "sched.min_lr", self.sched.min_lr,
               f"use a floor of at most optim.lr={self.optim.lr:g} (the cosine decays from optim.lr to sched.min_lr)")

    # the data.* values data.from_model took from the model, ((key, value), ...): not a key itself
    # (a stored config holds the values, so a resume or an evaluation takes nothing again)
    taken_from_model: typing.ClassVar[tuple[tuple[str, Any], ...]] = ()

    def to_dict(self) -> dict[str, Any]:
        return _as_dict(self)

    def replace(self, **overrides: Any) -> "Config":
        """A copy with dotted-key overrides applied (``{"train.epochs": 3}``), validated again; the
        values taken from the model stay recorded where the overrides do not replace them."""
        new = from_dict(_merge(self.to_dict(), _nest(overrides, source="replace")))
        object.__setattr__(new, "taken_from_model", tuple((k, v) for k, v in self.taken_from_model
                                                          if f"data.{k}" not in overrides))
        return new


def _key(f: dataclasses.Field) -> str:
    """The config key of a field (``async_`` is spelled ``async`` in files and overrides)."""
    return f.metadata.get("key", f.name)


def _as_dict(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {_key(f): _as_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, list):
        return [_as_dict(v) for v in obj]
    return obj


def _check(ok: bool, key: str, value: Any, fix: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: bad value {value!r}; {fix}")


def _hint(name: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _sections() -> dict[str, type]:
    return {f.name: f.default_factory for f in dataclasses.fields(Config)  # type: ignore[misc]
            if f.default_factory is not dataclasses.MISSING}


def valid_keys() -> list[str]:
    """Every dotted key the config accepts."""
    keys = []
    for f in dataclasses.fields(Config):
        if dataclasses.is_dataclass(_field_type(Config, f.name)):
            keys += [f"{f.name}.{_key(g)}" for g in dataclasses.fields(_field_type(Config, f.name))]
        else:
            keys.append(f.name)
    return keys


def _field_type(cls: type, name: str) -> Any:
    return typing.get_type_hints(cls)[name]


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against the annotation ``tp``; ints are accepted for floats."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(key, value, inner[0])
    if origin is Literal:
        if isinstance(value, bool) and "on" in args and "off" in args:
            value = "on" if value else "off"  # YAML 1.1 reads on/off as booleans
        if value not in args:
            raise ConfigError(f"{key}: bad value {value!r}; choose one of "
                              f"{', '.join(map(str, args))}{_hint(str(value), [str(a) for a in args])}")
        return value
    if origin is dict:
        _, value_tp = args
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping such as {{a: 1, b: 2}}, got {value!r}")
        return {str(k): _coerce(f"{key}.{k}", v, value_tp) for k, v in value.items()}
    if origin is list:
        (item_tp,) = args
        if key == "data.augment" and value in (None, "none", ["none"]):
            return []  # "none" spelled any of the natural ways
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list such as [a, b], got {value!r}")
        return [_coerce(f"{key}[{i}]", v, item_tp) for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected a whole number, got {value!r}")
    if tp is float:
        number: float | None = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(number):
            raise ConfigError(f"{key}: bad value {value!r}; use a finite number")
        return number
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise TypeError(f"unsupported config annotation {tp!r} for {key}")  # a bug in this module


def _build(cls: type, values: Mapping[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {_key(f): f.name for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        if key not in names:
            candidates = valid_keys() + [f.name for f in dataclasses.fields(Config)]
            close = difflib.get_close_matches(dotted, candidates, n=1, cutoff=0.5)
            fix = f"did you mean {close[0]!r}?" if close else "see README for the valid keys"
            raise ConfigError(f"unknown config key {dotted!r}; {fix}")
        name = names[key]
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, Mapping):
                raise ConfigError(f"{dotted}: expected a section of keys, got {value!r}")
            kwargs[name] = _build(tp, value, f"{dotted}.")
        else:
            kwargs[name] = _coerce(dotted, value, tp)
    return cls(**kwargs)


def from_dict(values: Mapping[str, Any]) -> Config:
    """Build and validate a :class:`Config` from a nested mapping (missing keys take defaults, or
    the model's own data settings: :func:`_with_model_data`)."""
    return _with_model_data(_build(Config, values, ""), values)


def _with_model_data(cfg: Config, values: Mapping[str, Any]) -> Config:
    """``cfg`` with a timm model's data settings in every ``data.*`` key that ``values`` (what the
    user gave) does not set, when ``data.from_model`` is on (``auto``: with ``model.weights``),
    recorded in ``taken_from_model``. ``true`` for a model other than ``timm/NAME`` is refused."""
    wanted = cfg.data.from_model
    if wanted is False or (wanted == "auto" and not cfg.model.weights):
        return cfg
    if not cfg.model.name.startswith("timm/"):
        _check(wanted == "auto", "data.from_model", wanted,
               "only timm/NAME models carry their data settings; set data.image_size, data.mean, ... yourself "
               "and data.from_model=auto")
        return cfg
    # the model's settings need torch and timm, which a config of any other model never loads
    from .models.data_settings import data_settings
    given = values.get("data") or {}
    taken = {k: v for k, v in data_settings(cfg.model.name).items() if k not in given}
    if not taken:
        return cfg
    new = _build(Config, _merge(dict(values), {"data": taken}), "")
    object.__setattr__(new, "taken_from_model", tuple(taken.items()))
    return new


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(dict(out[key]), value)
        else:
            out[key] = value
    return out


def _nest(flat: Mapping[str, Any], source: str) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for dotted, value in flat.items():
        parts = dotted.split(".")
        if not all(parts):
            raise ConfigError(f"{source}: bad key {dotted!r}; use section.key=value, e.g. train.epochs=5")
        node = nested
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{source}: {dotted!r} sets a key inside a value")
        node[parts[-1]] = value
    return nested


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """``["train.epochs=5", "data.classes=[cat,dog]"]`` -> ``{"train.epochs": 5, ...}``.

    Values are parsed as YAML, so numbers, booleans, null and lists need no quoting.
    """
    flat: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"bad override {item!r}; write key=value, e.g. train.epochs=5")
        try:
            value = yaml.safe_load(text) if text != "" else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {key}: cannot parse {text!r} as a value ({exc.__class__.__name__}); "
                              f"quote it") from None
        flat[key.strip()] = value
    return flat


class _DuplicateKey(Exception):
    pass


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load, but a key given twice in one mapping is an error (YAML keeps the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise _DuplicateKey(f"key {key!r} appears twice (lines {seen[key]} and {key_node.start_mark.line + 1})")
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """The mapping in a YAML config file, or a ConfigError naming the file."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file {str(p)!r} not found; check the --config path") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {str(p)!r} is not UTF-8 text (byte {exc.start}); save it as UTF-8") from None
    except OSError as exc:
        raise ConfigError(f"config file {str(p)!r} cannot be read: {exc.strerror}") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except _DuplicateKey as exc:
        raise ConfigError(f"config file {str(p)!r}: {exc}; keep one") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"config file {str(p)!r} is not valid YAML{where}; fix the syntax") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(p)!r} must hold a mapping of keys, not {type(data).__name__}")
    return data


def apply_overrides(values: Mapping[str, Any], overrides: Sequence[str]) -> Config:
    """``values`` (a nested mapping, e.g. a checkpoint's stored config) with command-line
    ``key=value`` overrides applied on top, validated."""
    return from_dict(_merge(dict(values), _nest(parse_overrides(overrides), source="command line")))


def build(source: str | Path | Mapping[str, Any] | Config | None = None,
          overrides: Mapping[str, Any] | None = None) -> Config:
    """A config from Python values (the Python API): ``source`` a YAML file, a nested mapping or a
    Config (None: the defaults), then ``overrides``: dotted keys (``{"train.epochs": 5}``), whole
    sections as mappings (``train={"epochs": 5}``) or top-level keys (``output_dir="runs/x"``).
    Validated as the command line's are; errors name the key."""
    if isinstance(source, Config):
        values: dict[str, Any] = source.to_dict()
    elif isinstance(source, Mapping):
        values = dict(source)
    elif source is not None:
        values = read_yaml(source)
        try:
            from_dict(values)  # report the file's own errors with its name
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc.message}") from None
    else:
        values = {}
    sections, flat = {}, {}
    for key, value in (overrides or {}).items():
        if "." not in key and isinstance(value, Mapping):
            sections[key] = value
        else:
            flat[key] = value
    return from_dict(_merge(_merge(values, sections), _nest(flat, source="overrides")))


def load(config_file: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Defaults < YAML file < command-line overrides, validated."""
    values: dict[str, Any] = {}
    if config_file is not None:
        try:
            values = read_yaml(config_file)
            from_dict(values)  # report file errors with the file's name
        except ConfigError as exc:
            if str(config_file) in exc.message:
                raise
            raise ConfigError(f"{config_file}: {exc.message}") from None
    return apply_overrides(values, overrides)


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """A nested config dict as dotted keys (``{"train.epochs": 6, ...}``)."""
    if not isinstance(d, dict):
        return {prefix[:-1]: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(flatten(v, f"{prefix}{k}."))
    return out


def config_differences(old: dict[str, Any] | None, new: dict[str, Any]) -> list[str]:
    """``key: old -> new`` for every key whose value changed (resume diagnostics)."""
    if not old:
        return []
    a, b = flatten(old), flatten(new)
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def dump(config: Config) -> str:
    """The config as YAML, in section order (what is written to <output_dir>/config.yaml)."""
    return yaml.safe_dump(config.to_dict(), sort_keys=False)
