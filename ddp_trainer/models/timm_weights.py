"""Where a timm model's pretrained file is (``model.weights`` with ``model.name=timm/NAME``), found
on this machine only: training never downloads (a cluster node often has no internet, and N ranks
racing on a download is a classic failure).

``model.weights`` is one of:

- ``DEFAULT``: the Hugging Face hub cache, as ``timm.create_model(NAME, pretrained=True)`` or
  ``hf download timm/NAME`` leave it: ``<cache>/models--timm--NAME/snapshots/<rev>/model.safetensors``
  (``<rev>`` from ``refs/main``), where ``<cache>`` is ``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else
  ``~/.cache/huggingface/hub``. NAME is the model's hub id: the tag timm picks when none is given.
- ``local-dir:FOLDER``: the file in FOLDER, by timm's own preference (``model.safetensors``,
  ``pytorch_model.bin``, ...), as timm's ``hf_hub_id='local-dir:...'`` reads it.
- a path to a ``.safetensors`` / ``.pth`` / ``.bin`` file.

Reading the file is the checkpoint reader's; this module only says which file, or how to get it,
and refuses a file whose position embedding is of another image size (:func:`check_grid`).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from ..errors import CheckpointError, ConfigError
from .timm_nets import meta_model, timm_name

LOCAL_DIR = "local-dir:"
HUB_FILES = ("model.safetensors", "pytorch_model.bin")  # what timm reads from a hub repo, in its order
FOLDER_FILES = HUB_FILES + ("pytorch_model.pth", "model.pth")  # timm's preferred names in a local folder
SUFFIXES = (".safetensors", ".pth", ".pth.tar", ".bin", ".pt")


@dataclass(frozen=True)
class TimmWeightsFile:
    """The file ``model.weights`` names, whether it is there, and how to put it there."""

    weights: str  # what was found, in words: "timm/resnet18.a1_in1k (hub cache)"
    url: str  # where to fetch it on a machine with internet ("" when there is none to give)
    path: Path  # the file (when missing: where it is looked for)
    how: str  # how to put it there

    @property
    def present(self) -> bool:
        return self.path.is_file()


def hub_cache(env: Mapping[str, str] | None = None) -> Path:
    """The hub cache folder, read from ``env`` (default: the process environment) when called, not
    when huggingface_hub was imported, so that a changed HF_HOME counts."""
    env = os.environ if env is None else env
    if env.get("HF_HUB_CACHE"):
        return Path(env["HF_HUB_CACHE"]).expanduser()
    home = Path(env["HF_HOME"]).expanduser() if env.get("HF_HOME") else Path.home() / ".cache" / "huggingface"
    return home / "hub"


def hub_id(name: str) -> str:
    """The hub repository of ``timm/NAME``'s default weights (``timm/resnet18.a1_in1k`` for
    ``timm/resnet18``): the pretrained config timm attaches to the model, read from a build on the
    meta device. ConfigError when timm keeps this model's weights elsewhere than on the hub."""
    cfg = meta_model(name).pretrained_cfg
    repo = cfg.get("hf_hub_id") or ""
    if not repo or repo.startswith(LOCAL_DIR):
        raise ConfigError(f"model.weights=DEFAULT: timm keeps no hub weights for {timm_name(name)}; download "
                          f"{cfg.get('url') or 'its weights'} and set model.weights=/path/to/the/file", shared=True)
    return repo


def _snapshot_file(repo_folder: Path) -> Path | None:
    """The weights file of the snapshot ``refs/main`` names, else of the newest snapshot holding one."""
    ref = repo_folder / "refs" / "main"
    snapshots = repo_folder / "snapshots"
    if ref.is_file():
        for name in HUB_FILES:
            if (p := snapshots / ref.read_text().strip() / name).is_file():
                return p
    found = [p for d in (snapshots.iterdir() if snapshots.is_dir() else []) for name in HUB_FILES
             if (p := d / name).is_file()]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def _from_hub(name: str, env: Mapping[str, str] | None) -> TimmWeightsFile:
    repo = hub_id(name)
    folder = hub_cache(env) / f"models--{repo.replace('/', '--')}"
    found = _snapshot_file(folder)
    url = f"https://huggingface.co/{repo}/resolve/main/{HUB_FILES[0]}"
    how = (f"on a machine with internet run 'hf download {repo} {HUB_FILES[0]}' (or python -c \"import timm; "
           f"timm.create_model('{repo.split('/', 1)[1]}', pretrained=True)\") and copy the folder "
           f"'{folder.name}' into '{folder.parent}' ($HF_HOME/hub); or download {url} and set "
           f"model.weights=/path/to/{HUB_FILES[0]}")
    return TimmWeightsFile(f"{repo} (hub cache)", url,
                           found or folder / "snapshots" / "<revision>" / HUB_FILES[0], how)


def _from_folder(folder: Path) -> TimmWeightsFile:
    named = [folder / n for n in FOLDER_FILES if (folder / n).is_file()]
    others = sorted(p for p in (folder.iterdir() if folder.is_dir() else []) if p.name.endswith(SUFFIXES))
    path = (named or others or [folder / FOLDER_FILES[0]])[0]
    return TimmWeightsFile(f"{LOCAL_DIR}{folder}", "", path,
                           f"put {' or '.join(FOLDER_FILES[:2])} into '{folder}'")


def resolve(name: str, weights: str, env: Mapping[str, str] | None = None) -> TimmWeightsFile:
    """The file ``model.weights=weights`` names for ``timm/NAME`` (module docstring), present or not.
    ConfigError for a value that is none of the three forms."""
    if weights.upper() == "DEFAULT":
        return _from_hub(name, env)
    if weights.startswith(LOCAL_DIR):
        return _from_folder(Path(weights[len(LOCAL_DIR):]).expanduser())
    path = Path(weights).expanduser()
    if path.name.endswith(SUFFIXES) or path.is_file():
        return TimmWeightsFile(str(path), "", path, f"check the path '{path}'")
    raise ConfigError(f"model.weights={weights}: for a timm model use DEFAULT (the Hugging Face hub cache), "
                      f"{LOCAL_DIR}FOLDER, or a .safetensors / .pth file", shared=True)


def check_grid(name: str, theirs: Mapping[str, object], ours: Mapping[str, object], source: str) -> None:
    """CheckpointError when a position embedding of the file ``theirs`` (a ViT's ``pos_embed``, say)
    has another shape than the model's ``ours``: the file was trained at another image size. timm's
    ``create_model(pretrained=True)`` resamples it through the model's ``checkpoint_filter_fn``; here
    weights load as they are (what the file holds is what trains), so the message gives that timm
    command, which writes the resampled file once."""
    for key, value in theirs.items():
        mine = ours.get(key)
        if not key.endswith("pos_embed") or mine is None:
            continue
        a, b = tuple(getattr(value, "shape", ())), tuple(getattr(mine, "shape", ()))
        if a != b:
            bare = timm_name(name)
            raise CheckpointError(
                f"{source}: {key} is {a} in the file and {b} in {name}: the file was trained at another image "
                f"size; resample it to this model's once with timm (python -c \"import timm, torch; m = "
                f"timm.create_model('{bare}', pretrained=True, pretrained_cfg_overlay=dict(file='FILE')); "
                f"torch.save(m.state_dict(), 'resampled.pth')\") and set model.weights=resampled.pth, or choose "
                f"the timm model of the file's size")
