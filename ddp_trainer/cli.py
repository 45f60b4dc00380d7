"""Command line: ``launch.py`` (training) and ``ddp-trainer`` / ``python -m ddp_trainer`` subcommands.

Every command turns a :class:`UserError` into one line on stderr and exit code 2; any other error
into one line and exit code 1 (``--traceback`` shows the full traceback).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

from .errors import EXIT_FAILURE, EXIT_OK, CollectiveFailed, UserError, one_line

if TYPE_CHECKING:
    from .launch.signals import StopRequest

log = logging.getLogger("ddp_trainer")
SHARED_ERROR_GRACE_S = 2.0


def _report(exc: BaseException, rank: int, show_traceback: bool) -> int:
    """Print ``exc`` once (shared errors only on rank 0) and return the exit code."""
    prefix = f"[rank {rank}] " if rank or os.environ.get("WORLD_SIZE", "1") not in ("", "1") else ""
    if isinstance(exc, UserError):
        if not exc.shared or rank == 0:
            print(f"{prefix}error: {one_line(exc)}", file=sys.stderr, flush=True)
            if show_traceback:
                traceback.print_exception(exc)
        elif rank:
            # rank 0 prints this error; torchrun's agent stops every other worker as soon as one exits,
            # so leave rank 0 a moment to print it first
            time.sleep(SHARED_ERROR_GRACE_S)
        return exc.exit_code
    text = one_line(exc)
    if _peer_lost(exc):
        print(f"{prefix}error: lost contact with another rank (its process or host died, or the network "
              f"failed): {text[:300]}", file=sys.stderr, flush=True)
    else:
        print(f"{prefix}error: {type(exc).__name__}: {text} (run with --traceback for details)",
              file=sys.stderr, flush=True)
    if show_traceback:
        traceback.print_exception(exc)
    return EXIT_FAILURE


# torch.distributed's own error types (a store or network failure); named, not imported, because
# this module runs before torch is loaded
_TORCH_DIST_ERRORS = {"DistError", "DistBackendError", "DistNetworkError", "DistStoreError"}


def _peer_lost(exc: BaseException) -> bool:
    """A collective failed because a peer went away: told by the exception's type (a collective
    of ours, or torch.distributed's error family), never by its message."""
    for e in (exc, exc.__cause__, exc.__context__):
        if e is None:
            continue
        if isinstance(e, CollectiveFailed) or {c.__name__ for c in type(e).__mro__} & _TORCH_DIST_ERRORS:
            return True
    return False


def guarded(fn: Callable[[argparse.Namespace], int], args: argparse.Namespace, rank: int = 0) -> int:
    for stream in (sys.stdout, sys.stderr):  # a file name that is not valid UTF-8 prints as \xNN, never fails
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    try:
        return fn(args)
    except KeyboardInterrupt:
        print(f"[rank {rank}] interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # stdout piped into `head` and closed: not an error of the command
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except Exception as exc:  # noqa: BLE001 - the top level turns every error into one line
        return _report(exc, rank, getattr(args, "traceback", False))


def _train_parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog, description="Train an image classifier on class-per-folder data (torchrun, srun, or one process).",
        epilog="Overrides are key=value pairs parsed as YAML, e.g. train.epochs=5 data.root=/data optim.lr=3e-4")
    p.add_argument("--config", help="YAML config file (defaults < file < overrides)")
    p.add_argument("--debug", action="store_true",
                   help="one process, one device, no workers, anomaly detection, a short run in <output_dir>.debug")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="allow loading pickled checkpoints (torch.save(model)); this runs code from the file")
    p.add_argument("--traceback", action="store_true", help="show full tracebacks on errors")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    return p


def _debug_config(cfg):  # type: ignore[no-untyped-def]
    from .config import Config

    assert isinstance(cfg, Config)
    return cfg.replace(**{
        "output_dir": str(Path(cfg.output_dir)) + ".debug", "resume": "none", "overwrite": True,
        "dist.mode": "single", "data.num_workers": 0, "train.epochs": cfg.debug.epochs,
        "train.log_every_steps": 1, "train.compile": False})


def run_training(args: argparse.Namespace, stop: "StopRequest | None" = None) -> int:
    """Train as ``args`` say. ``stop``: the stop-signal handling installed at process start (see
    :func:`train_main`); its signals become ``preempt.signals`` once the config is read."""
    import torch

    from . import config as config_mod
    from .launch.environment import resolve
    from .errors import ConfigError
    from .models import check_model_name
    from .launch.signals import Preempted, StopRequest, parse_signals
    from .runlog import close_file_logs, setup_logging
    from .launch.session import die_with_parent, launched
    from .train.trainer import Trainer

    env = resolve(os.environ)
    if env.source == "torchrun":
        die_with_parent()
    setup_logging(env.rank)
    try:  # every rank sees the same argv and files, so only rank 0 reports what is wrong with them
        cfg = config_mod.load(args.config, args.overrides)
        if args.debug:
            if env.world_size > 1:
                raise ConfigError("--debug runs one process; start it with 'python launch.py --debug', not torchrun")
            cfg = _debug_config(cfg)
        check_model_name(cfg.model.name)
    except ConfigError as exc:
        exc.shared = True
        raise
    # before any loader worker exists; the workers themselves ignore these signals
    stop = (stop or StopRequest([])).configure(parse_signals(cfg.preempt.signals))
    trainer = None
    try:
        with launched(cfg.dist.mode, cfg.dist.backend, cfg.dist.timeout_s, cfg.dist.init_timeout_s) as (dist, decision):
            if args.debug:
                torch.autograd.set_detect_anomaly(True)
                log.info("debug: one process on %s, num_workers=0, anomaly detection on, %d step(s) x %d "
                         "epoch(s), output in %s", dist.device, cfg.debug.steps_per_epoch, cfg.train.epochs,
                         cfg.output_dir)
            trainer = Trainer(cfg, dist, decision, trust_checkpoint=args.trust_checkpoint,
                              max_steps_per_epoch=cfg.debug.steps_per_epoch if args.debug else None,
                              stop=stop)
            trainer.build()
            with dist.training():
                result = trainer.fit()
            if result.last_val is not None:
                log.info("done: val_loss=%.4f val_acc=%.4f in %s", result.last_val.loss, result.last_val.acc,
                         result.output_dir)
            else:
                log.info("done: nothing left to train (train.epochs=%d reached) in %s", cfg.train.epochs,
                         result.output_dir)
            if stop.received:
                log.info("%s arrived after the last training step: the run is complete, nothing to stop or "
                         "requeue", stop.received)
    except Preempted as exc:
        if env.rank == 0:
            log.warning("%s", exc)
        return exc.exit_code
    finally:
        stop.finish()
        if trainer is not None:
            trainer.close()
        close_file_logs()
    return EXIT_OK


def exit_now(code: int) -> None:
    """End the process with ``code``, skipping interpreter teardown when nothing is left to run.

    Tearing down torch and torchvision takes about a second at every exit (library finalisers, not
    our work); when only the main thread is left (no checkpoint write in flight) and the loader
    workers are gone, there is nothing it would finish: flush, then ``os._exit``. Otherwise the
    normal exit joins what still runs. (Daemon threads, such as the stop-signal watcher, hold no
    work.)"""
    import multiprocessing
    import threading

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    others = [t for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon]
    if not others and not multiprocessing.active_children():
        os._exit(code)
    sys.exit(code)


def train_main(argv: Sequence[str] | None = None, prog: str = "launch.py") -> int:
    from .launch.signals import StopRequest

    stop = StopRequest.early()  # first: a stop signal during the seconds of importing torch is handled too
    args = _train_parser(prog).parse_intermixed_args(argv)  # flags anywhere among the key=value overrides
    rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) or 0)
    return guarded(lambda a: run_training(a, stop), args, rank)


# -- subcommands -------------------------------------------------------------------------------------

def _cmd_demo_data(args: argparse.Namespace) -> int:
    from .data.demo import CLASSES, write_demo_data

    out = write_demo_data(args.out, args.train_per_class, args.val_per_class, args.size)
    print(f"wrote {len(CLASSES)} classes x ({args.train_per_class} train + {args.val_per_class} val) images to {out}")
    return EXIT_OK


def console_main() -> None:
    """The ``ddp-trainer`` console script."""
    exit_now(main())


def main(argv: Sequence[str] | None = None) -> int:
    """``ddp-trainer SUBCOMMAND ...``"""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="ddp-trainer", description="ddp_trainer commands")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("train", help="train (same as launch.py; pass its arguments after 'train')", add_help=False)
    d = sub.add_parser("demo-data", help="write the built-in demo dataset as plain class folders")
    d.add_argument("out")
    d.add_argument("--train-per-class", type=int, default=200)
    d.add_argument("--val-per-class", type=int, default=50)
    d.add_argument("--size", type=int, default=32)
    d.add_argument("--traceback", action="store_true")
    d.set_defaults(fn=_cmd_demo_data)
    from . import check
    from . import commands

    commands.register(sub)
    check.register(sub)
    if argv and argv[0] == "train":
        return train_main(argv[1:], prog="ddp-trainer train")
    args, extra = parser.parse_known_args(argv)
    if extra:  # key=value overrides given after a flag ("check --verify data.root=x")
        if not hasattr(args, "overrides") or any(e.startswith("-") for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    if not getattr(args, "fn", None):
        parser.print_help()
        return EXIT_FAILURE
    rank = int(os.environ.get("RANK", "0") or 0)
    return guarded(args.fn, args, rank)
