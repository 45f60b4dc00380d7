"""The pieces of a run's state that a checkpoint holds, each saving and restoring itself (see
:mod:`ddp_trainer.checkpoint.registry`). The schedule, the EMA and the best ranking are components
too, in their own modules."""
from __future__ import annotations

import logging
from typing import Any, Mapping

import torch
from torch import nn

from ..checkpoint.format import meta_entries, optimizer_param_names, rng_fits
from ..checkpoint.registry import LoadContext, SaveContext
from ..checkpoint.weights import canonical_tensors, load_weights
from ..config import Config, OptimConfig
from ..errors import CheckpointError
from ..launch.dist import Dist
from ..trackers import QueuedTracker
from .engine import RunningLoss
from .optim import carry_over_state, optimizer_family
from .optim_state import (
    StateMismatch,
    file_optim_config,
    load_by_name,
    parameter_names,
    positional_names,
    setting_changes,
    state_with_names,
)
from .state import TrainState

log = logging.getLogger("ddp_trainer")


class RunMeta:
    """What wrote the file and how (flat; never restored: a resume checks it instead)."""

    def __init__(self, cfg: Config, class_to_idx: Mapping[str, int], world_size: int) -> None:
        self.entries = meta_entries(monitor=cfg.checkpoint.monitor, class_to_idx=class_to_idx,
                                    model_name=cfg.model.name, config=cfg.to_dict(), world_size=world_size)

    def save(self, ctx: SaveContext) -> dict[str, Any]:
        return self.entries


class ModelWeights:
    """The model's canonical state dict (the plain module, whatever wraps it later)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def save(self, ctx: SaveContext) -> dict[str, torch.Tensor]:
        return canonical_tensors(self.model)  # live tensors: the writer makes the one CPU copy

    def load(self, sd: dict[str, torch.Tensor], ctx: LoadContext) -> None:
        load_weights(self.model, sd, source=f"checkpoint '{ctx.checkpoint.path}'")


class OptimizerState:
    """The optimizer's per-parameter state, kept and matched by parameter name (see
    :mod:`.optim_state`); its hyperparameters always come from the config (a change is logged).

    Our own files: restored by name (earlier files without names: by position, through the grouping
    of their own config, shapes checked); a state that does not fit is refused (CheckpointError)
    unless ``optim.name`` changed, where the moments start fresh (one line). Another trainer's
    file: its state carried into our groups when its type matches and its parameters map (count and
    shapes), else skipped with a warning."""

    def __init__(self, optimizer: torch.optim.Optimizer, cfg: OptimConfig, model: nn.Module) -> None:
        """``model``: the unwrapped model the optimizer's parameters belong to (canonical names)."""
        self.optimizer, self.cfg, self.model = optimizer, cfg, model
        self.names = parameter_names(model)

    def save(self, ctx: SaveContext) -> dict[str, Any]:
        return state_with_names(self.optimizer, self.names)

    def load(self, sd: dict[str, Any], ctx: LoadContext) -> None:
        ckpt = ctx.checkpoint
        if not ckpt.ours:
            self._carry_foreign(sd, ckpt.kind)
            return
        old_name = (ckpt.config or {}).get("optim", {}).get("name") or optimizer_family(sd) or self.cfg.name
        if old_name != self.cfg.name:
            log.info("resume: optim.name changed (%s -> %s): the optimizer's moments start fresh", old_name,
                     self.cfg.name)
            return
        try:
            saved_names = optimizer_param_names(sd) or positional_names(
                sd, self.model, file_optim_config(ckpt.config, self.cfg))
            regrouped = load_by_name(self.optimizer, self.names, sd, saved_names)
        except (ValueError, KeyError, TypeError, RuntimeError) as exc:
            what = str(exc) if isinstance(exc, StateMismatch) else f"it cannot be loaded: {type(exc).__name__}: {exc}"
            raise CheckpointError(
                f"resume: the optimizer state in checkpoint '{ckpt.path}' does not fit this run's {self.cfg.name} "
                f"optimizer ({what}); resume with the model as it was trained (the same parameters trainable), or "
                f"keep only its weights with model.init_from={ckpt.path} (the optimizer starts new)",
                shared=True) from None
        if regrouped:
            log.info("resume: the optimizer's state regrouped by parameter name (the parameter groups changed: "
                     "optim.norm_weight_decay)")
        changes = setting_changes(sd["param_groups"], self.optimizer.state_dict()["param_groups"])
        if changes:
            log.info("resume: optimizer settings from the config, not the checkpoint: %s", ", ".join(changes))

    def _carry_foreign(self, sd: dict[str, Any], kind: str) -> None:
        family = optimizer_family(sd)
        name = self.cfg.name
        carried = carry_over_state(sd, self.optimizer, list(self.model.parameters())) if family == name else None
        if carried is None:
            why = (f"it is {family or 'of an unknown type'}, optim.name={name}" if family != name
                   else "its parameters do not map onto the model's (count or shapes differ)")
            log.warning("resume: optimizer state of the %s file skipped (%s)", kind, why)
        else:
            log.info("resume: %s optimizer state of the %s file carried over for %d parameter(s); "
                     "hyperparameters from the config", name, kind, carried)


class ScalerState:
    """fp16's gradient scaler (None in the file when it is off)."""

    def __init__(self, scaler: torch.amp.GradScaler) -> None:
        self.scaler = scaler

    def save(self, ctx: SaveContext) -> dict[str, Any] | None:
        return self.scaler.state_dict() if self.scaler.is_enabled() else None

    def load(self, sd: dict[str, Any], ctx: LoadContext) -> None:
        if self.scaler.is_enabled():
            self.scaler.load_state_dict(sd)


class LoopState:
    """The loop counters (flat entries; see :class:`TrainState`), with the epoch's training-loss sums
    over every rank (a collective: saved on every rank)."""

    def __init__(self, state: TrainState, running: RunningLoss, dist: Dist) -> None:
        self.state, self.running, self.dist = state, running, dist

    def epoch_sums(self) -> tuple[float, float]:
        """The epoch's training-loss sum and count so far, over every rank (a collective)."""
        sums = torch.stack([self.running.loss_sum, self.running.count])
        self.dist.all_reduce_sum(sums)
        return self.state.loss_sum + sums[0].item(), self.state.loss_count + sums[1].item()

    def save(self, ctx: SaveContext) -> dict[str, Any]:
        loss_sum, loss_count = self.epoch_sums()
        return self.state.entries(epoch_complete=ctx.epoch_complete, loss_sum=loss_sum, loss_count=loss_count)

    def load(self, entries: Mapping[str, Any], ctx: LoadContext) -> None:
        self.state.restore(entries)


class TrainingSetCheck:
    """The training index's count and hash. A mid-epoch resume continues the epoch's order by
    position: only valid on the same training set. Otherwise the epoch's order restarts (or the
    resume is refused: ``checkpoint.on_data_change``). Restored after the loop state (needs position)."""

    def __init__(self, fingerprint: dict[str, Any], state: TrainState, on_change: str) -> None:
        self.fingerprint, self.state, self.on_change = fingerprint, state, on_change

    def save(self, ctx: SaveContext) -> dict[str, Any]:
        return self.fingerprint

    def load(self, saved: dict[str, Any], ctx: LoadContext) -> None:
        state = self.state
        if state.position == 0 or saved == self.fingerprint:
            return
        what = (f"the training set changed since the checkpoint ({saved.get('count')} -> "
                f"{self.fingerprint['count']} images, or other files)")
        if self.on_change == "error":
            raise CheckpointError(f"resume: {what}, so the rest of epoch {state.epoch} cannot be continued "
                                  f"by position; restore the data, or set checkpoint.on_data_change=restart_epoch",
                                  shared=True)
        log.warning("resume: %s; epoch %d restarts its order from the beginning (checkpoint.on_data_change="
                    "restart_epoch)", what, state.epoch)
        state.position, state.loss_sum, state.loss_count = 0, 0.0, 0.0


class SamplerCheck:
    """Entry ``train_order``: the sampler a mid-epoch position belongs to (``data.sampler`` and what
    its order depends on: ``ra_repeats``, the class weights, ``distributed``'s world size). A resume
    under another one restarts the epoch's order with a warning (a file without the entry was
    written by the ``plan`` sampler; one written before ``class_balanced``'s identity became a digest of
    its probabilities cannot tell whether the class weights changed, so it counts as another sampler).
    Restored after the loop state (needs position)."""

    def __init__(self, identity: dict[str, Any], state: TrainState) -> None:
        self.identity, self.state = identity, state

    def save(self, ctx: SaveContext) -> dict[str, Any]:
        return {"train_order": self.identity}

    def load(self, entries: Mapping[str, Any], ctx: LoadContext) -> None:
        saved = entries.get("train_order") or {"sampler": "plan"}
        state = self.state
        if state.position == 0 or saved == self.identity:
            return
        if "probabilities" in saved:
            # written before the digest (a sum of rounded probabilities, blind to a swap of two
            # classes' weights): it cannot tell whether the weights changed, so it counts as changed
            change = "class_balanced's class weights: unknown in a checkpoint written by an older version"
        else:
            change = ", ".join(f"{k} {saved.get(k)} -> {self.identity.get(k)}"
                               for k in sorted(set(saved) | set(self.identity)) if saved.get(k) != self.identity.get(k))
        log.warning("resume: the epoch's order was drawn differently when the checkpoint was written (%s), so "
                    "its position (%d) means other samples now; epoch %d restarts its order from the beginning",
                    change, state.position, state.epoch)
        state.position, state.loss_sum, state.loss_count = 0, 0.0, 0.0


class TrackerRuns:
    """The experiment trackers' run ids (entry ``trackers``: ``{"wandb": id, "mlflow": id}``), so that
    a resumed or requeued run continues the same tracker runs. Registered when a tracker is on."""

    def __init__(self) -> None:
        self.resumed: dict[str, str] = {}  # from the checkpoint
        self.trackers: list[QueuedTracker] = []  # started after the restore (global rank 0)

    def save(self, ctx: SaveContext) -> dict[str, str]:
        return {**self.resumed, **{t.name: t.run_id for t in self.trackers if t.run_id}}

    def load(self, ids: dict[str, str], ctx: LoadContext) -> None:
        self.resumed = dict(ids)


class RngState:
    """Every rank's random generators (flat entry ``rng``: one state per rank, gathered to rank 0):
    the CPU's, ``cuda``: the GPU the rank drives, and with DataParallel (one process driving every
    GPU, each replica drawing from its own GPU's generator) ``cuda_devices``: one per GPU.
    A file whose states do not fit this world size (or has none) reseeds each rank instead, from
    the seed, its rank and the step, so that ranks still draw different numbers."""

    def __init__(self, dist: Dist, seed: int, gpus: list[int]) -> None:
        """``gpus``: the indexes of the GPUs this process drives (empty on the CPU)."""
        self.dist, self.seed, self.gpus = dist, seed, gpus

    def _mine(self) -> dict[str, Any]:
        state: dict[str, Any] = {"torch": torch.get_rng_state()}
        if self.gpus:
            state["cuda"] = torch.cuda.get_rng_state(self.gpus[0])
        if len(self.gpus) > 1:
            state["cuda_devices"] = [torch.cuda.get_rng_state(i) for i in self.gpus]
        return state

    def save(self, ctx: SaveContext) -> dict[str, Any]:
        return {"rng": self.dist.all_gather_object(self._mine())}

    def load(self, entries: Mapping[str, Any], ctx: LoadContext) -> None:
        if not rng_fits(entries, ctx.world_size):
            torch.manual_seed(self.seed + 1000 * ctx.rank + int(entries.get("step") or 0))
            return
        mine = entries["rng"][ctx.rank]
        torch.set_rng_state(mine["torch"])
        every = mine.get("cuda_devices")
        if every is not None and len(every) == len(self.gpus):
            for i, state in zip(self.gpus, every):
                torch.cuda.set_rng_state(state, i)
        elif mine.get("cuda") is not None and self.gpus:
            torch.cuda.set_rng_state(mine["cuda"], self.gpus[0])
