"""Command line: ``launch.py`` (training) and ``ddp-trainer`` / ``python -m ddp_trainer`` subcommands.

Every command turns a :class:`UserError` into one line on stderr and exit code 2; any other error
into one line and exit code 1 (``--traceback`` shows the full traceback).

This module loads without torch: training installs its stop-signal handling first, because
importing torch takes seconds and a signal meanwhile must be handled, not fatal.
"""
from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import sys
import threading
import time
import traceback
from typing import Callable, Sequence

from . import config as config_mod
from .errors import (
    EXIT_FAILURE,
    EXIT_OK,
    CollectiveFailed,
    ConfigError,
    UserError,
    one_line,
)
from .launch.environment import process_rank, resolve
from .launch.signals import StopRequest, stop_with_parent
from .runlog import setup_logging

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


def _train(args: argparse.Namespace, stop: StopRequest) -> int:
    """Train as ``args`` say (stop signals are handled already: see :func:`train_main`)."""
    # torch loads here, after the stop-signal handling is installed (module docstring)
    from .training.run import check_config, run_training

    env = resolve(os.environ)
    if env.source == "torchrun":
        stop_with_parent()
    setup_logging(env.rank)
    try:  # every rank sees the same argv and files, so only rank 0 reports what is wrong with them
        cfg = config_mod.load(args.config, args.overrides)
    except ConfigError as exc:
        exc.shared = True
        raise
    cfg = check_config(cfg, env, args.debug)
    return run_training(cfg, env, stop, debug=args.debug, trust_checkpoint=args.trust_checkpoint)


def exit_now(code: int) -> None:
    """End the process with ``code``, skipping interpreter teardown when nothing is left to run.

    Tearing down torch and torchvision takes about a second at every exit (library finalisers, not
    our work); when only the main thread is left (no checkpoint write in flight) and the loader
    workers are gone, there is nothing it would finish: flush, then ``os._exit``. Otherwise the
    normal exit joins what still runs. (Daemon threads, such as the stop-signal watcher, hold no
    work.)"""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    others = [t for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon]
    if not others and not multiprocessing.active_children():
        os._exit(code)
    sys.exit(code)


def train_main(argv: Sequence[str] | None = None, prog: str = "launch.py") -> int:
    stop = StopRequest.early()  # first: a stop signal during the seconds of importing torch is handled too
    args = _train_parser(prog).parse_intermixed_args(argv)  # flags anywhere among the key=value overrides
    return guarded(lambda a: _train(a, stop), args, process_rank(os.environ))


def console_main() -> None:
    """The ``ddp-trainer`` console script."""
    exit_now(main())


def main(argv: Sequence[str] | None = None) -> int:
    """``ddp-trainer SUBCOMMAND ...``"""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "train":
        return train_main(argv[1:], prog="ddp-trainer train")
    # the other commands load torch with their modules; 'train' (above) installs its signal handling first
    from . import check, commands

    parser = argparse.ArgumentParser(prog="ddp-trainer", description="ddp_trainer commands")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("train", help="train (same as launch.py; pass its arguments after 'train')", add_help=False)
    commands.register(sub)
    check.register(sub)
    args, extra = parser.parse_known_args(argv)
    if extra:  # key=value overrides given after a flag ("check --verify data.root=x")
        if not hasattr(args, "overrides") or any(e.startswith("-") for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    if not getattr(args, "fn", None):
        parser.print_help()
        return EXIT_FAILURE
    return guarded(args.fn, args, process_rank(os.environ))
