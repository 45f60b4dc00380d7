"""Reading checkpoints of every accepted kind onto the CPU (finding them: :mod:`.discovery`).

Accepted: this project's format (:mod:`.format`); the layouts of other trainers (:mod:`.layouts`),
the classic ``{"net", "optimizer", "epoch"}`` dict among them; a plain state dict (also as a
``.safetensors`` file: the hub's pretrained weights); and, only with
``--trust-checkpoint``, a pickled whole model. Everything is loaded with ``weights_only=True`` first:
a file that holds code is refused, naming what it holds.
"""
from __future__ import annotations

import argparse
import logging
import pickle
import pickletools
import re
import zipfile
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from ..errors import CheckpointError
from ..extras import optional
from ..launch.mode import unwrap
from . import layouts
from .discovery import require_file
from .format import FORMAT, FORMAT_VERSION, OURS, Checkpoint, checksum_matches
from .source import CheckpointFile
from .weights import is_state_dict, strip_wrapper_prefixes

log = logging.getLogger("ddp_trainer")


# Plain data that other trainers pickle into their checkpoints: torchvision's references and timm
# store their argparse.Namespace as "args". Safe to unpickle (no code runs); anything else is refused.
SAFE_GLOBALS = [argparse.Namespace]


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return (lines[0] if lines else type(exc).__name__)[:200]


def _looks_like_torch_save(source: CheckpointFile) -> bool:
    """torch.save writes a zip archive (PK..) or, in the legacy format, a pickle (protocol byte 0x80)."""
    with source.open() as f:
        head = f.read(4)
    return head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"


def _pickle_is_whole(source: CheckpointFile) -> bool:
    """The file's pickle reads to its end (a zip written by torch.save: its data.pkl; the legacy format:
    the file's first pickle), so a refusal by weights_only was about what it references, not damage."""
    try:
        with source.open() as f:
            if zipfile.is_zipfile(f):
                with zipfile.ZipFile(f) as z:
                    name = next(n for n in z.namelist() if n.endswith("data.pkl"))
                    data = z.read(name)
            else:
                f.seek(0)
                data = f.read()
        for _ in pickletools.genops(data):
            pass
    except Exception:  # noqa: BLE001 - any failure to walk the pickle means it is damaged (or fs_error)
        return False
    return True


def _zip_members(source: CheckpointFile) -> list[str] | None:
    """The names in the file when it is a readable zip archive (None: not one, or a damaged one)."""
    try:
        with source.open() as f, zipfile.ZipFile(f) as z:
            return z.namelist()
    except Exception:  # noqa: BLE001 - not a readable archive (or fs_error)
        return None


def _torch_error(exc: BaseException) -> str:
    """torch's error text without its C++ location (``[enforce fail at inline_container.cc:180] .``)."""
    return re.sub(r"^\[enforce fail at [^\]]*\]\s*\.?\s*", "", _first_line(exc))


def _torch_load(path: Path, trust: bool) -> Any:
    """torch.load onto the CPU. An error of the filesystem met anywhere while reading (an open, a read
    inside torch, the checks of a refused pickle) is CheckpointUnreadable, whatever it caused; every
    other failure is the content's, a CheckpointError naming the damage."""
    source = CheckpointFile(path)
    try:
        return _load_content(source, trust)
    except Exception as exc:
        raise source.fail(exc) from None


def _load_content(source: CheckpointFile, trust: bool) -> Any:
    path = source.path
    try:
        if not _looks_like_torch_save(source):
            raise CheckpointError(f"'{path}' is not a checkpoint (not a file written by torch.save); check the path")
        with torch.serialization.safe_globals(SAFE_GLOBALS), source.open() as f:
            return torch.load(f, map_location="cpu", weights_only=True)
    except CheckpointError:
        raise
    except pickle.UnpicklingError as exc:
        if not _pickle_is_whole(source):
            raise CheckpointError(f"checkpoint '{path}' is corrupt or truncated ({_first_line(exc)}); use another file") from None
        if not trust:  # a whole pickle that weights_only refused: it references code
            found = re.search(r"GLOBAL ([\w.]+)", str(exc), re.IGNORECASE)  # which one, when torch says
            what = f"the Python object {found.group(1)}" if found else "pickled Python objects"
            raise CheckpointError(
                f"checkpoint '{path}' holds {what}, which is code, not data: loading it runs code from the file. "
                f"Pass --trust-checkpoint if you trust its source") from None
        log.warning("--trust-checkpoint: unpickling '%s' with weights_only=False (this runs code from the file)", path)
        try:
            with source.open() as f:
                return torch.load(f, map_location="cpu", weights_only=False)
        except Exception as exc2:  # noqa: BLE001 - any failure to read is "not usable", named
            raise CheckpointError(f"checkpoint '{path}' cannot be read ({_first_line(exc2)})") from None
    except Exception as exc:  # noqa: BLE001 - empty, cut, overwritten: whatever torch raises, the file is unusable
        members = _zip_members(source)
        if members is not None and not any(n.endswith("data.pkl") for n in members):
            shown = (", ".join(members[:4]) + (", ..." if len(members) > 4 else "")) if members else "nothing"
            raise CheckpointError(f"'{path}' is a zip archive, not a checkpoint (torch.save's archives hold a "
                                  f"data.pkl; this one holds {shown}); check the path") from None
        raise CheckpointError(f"checkpoint '{path}' is corrupt or truncated ({type(exc).__name__}: "
                              f"{_torch_error(exc)}); use another file") from None


def _safetensors_load(path: Path) -> dict[str, torch.Tensor]:
    """A .safetensors file's tensors (plain data by construction: nothing to trust)."""
    st = optional("safetensors.torch", f"checkpoint '{path.name}'", "timm", package="safetensors")
    try:
        return st.load_file(str(path), device="cpu")
    except Exception as exc:  # noqa: BLE001 - a header or size that does not add up: the file is unusable
        raise CheckpointError(f"checkpoint '{path}' is not a readable .safetensors file ({_first_line(exc)}); "
                              f"use another file") from None


def read_checkpoint(path: str | Path, trust: bool = False) -> Checkpoint:
    """Read any accepted checkpoint onto the CPU and normalise it (module docstring); a foreign
    file's keys that a wrapper prefixed with ``module.`` / ``_orig_mod.`` are repaired (our own files
    are written canonical and read as they are). CheckpointError naming the file otherwise: its
    subclass CheckpointUnreadable when the filesystem refused (an OS error, a folder or a FIFO at the
    path), never for damaged content, which is the only kind ``resume=auto`` may skip."""
    path = Path(path)
    require_file(path)
    obj = _safetensors_load(path) if path.name.endswith(".safetensors") else _torch_load(path, trust)
    if isinstance(obj, nn.Module):  # unwrapped: its keys are the model's own
        return Checkpoint(str(path), "pickled_model", {"model": unwrap(obj).state_dict()})
    if isinstance(obj, Mapping) and obj.get("format") == FORMAT:
        version = obj.get("format_version")
        if version != FORMAT_VERSION:
            raise CheckpointError(f"checkpoint '{path}' has format version {version}; this ddp_trainer reads "
                                  f"version {FORMAT_VERSION}")
        if not checksum_matches(obj):
            raise CheckpointError(f"checkpoint '{path}' is damaged: its content does not match the checksum "
                                  f"written with it (corrupted on disk or in a copy); use an older checkpoint")
        return Checkpoint(str(path), OURS, dict(obj))  # written canonical: its keys are the model's own
    layout = layouts.detect(obj)
    if layout is not None:
        sd, renamed = strip_wrapper_prefixes(obj[layout.weights_key])
        return Checkpoint(str(path), layout.name, layout.entries(obj, sd), renamed, layout)
    if is_state_dict(obj):
        sd, renamed = strip_wrapper_prefixes(obj)
        return Checkpoint(str(path), "state_dict", {"model": sd}, renamed)
    keys = list(obj)[:6] if isinstance(obj, Mapping) else type(obj).__name__
    raise CheckpointError(f"checkpoint '{path}' is not a format ddp_trainer knows (found {keys}); expected a "
                          f"state dict, a {{'net', 'optimizer', 'epoch'}} dict or a ddp_trainer checkpoint")
