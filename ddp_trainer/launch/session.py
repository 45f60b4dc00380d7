"""Running inside a launch: decide the mode, log it, and hold the process group for the body of a
command (training, distributed evaluation)."""
from __future__ import annotations

import contextlib
import logging
import socket
from pathlib import Path
from typing import Iterator

import torch

from ..errors import ConfigError
from .dist import Dist, Placement, device_uuid, pick_device, process_group, shared_gpus
from .environment import LaunchEnv
from .mode import ModeDecision, decide_mode
from .signals import write_ready

log = logging.getLogger("ddp_trainer")


@contextlib.contextmanager
def launched(env: LaunchEnv, mode_request: str, backend: str, timeout_s: float,
             init_timeout_s: float | None = None, trace_dir: Path | None = None) -> Iterator[tuple[Dist, ModeDecision]]:
    """Decide the mode for ``env``, log the decision, and run inside the process group (always torn
    down), once every rank has joined and no two of them share a GPU. Yields ``(Dist, ModeDecision)``.
    ``trace_dir``: where NCCL's flight recorder dumps on a timeout (see process_group)."""
    decision = decide_mode(mode_request, backend, env.world_size, env.local_world_size, torch.cuda.device_count(),
                           launched=env.source != "single")
    device = pick_device(env, decision.use_cuda)
    if decision.backend is not None:
        log.info("launch: DDP world_size=%d nodes=%d backend=%s device=%s (%s), %d CPU thread(s) per process",
                 env.world_size, env.num_nodes, decision.backend, device.type, env.engine, torch.get_num_threads())
    else:
        log.info("launch: %s device=%s (%s)", decision.describe(), device, env.engine)
    if decision.mode == "dp":
        log.info("hint: DDP is faster than DataParallel: torchrun --standalone --nproc_per_node=%d launch.py ...",
                 decision.gpus)
    with process_group(env, decision.backend, device, timeout_s, init_timeout_s, trace_dir) as dist:
        if dist.active:
            with dist.waiting("every rank to start"):
                where = dist.all_gather_object((*_host_and_address(), device_uuid(device)))
            log.info("ranks: %s", ", ".join(f"{r} on {h} ({a})" for r, (h, a, _) in enumerate(where)))
            clash = shared_gpus([Placement(r, h, gpu) for r, (h, _, gpu) in enumerate(where)])
            if clash:
                raise ConfigError(clash, shared=True)
        if env.is_local_main:  # every rank of this node has joined, so each handles stop signals now
            write_ready()
        yield dist, decision


def _host_and_address() -> tuple[str, str]:
    host = socket.gethostname()
    try:
        return host, socket.gethostbyname(host)
    except OSError:
        return host, "?"
