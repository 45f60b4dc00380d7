"""Running inside a launch: resolve the environment, decide the mode, log it, and hold the process
group for the body of a command (training, distributed evaluation)."""
from __future__ import annotations

import contextlib
import logging
import os
from typing import Any, Iterator

log = logging.getLogger("ddp_trainer")


def die_with_parent() -> None:
    """A torchrun worker ends when its agent dies (Linux parent-death signal): a SIGKILLed agent must
    not leave workers training and writing on their own."""
    import ctypes
    import signal
    import sys

    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the agent died before the call
        os._exit(1)


@contextlib.contextmanager
def launched(mode_request: str, backend: str, timeout_s: float,
             init_timeout_s: float | None = None) -> Iterator[tuple[Any, Any]]:
    """Resolve the launch environment, decide the mode, log the decision, and run inside the process
    group (always torn down). Yields ``(Dist, ModeDecision)``."""
    import torch

    from .dist import pick_device, process_group
    from .environment import resolve
    from .mode import decide_mode
    from .signals import write_ready
    from ..runlog import setup_logging

    env = resolve(os.environ)
    setup_logging(env.rank)
    decision = decide_mode(mode_request, backend, env.world_size, env.local_world_size, torch.cuda.device_count(),
                           launched=env.source != "single")
    device = pick_device(env, decision.use_cuda)
    if decision.backend is not None:
        log.info("launch: DDP world_size=%d nodes=%d backend=%s device=%s (%s), %d CPU thread(s) per process",
                 env.world_size, env.num_nodes, decision.backend, device.type, env.source, torch.get_num_threads())
    else:
        log.info("launch: %s device=%s (%s)", decision.describe(), device, env.source)
    if decision.mode == "dp":
        log.info("hint: DDP is faster than DataParallel: torchrun --standalone --nproc_per_node=%d launch.py ...",
                 decision.gpus)
    with process_group(env, decision.backend, device, timeout_s, init_timeout_s) as dist:
        if dist.active:
            with dist.waiting("every rank to start"):
                where = dist.all_gather_object(_host_and_address())
            log.info("ranks: %s", ", ".join(f"{r} on {h} ({a})" for r, (h, a) in enumerate(where)))
        if env.is_local_main:  # every rank of this node has joined, so each handles stop signals now
            write_ready()
        yield dist, decision


def _host_and_address() -> tuple[str, str]:
    import socket

    host = socket.gethostname()
    try:
        return host, socket.gethostbyname(host)
    except OSError:
        return host, "?"
