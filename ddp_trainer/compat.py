"""Differences between the torch releases the project supports, each behind one function.

The project is tested on torch 2.11 (Python 3.12) and 2.14 (Python 3.11). When a newer public API
is missing on an older release, the older release's own function is used; a test fails loudly
when neither exists (``tests/test_compat.py``).
"""
from __future__ import annotations

import datetime
import inspect
import sys
from typing import Callable

import torch.distributed as tdist
from torch.distributed import distributed_c10d
from torch.nn.parallel import DistributedDataParallel


def group_timeout_setter() -> Callable[..., None]:
    """torch >= 2.14: ``torch.distributed.set_timeout``; older: ``distributed_c10d._set_pg_timeout``
    (the same operation under its earlier, private name; torchtitan falls back the same way)."""
    public = getattr(tdist, "set_timeout", None)
    if public is not None:
        return public
    private = getattr(distributed_c10d, "_set_pg_timeout", None)
    if private is None:
        raise RuntimeError(f"this torch ({getattr(tdist, '__file__', '?')}) has neither torch.distributed.set_timeout "
                           f"nor distributed_c10d._set_pg_timeout; the supported releases have one of them")
    return private


def ddp_no_forward_buffer_sync() -> dict[str, bool]:
    """DDP's keyword for "no broadcast of rank 0's buffers at every forward": torch >= 2.14 names it
    ``forward_sync_buffers`` (``broadcast_buffers`` warns there); older releases ``broadcast_buffers``.
    Both still sync the buffers once, when DDP is built."""
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters:
        return {"forward_sync_buffers": False}
    return {"broadcast_buffers": False}


def set_group_timeout(timeout: datetime.timedelta, group: tdist.ProcessGroup | None = None) -> None:
    """Set the timeout of the process group ``group`` (default: the default group) from now on."""
    group_timeout_setter()(timeout, group)


def is_compiled_module(module: object) -> bool:
    """``module`` is torch.compile's wrapper (``torch._dynamo.eval_frame.OptimizedModule``, which
    keeps the original as ``_orig_mod``): told by its class, never by an attribute's name, which a
    model's own child may have. torch has no public name for the class; nothing was compiled while
    torch._dynamo is not imported."""
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")
    wrapper = getattr(eval_frame, "OptimizedModule", None) if eval_frame is not None else None
    return wrapper is not None and isinstance(module, wrapper)


def ddp_inside(model: object) -> DistributedDataParallel | None:
    """The DDP wrapper ``model`` is, or holds as torch.compile's original; None when there is none."""
    if is_compiled_module(model):
        model = model._orig_mod  # type: ignore[attr-defined]
    return model if isinstance(model, DistributedDataParallel) else None


def rebuild_ddp_buckets(ddp: DistributedDataParallel) -> bool:
    """DDP's one-time rebuild of its gradient buckets, run now rather than inside the next forward:
    ``reducer._rebuild_buckets()`` (private: torch calls it at the start of every forward with grad
    enabled; it is due once, at the first forward after the first synced backward, and broadcasts
    rank 0's bucket order). True when it ran; then DDP's own call in the forward finds nothing to do.
    False when none was due (no collective)."""
    if getattr(ddp, "_has_rebuilt_buckets", None) is None or not hasattr(ddp.reducer, "_rebuild_buckets"):
        raise RuntimeError("this torch's DistributedDataParallel no longer has _has_rebuilt_buckets and "
                           "reducer._rebuild_buckets(); see ddp_trainer.compat.rebuild_ddp_buckets")
    if ddp._has_rebuilt_buckets or not ddp.reducer._rebuild_buckets():
        return False
    ddp._has_rebuilt_buckets = True  # what DDP's forward records when it rebuilds them itself
    return True
