"""Where a run starts from: the checkpoint it resumes (``resume``), or the weights it starts with
(``model.init_from`` / ``model.weights``). Read on rank 0 only; the caller broadcasts the result."""
from __future__ import annotations

import logging
from pathlib import Path

from torch import nn

from .. import pretrained
from ..checkpoint.format import Checkpoint
from ..checkpoint.reader import read_checkpoint, resume_candidates
from ..checkpoint.weights import load_weights
from ..config import Config, config_differences
from ..errors import CheckpointError
from ..models import classifier_head

log = logging.getLogger("ddp_trainer")


def find_resume(cfg: Config, checkpoints: Path, class_to_idx: dict[str, int], trust: bool) -> Checkpoint | None:
    """The checkpoint to resume from (validated against the config and the data), or None.
    ``resume=auto`` tries the folder's files newest first, skipping unusable ones with a warning."""
    if cfg.resume == "none":
        return None
    if cfg.resume != "auto":
        found = read_checkpoint(cfg.resume, trust)
    else:
        found = None
        skipped = []
        for path in resume_candidates(checkpoints):
            try:
                found = read_checkpoint(path, trust)
                break
            except CheckpointError as exc:
                log.warning("resume: skipping %s: %s", path.name, exc.message)
                skipped.append(f"{path.name}: {exc.message}")
        if found is None and skipped:
            raise CheckpointError(
                f"resume=auto: output_dir '{checkpoints.parent}' holds checkpoints but none can be used "
                f"({'; '.join(skipped)}); nothing was changed. To start over there: resume=none overwrite=true")
        if found is None:
            return None
    check_compatible(found, cfg, class_to_idx)
    log.info("resume: from %s (%s format), epoch %d, %s", found.path, found.kind, found.start_epoch,
             f"{found.start_position} samples into the epoch" if found.start_position else "from its start")
    for line in config_differences(found.config, cfg.to_dict()):
        log.info("resume: config changed: %s", line)
    return found


def check_compatible(found: Checkpoint, cfg: Config, class_to_idx: dict[str, int]) -> None:
    """Refuse a checkpoint of other classes or another model than the run's."""
    if found.class_to_idx is not None and dict(found.class_to_idx) != class_to_idx:
        a, b = list(found.class_to_idx), list(class_to_idx)
        diff = (f"checkpoint has {len(a)} classes, data has {len(b)}" if len(a) != len(b)
                else f"first difference: {next((x, y) for x, y in zip(a, b) if x != y)}")
        raise CheckpointError(f"checkpoint '{found.path}' was trained on other classes than the data "
                              f"({diff}); use the same data.classes, or model.init_from=PATH to fine-tune")
    if found.model_name is not None and found.model_name != cfg.model.name:
        raise CheckpointError(f"checkpoint '{found.path}' holds model {found.model_name!r} but "
                              f"model.name={cfg.model.name!r}; set model.name={found.model_name}")


def read_initial_weights(cfg: Config, trust: bool) -> Checkpoint:
    """The weights to start from: ``model.init_from``, or ``model.weights`` (torchvision's from torch's
    hub cache; timm's from the Hugging Face hub cache, a folder or a file), naming the file in the log."""
    if cfg.model.weights:
        found = pretrained.require(cfg.model.name, cfg.model.weights)
        log.info("model.weights=%s: %s from %s", cfg.model.weights, found.weights, found.path)
        return read_checkpoint(found.path)
    assert cfg.model.init_from is not None
    return read_checkpoint(cfg.model.init_from, trust)


def apply_initial_weights(model: nn.Module, init: Checkpoint) -> None:
    """Load ``init``'s weights; the classifier head stays new when the class count differs."""
    head = classifier_head(model)
    sd = init.model
    skip: list[str] = []
    want = model.state_dict()
    if any(k in sd and tuple(sd[k].shape) != tuple(want[k].shape) for k in want if k.startswith(tuple(head))):
        skip = head
        log.info("model.init_from: class count differs; classifier head %s left new", ", ".join(head))
    load_weights(model, sd, skip_prefixes=skip, source=f"model.init_from '{init.path}'")
    log.info("model.init_from: weights loaded from %s", init.path)
