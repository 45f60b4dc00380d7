"""Checkpoint format, crash-safe rank-0 writes, retention, discovery, and foreign-format loading.

A checkpoint is one ``torch.save`` file loadable with ``weights_only=True``. Its ``model`` entry is the
canonical state dict (no ``module.`` / ``_orig_mod.`` prefixes), so it loads straight into the plain
torchvision model. Writes go to a temporary file in the same folder, are fsynced, then renamed into
place: a kill at any instant leaves the previous file intact.
"""
from __future__ import annotations

import argparse
import errno
import hashlib
import io
import logging
import os
import pickle
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import nn

from . import layouts
from ..errors import CheckpointError
from ..fsutil import atomic_write, human_bytes, publish, temp_path
from ..launch.mode import unwrap

log = logging.getLogger("ddp_trainer")

FORMAT = "ddp_trainer.checkpoint"
FORMAT_VERSION = 1
EPOCH_FILE = re.compile(r"^epoch_(\d{4,})\.pt$")
WRAPPER_SEGMENTS = ("module", "_orig_mod")
PAUSE_ENV = "DDP_TRAINER_TEST_PAUSE_IN_WRITE"  # test hook "S" or "S@N": pause S seconds halfway through (the N-th) write


def canonical_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The unwrapped model's state dict as CPU tensors."""
    return {k: v.detach().cpu().clone() for k, v in unwrap(model).state_dict().items()}


# -- writing ---------------------------------------------------------------------------------------

class _PausingFile(io.RawIOBase):
    """Test hook: a file that sleeps once after half of ``total`` bytes, so a kill lands mid-write."""

    def __init__(self, f: Any, total: int, pause_s: float) -> None:
        self.f, self.half, self.pause_s, self.written, self.paused = f, total // 2, pause_s, 0, False

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        n = self.f.write(b)
        self.written += n
        if not self.paused and self.written >= self.half:
            self.paused = True
            self.f.flush()
            log.warning("test hook: pausing %.1fs inside a checkpoint write", self.pause_s)
            time.sleep(self.pause_s)
        return n


def atomic_save(obj: Any, path: Path, pause_s: float = 0.0) -> None:
    """``torch.save`` through :func:`atomic_write`. ``pause_s`` (a test hook): sleep halfway through."""
    with atomic_write(path) as f:
        if pause_s > 0:
            buf = io.BytesIO()
            torch.save(obj, buf)
            data = buf.getvalue()
            pf = _PausingFile(f, len(data), pause_s)
            for i in range(0, len(data), 1 << 16):
                pf.write(data[i: i + (1 << 16)])
        else:
            torch.save(obj, f)


CHECKSUM_KEY = "payload_sha256"  # in our checkpoints: a digest of everything else in the file


def payload_digest(obj: Any) -> str:
    """SHA-256 of a checkpoint's content: every tensor's dtype, shape and bytes, every other value's
    repr, in key order. Written with each checkpoint and checked on reading, so that corruption that
    still unpickles (zeroed or flipped bytes inside a tensor) is caught, not trained on."""
    h = hashlib.sha256()
    _feed(h, obj)
    return h.hexdigest()


def _feed(h: Any, obj: Any) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())  # the buffer itself: no copy
    elif isinstance(obj, Mapping):
        h.update(f"M{len(obj)}".encode())
        for key in sorted(obj, key=repr):
            h.update(repr(key).encode("utf-8", "backslashreplace"))
            _feed(h, obj[key])
    elif isinstance(obj, (list, tuple)):
        h.update(f"L{len(obj)}".encode())
        for item in obj:
            _feed(h, item)
    else:
        h.update(repr(obj).encode("utf-8", "backslashreplace"))


def state_nbytes(obj: Any) -> int:
    """About what ``torch.save(obj)`` writes: the bytes of every tensor in it."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, Mapping):
        return sum(state_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(state_nbytes(v) for v in obj)
    return 0


def write_failure(target: Path, exc: BaseException, needed: int) -> str:
    """One line for a failed checkpoint write. torch.save reports a full disk as
    ``[enforce fail at inline_container.cc] unexpected pos``; name the device's lack of space instead."""
    folder = target.parent
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        free = -1
    errno_ = getattr(exc, "errno", None)
    if errno_ == errno.ENOSPC or "unexpected pos" in str(exc) or 0 <= free < needed:
        where = f"{human_bytes(free)} free there" if free >= 0 else "free space unknown"
        return (f"no space left on the device holding '{folder}' to write {target.name} (needed about "
                f"{human_bytes(needed)}, {where}); the previous checkpoints are intact: free space or choose "
                f"another output_dir, then resume")
    why = getattr(exc, "strerror", None) or str(exc).strip().splitlines()[-1][:200]
    return (f"checkpoint write to '{target}' failed ({type(exc).__name__}: {why}); the previous checkpoints in "
            f"'{folder}' are intact; fix the cause (permissions, the filesystem), then resume")


def atomic_link(src: Path, dst: Path) -> None:
    """Make ``dst`` name the same bytes as ``src`` (hard link, else copy), atomically."""
    tmp = temp_path(dst)
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        import shutil

        shutil.copyfile(src, tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
    publish(tmp, dst)


class CheckpointWriter:
    """Writes ``last.pt``, ``best.pt`` and ``epoch_NNNN.pt`` in one folder. Built on global rank 0 only.

    Synchronous; :class:`AsyncCheckpointWriter` runs it in the background.
    """

    def __init__(self, folder: Path, keep_last: int) -> None:
        self.folder = Path(folder)
        self.keep_last = keep_last
        pause_s, _, nth = os.environ.get(PAUSE_ENV, "").partition("@")  # the test hook, read once
        self._pause_s, self._pause_nth = float(pause_s or 0), int(nth) if nth else None
        self._writes = 0
        self.folder.mkdir(parents=True, exist_ok=True)
        for stale in self.folder.glob(".*.tmp-*"):  # left by a run killed mid-write
            stale.unlink(missing_ok=True)

    def save(self, state: Mapping[str, Any], *, epoch_file: int | None = None, best: bool = False,
             also: Sequence[str] = (), remove: Sequence[str] = ()) -> Path:
        """Write ``state`` once and name it last.pt (+ epoch_NNNN.pt, + best.pt, + the names in ``also``).

        Older epoch files, and the names in ``remove``, are removed only after the new files are in place.
        """
        self._writes += 1
        pause = self._pause_s if self._pause_nth in (None, self._writes) else 0.0
        first = self.folder / (f"epoch_{epoch_file:04d}.pt" if epoch_file is not None and self.keep_last > 0
                               else "last.pt")
        if state.get("format") == FORMAT:
            state = {**state, CHECKSUM_KEY: payload_digest(state)}
        try:
            atomic_save(state, first, pause)
            if first.name != "last.pt":
                atomic_link(first, self.folder / "last.pt")
            if best:
                atomic_link(first, self.folder / "best.pt")
            for name in also:
                atomic_link(first, self.folder / name)
        except Exception as exc:  # noqa: BLE001 - every write failure becomes one message naming the file
            raise CheckpointError(write_failure(first, exc, state_nbytes(state))) from None
        for name in remove:
            (self.folder / name).unlink(missing_ok=True)
        if epoch_file is not None:
            self._prune()
        return first

    def check(self) -> None:
        """Nothing to report: a synchronous save raises where it fails."""

    def wait(self) -> None:
        """Nothing in flight."""

    def close(self) -> None:
        """Nothing in flight."""

    def _prune(self) -> None:
        epochs = sorted(p for p in self.folder.iterdir() if EPOCH_FILE.match(p.name))
        for old in epochs[: max(0, len(epochs) - self.keep_last)]:
            old.unlink(missing_ok=True)


def cpu_snapshot(obj: Any, staging: list[torch.Tensor] | None = None) -> Any:
    """A deep copy of ``obj`` with every tensor copied to the CPU (what a background write may hold
    while training goes on changing the live tensors).

    ``staging``: CPU buffers kept from the previous snapshot, reused in order when shape and dtype
    match (a ``copy_`` into warm memory instead of a fresh allocation: most of the cost of a snapshot).
    The list is updated to this snapshot's buffers. Only safe when the previous write has finished.
    """
    reuse = iter(list(staging or []))
    fresh: list[torch.Tensor] = []

    def copy(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            src = value.detach()
            buf = next(reuse, None)
            if buf is None or buf.shape != src.shape or buf.dtype != src.dtype:
                buf = torch.empty(src.shape, dtype=src.dtype, device="cpu",
                                  pin_memory=src.device.type == "cuda")
            buf.copy_(src, non_blocking=src.device.type == "cuda")
            fresh.append(buf)
            return buf
        if isinstance(value, dict):
            return {k: copy(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(copy(v) for v in value)
        return value

    out = copy(obj)
    if any(t.is_pinned() for t in fresh):
        torch.cuda.synchronize()  # the non-blocking device-to-host copies must land before the write
    if staging is not None:
        staging[:] = fresh
    return out


class AsyncCheckpointWriter:
    """:class:`CheckpointWriter` in a background thread: the caller is blocked only for the CPU copy.

    At most one save is in flight (a new save first waits for the previous one). A failed background
    write is raised as CheckpointError, naming the path, at the next :meth:`check`, :meth:`save` or
    :meth:`close`; the atomic rename means the previous files are intact.
    """

    def __init__(self, folder: Path, keep_last: int) -> None:
        import threading

        self.sync = CheckpointWriter(folder, keep_last)
        self.folder = self.sync.folder
        self._threading = threading
        self._thread: Any = None
        self._error: str | None = None
        self._staging: list[torch.Tensor] = []  # CPU buffers reused by every snapshot

    def _run(self, state: dict[str, Any], kwargs: dict[str, Any]) -> None:
        try:
            path = self.sync.save(state, **kwargs)
            log.info("checkpoint: %s written", path.name)
        except CheckpointError as exc:  # reported on the training thread, at the next step
            self._error = exc.message
        except BaseException as exc:  # noqa: BLE001 - reported on the training thread, at the next step
            self._error = f"checkpoint write in '{self.folder}' failed ({type(exc).__name__}: {exc})"

    @property
    def failed(self) -> bool:
        """A finished background write failed (no waiting, no collective)."""
        return self._error is not None

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def check(self) -> None:
        """Raise the error of a finished background write, if any (does not wait)."""
        if self._error is not None:
            raise CheckpointError(self._error)

    def save(self, state: Mapping[str, Any], *, epoch_file: int | None = None, best: bool = False,
             also: Sequence[str] = (), remove: Sequence[str] = ()) -> Path:
        self.wait()
        self.check()
        snapshot = cpu_snapshot(dict(state), self._staging)
        kwargs = {"epoch_file": epoch_file, "best": best, "also": tuple(also), "remove": tuple(remove)}
        self._thread = self._threading.Thread(target=self._run, name="checkpoint-writer", daemon=False,
                                              args=(snapshot, kwargs))
        self._thread.start()
        return self.folder / ("last.pt" if epoch_file is None or self.sync.keep_last == 0 else f"epoch_{epoch_file:04d}.pt")

    def close(self) -> None:
        """Wait for the last save; raise if it failed."""
        self.wait()
        self.check()


def resume_candidates(folder: Path) -> list[Path]:
    """Checkpoints to try on ``resume=auto``, newest first: last.pt, then epoch files by number."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    out = [folder / "last.pt"] if (folder / "last.pt").exists() else []
    epochs = sorted((p for p in folder.iterdir() if EPOCH_FILE.match(p.name)), reverse=True)
    return out + epochs


def has_checkpoints(folder: Path) -> bool:
    return bool(resume_candidates(folder)) or (Path(folder) / "best.pt").exists()


# -- reading ---------------------------------------------------------------------------------------

@dataclass
class Loaded:
    """A checkpoint of any accepted format, normalised."""

    path: str
    kind: str  # ddp_trainer | state_dict | pickled_model | a foreign layout (see layouts.py)
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any] | None = None
    scaler: dict[str, Any] | None = None
    epoch: int = -1  # epoch the checkpoint was taken in (-1: none)
    position: int = 0  # samples of that epoch consumed
    epoch_complete: bool = True
    step: int = 0
    best: float | None = None
    class_to_idx: dict[str, int] | None = None
    model_name: str | None = None
    config: dict[str, Any] | None = None
    world_size: int | None = None
    torch_version: str | None = None
    rng: list[dict[str, Any]] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    renamed: int = 0  # keys whose wrapper prefixes were stripped
    entries: dict[str, Any] = field(default_factory=dict)  # the checkpoint mapping components restore from

    def __post_init__(self) -> None:
        if not self.entries:  # a foreign file: the entries its fields stand for
            self.entries = {"model": self.model, "optimizer": self.optimizer, "scaler": self.scaler,
                            "epoch": self.epoch, "position": self.position, "epoch_complete": self.epoch_complete,
                            "step": self.step, "best": self.best, "rng": self.rng}

    @property
    def start_epoch(self) -> int:
        """The epoch a resumed run continues in."""
        return self.epoch + 1 if self.epoch_complete else self.epoch

    @property
    def start_position(self) -> int:
        return 0 if self.epoch_complete else self.position


def strip_wrapper_prefixes(sd: Mapping[str, Any]) -> tuple[dict[str, Any], int]:
    """Remove ``module.`` and ``_orig_mod.`` path segments (DataParallel, DDP, torch.compile)."""
    out, renamed = {}, 0
    for key, value in sd.items():
        parts = [p for p in key.split(".") if p not in WRAPPER_SEGMENTS]
        new = ".".join(parts)
        renamed += new != key
        out[new] = value
    return out, renamed


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


# Plain data that other trainers pickle into their checkpoints: torchvision's references and timm
# store their argparse.Namespace as "args". Safe to unpickle (no code runs); anything else is refused.
SAFE_GLOBALS = [argparse.Namespace]


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return (lines[0] if lines else type(exc).__name__)[:200]


def _looks_like_torch_save(path: Path) -> bool:
    """torch.save writes a zip archive (PK..) or, in the legacy format, a pickle (protocol byte 0x80)."""
    with open(path, "rb") as f:
        head = f.read(4)
    return head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"


def _torch_load(path: Path, trust: bool) -> Any:
    try:
        if not _looks_like_torch_save(path):
            raise CheckpointError(f"'{path}' is not a checkpoint (not a file written by torch.save); check the path")
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except CheckpointError:
        raise
    except pickle.UnpicklingError as exc:
        if "Unsupported global" not in str(exc):
            raise CheckpointError(f"checkpoint '{path}' is corrupt or truncated ({_first_line(exc)}); use another file") from None
        if not trust:
            found = re.search(r"GLOBAL ([\w.]+)", str(exc))
            what = f"the Python object {found.group(1)}" if found else "pickled Python objects"
            raise CheckpointError(
                f"checkpoint '{path}' holds {what}, which is code, not data: loading it runs code from the file. "
                f"Pass --trust-checkpoint if you trust its source") from None
        log.warning("--trust-checkpoint: unpickling '%s' with weights_only=False (this runs code from the file)", path)
        try:
            return torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc2:  # noqa: BLE001 - any failure to read is "not usable", named
            raise CheckpointError(f"checkpoint '{path}' cannot be read ({_first_line(exc2)})") from None
    except Exception as exc:  # noqa: BLE001 - empty, cut, overwritten: whatever torch raises, the file is unusable
        raise CheckpointError(f"checkpoint '{path}' is corrupt or truncated ({type(exc).__name__}: "
                              f"{_first_line(exc)}); use another file") from None


def read_checkpoint(path: str | Path, trust: bool = False) -> Loaded:
    """Read any accepted checkpoint onto the CPU and normalise it.

    Accepted: this project's format; the classic ``{"net", "optimizer", "epoch"}`` dict (resumes at
    epoch + 1); ``{"model_state_dict"|"state_dict"|"model": ...}`` dicts; a plain state dict; and, with
    ``trust``, a pickled whole model. Keys with ``module.`` / ``_orig_mod.`` are repaired.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{path}' not found; check the path (resume=PATH, --checkpoint)")
    obj = _torch_load(path, trust)
    if isinstance(obj, nn.Module):
        sd, renamed = strip_wrapper_prefixes(unwrap(obj).state_dict())
        return Loaded(str(path), "pickled_model", sd, renamed=renamed)
    if isinstance(obj, Mapping) and obj.get("format") == FORMAT:
        version = obj.get("format_version")
        if version != FORMAT_VERSION:
            raise CheckpointError(f"checkpoint '{path}' has format version {version}; this ddp_trainer reads "
                                  f"version {FORMAT_VERSION}")
        saved_digest = obj.get(CHECKSUM_KEY)
        if saved_digest is not None and payload_digest({k: v for k, v in obj.items() if k != CHECKSUM_KEY}) != saved_digest:
            raise CheckpointError(f"checkpoint '{path}' is damaged: its content does not match the checksum "
                                  f"written with it (corrupted on disk or in a copy); use an older checkpoint")
        sd, renamed = strip_wrapper_prefixes(obj["model"])
        return Loaded(
            str(path), "ddp_trainer", sd, optimizer=obj.get("optimizer"), scaler=obj.get("scaler"),
            epoch=int(obj["epoch"]), position=int(obj["position"]), epoch_complete=bool(obj["epoch_complete"]),
            step=int(obj["step"]), best=obj.get("best"), class_to_idx=obj.get("class_to_idx"),
            model_name=obj.get("model_name"), config=obj.get("config"), world_size=obj.get("world_size"),
            torch_version=obj.get("torch_version"), rng=obj.get("rng"),
            extra={"scheduler": obj.get("scheduler"), "monitor": obj.get("monitor")}, renamed=renamed,
            entries={**obj, "model": sd})
    layout = layouts.detect(obj)
    if layout is not None:
        sd, renamed = strip_wrapper_prefixes(obj[layout.weights_key])
        return Loaded(str(path), layout.name, sd, optimizer=layout.optimizer, scaler=layout.scaler,
                      epoch=layouts.finished_epoch(obj, layout), model_name=None, renamed=renamed,
                      extra={"epoch_means": layout.epoch_means, "epoch_entry": obj.get("epoch"),
                             "arch": layout.arch})
    if _is_state_dict(obj):
        sd, renamed = strip_wrapper_prefixes(obj)
        return Loaded(str(path), "state_dict", sd, renamed=renamed)
    keys = list(obj)[:6] if isinstance(obj, Mapping) else type(obj).__name__
    raise CheckpointError(f"checkpoint '{path}' is not a format ddp_trainer knows (found {keys}); expected a "
                          f"state dict, a {{'net', 'optimizer', 'epoch'}} dict or a ddp_trainer checkpoint")


def chosen_weights(loaded: Loaded, ema: bool) -> dict[str, torch.Tensor]:
    """The model weights of ``loaded``, or with ``ema`` its EMA weights (``train.ema_decay`` runs)."""
    if not ema:
        return loaded.model
    entry = (loaded.entries or {}).get("model_ema")
    if not entry:
        raise CheckpointError(f"checkpoint '{loaded.path}' holds no EMA weights (it was trained without "
                              f"train.ema_decay); leave out --ema")
    sd, _ = strip_wrapper_prefixes(entry["weights"])
    return sd


def fit_prefix(sd: Mapping[str, Any], want: Iterable[str]) -> tuple[dict[str, Any], str]:
    """``sd`` with one leading prefix stripped when that makes its keys exactly the model's (a
    LightningModule's ``model.``, any wrapper attribute); returns the prefix ("" when none)."""
    want = set(want)
    keys = list(sd)
    if not keys or set(keys) == want:
        return dict(sd), ""
    first = keys[0].split(".")
    for depth in range(1, min(4, len(first))):
        prefix = ".".join(first[:depth]) + "."
        if all(k.startswith(prefix) for k in keys) and {k[len(prefix):] for k in keys} == want:
            return {k[len(prefix):]: v for k, v in sd.items()}, prefix
    return dict(sd), ""


def common_prefix(keys: list[str]) -> str:
    """The first key segment (with its dot) when every key starts with it, else ""."""
    first = keys[0].split(".")[0] + "." if keys else ""
    return first if first and all(k.startswith(first) for k in keys) else ""


def load_weights(model: nn.Module, sd: Mapping[str, torch.Tensor], *, skip_prefixes: Iterable[str] = (),
                 source: str = "checkpoint") -> dict[str, list[str]]:
    """Load a canonical state dict into ``model`` (any wrapper), strictly except ``skip_prefixes``.

    A single leading prefix is stripped when that makes the keys fit exactly (logged). Raises
    CheckpointError naming the missing / unexpected / mis-shaped keys, and saying so when only the
    classifier head differs (fine-tuning: model.init_from) or the keys carry a prefix.
    """
    from ..models import classifier_head

    target = unwrap(model)
    skip = tuple(skip_prefixes)
    want = target.state_dict()
    sd, prefix = fit_prefix(sd, want)
    if prefix:
        log.info("%s: keys carry the prefix %r (a wrapper's attribute); stripped it to fit the model", source, prefix)
    sd = {k: v for k, v in sd.items() if not k.startswith(skip)} if skip else dict(sd)
    missing = [k for k in want if k not in sd and not (skip and k.startswith(skip))]
    unexpected = [k for k in sd if k not in want]
    shapes = [k for k in sd if k in want and tuple(sd[k].shape) != tuple(want[k].shape)]
    if missing or unexpected or shapes:
        head = tuple(classifier_head(target))
        if not missing and not unexpected and all(k.startswith(head) for k in shapes):
            k = next(k for k in shapes if k.endswith("weight")) if any(k.endswith("weight") for k in shapes) else shapes[0]
            raise CheckpointError(
                f"{source}: only the classifier head differs ({k}: {tuple(sd[k].shape)} in the checkpoint, "
                f"{tuple(want[k].shape)} in the model: it was trained on {sd[k].shape[0]} classes, the data has "
                f"{want[k].shape[0]}); to fine-tune from these weights use model.init_from=PATH (the head starts new)")
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if shapes:
            k = shapes[0]
            parts.append(f"{len(shapes)} with other shapes (e.g. {k}: {tuple(sd[k].shape)} vs {tuple(want[k].shape)})")
        theirs = common_prefix(list(sd))
        hint = (f"the checkpoint's keys all start with {theirs!r} and the model's do not: strip it "
                f"(ddp-trainer convert IN OUT --strip-prefix {theirs})" if theirs and not common_prefix(list(want))
                else "use the model.name the checkpoint was trained with")
        raise CheckpointError(f"{source} does not fit model.name's model: {'; '.join(parts)}; {hint}")
    target.load_state_dict(sd, strict=not skip)
    return {"missing": missing, "unexpected": unexpected}
