"""Where a run starts from: the checkpoint it resumes (``resume``), or the weights it starts with
(``model.init_from`` / ``model.weights``). Read on rank 0 only; the caller broadcasts the result."""
from __future__ import annotations

import logging
from pathlib import Path

from torch import nn

from .. import pretrained
from ..checkpoint.discovery import peek_state, resume_candidates, same_file_groups
from ..checkpoint.format import Checkpoint, resume_key
from ..checkpoint.reader import read_checkpoint
from ..checkpoint.weights import load_weights
from ..config import Config, config_differences
from ..errors import CheckpointError, CheckpointUnreadable
from ..models import classifier_head, timm_nets, timm_weights

log = logging.getLogger("ddp_trainer")


def find_resume(cfg: Config, checkpoints: Path, class_to_idx: dict[str, int], trust: bool) -> Checkpoint | None:
    """The checkpoint to resume from (validated against the config and the data), or None.

    ``resume=auto`` tries the folder's files by the state they hold, newest first (a file and its hard
    links once), skipping one whose content is unusable with a warning. A file the filesystem refuses
    (CheckpointUnreadable) stops the run before anything is written: resuming an older file would
    prune and overwrite the newer one."""
    if cfg.resume == "none":
        return None
    if cfg.resume != "auto":
        found = read_checkpoint(cfg.resume, trust)
    else:
        found = _newest_usable(checkpoints, trust)
        if found is None:
            return None
    check_compatible(found, cfg, class_to_idx)
    log.info("resume: from %s (%s format), epoch %d, %s", found.path, found.kind, found.start_epoch,
             f"{found.start_position} samples into the epoch" if found.start_position else "from its start")
    for line in config_differences(found.config, cfg.to_dict()):
        log.info("resume: config changed: %s", line)
    return found


def _newest_usable(checkpoints: Path, trust: bool) -> Checkpoint | None:
    """``resume=auto``'s pick (:func:`find_resume`); None for a folder without checkpoints."""
    skipped: list[str] = []

    def skip(names: list[Path], exc: CheckpointError) -> None:
        shown = names[0].name + (f" (also {', '.join(p.name for p in names[1:])})" if names[1:] else "")
        log.warning("resume: skipping %s: %s", shown, exc.message)
        skipped.append(f"{shown}: {exc.message}")

    ranked: list[tuple[tuple[int, int, int], list[Path], Checkpoint | None]] = []
    for names in same_file_groups(resume_candidates(checkpoints)):
        state = peek_state(names[0])
        read = None
        if state is None:  # the pickle alone does not tell: read it whole (a damaged file is skipped now)
            try:
                read = read_checkpoint(names[0], trust)
            except CheckpointUnreadable:
                raise
            except CheckpointError as exc:
                skip(names, exc)
                continue
            state = resume_key(read.entries)
        ranked.append((state, names, read))
    ranked.sort(key=lambda r: r[0], reverse=True)  # stable: on a tie, the folder's name order
    for _, names, read in ranked:
        try:
            return read or read_checkpoint(names[0], trust)
        except CheckpointUnreadable:
            raise
        except CheckpointError as exc:  # damaged content the peek did not see (a checksum, a cut tensor)
            skip(names, exc)
    if skipped:
        raise CheckpointError(
            f"resume=auto: output_dir '{checkpoints.parent}' holds checkpoints but none can be used "
            f"({'; '.join(skipped)}); nothing was changed. To start over there: resume=none overwrite=true")
    return None


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


def apply_initial_weights(model: nn.Module, init: Checkpoint, name: str = "") -> None:
    """Load ``init``'s weights into ``model`` (``model.name=name``); the classifier head stays new
    when the class count differs. A timm model's file of another image size is refused, saying how
    to resample it (:func:`~ddp_trainer.models.timm_weights.check_grid`)."""
    head = classifier_head(model)
    sd = init.model
    skip: list[str] = []
    want = model.state_dict()
    if timm_nets.is_timm(name):
        timm_weights.check_grid(name, sd, want, f"weights '{init.path}'")
    if any(k in sd and tuple(sd[k].shape) != tuple(want[k].shape) for k in want if k.startswith(tuple(head))):
        skip = head
        log.info("model.init_from: class count differs; classifier head %s left new", ", ".join(head))
    load_weights(model, sd, skip_prefixes=skip, source=f"model.init_from '{init.path}'")
    log.info("model.init_from: weights loaded from %s", init.path)
