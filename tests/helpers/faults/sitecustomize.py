"""Faults injected into ddp_trainer processes started by torchrun or srun, from outside the product.

Python imports ``sitecustomize`` at start-up when it is on ``PYTHONPATH`` (tests/helpers/faults, which
conftest's ``child_env`` puts there). Nothing happens unless a ``FAULT_*`` variable asks for it; then
the named function of ddp_trainer is replaced right after its module is first imported (an import
hook: importing the module here would load torch before the launcher installs its signal handling).
Loader workers fork from a patched process, so they inherit the patch. In a child of the tests' warm
launcher the modules are already imported: they are patched in place (a name another module bound
with ``from ... import`` before the patch keeps the original).

- ``FAULT_PAUSE_IN_WRITE="S"`` or ``"S@N"``: the checkpoint writer pauses S seconds halfway through
  writing the file's bytes (every write, or only the N-th), so a kill can land mid-write.
- ``FAULT_SLOW_CACHE="RANK:S"``: global rank RANK sleeps S seconds per image while it builds its
  share of the decoded cache.
- ``FAULT_RECORD_SAMPLES=DIR``: every training sample a process loads (weight > 0) is appended as
  ``"epoch index"`` to ``DIR/samples-r<global rank>-<pid>.txt`` (in load order).
- ``FAULT_EXIT_AFTER_ROW=N``: global rank 0 ends (exit 9, like a kill) right after epoch N's metrics
  row went to metrics.jsonl and the trackers, before that epoch's checkpoint.
- ``FAULT_EXIT_AT_STEP="RANK:N:MARKER"``: that global rank ends (exit 9) after its N-th optimizer
  step, once: only while the file MARKER does not exist (it creates it first).
- ``FAULT_KEEP_CHECKPOINTS=DIR``: a copy of every checkpoint file the writer lands goes to
  ``DIR/NNN-<name>`` (NNN counts the saves), so a test can resume from any state an uninterrupted
  run passed through (tests/conftest.py's ``kept_mid_epoch``).
"""
import importlib.abc
import os
import sys
import time

PATCHES: dict = {}  # module name -> the patches to run on it, in order


def _rank():
    return int(os.environ.get("RANK") or os.environ.get("SLURM_PROCID") or 0)


def _pause_in_write(writer):
    import io

    import torch

    from ddp_trainer.fsutil import atomic_write

    seconds, _, nth = os.environ["FAULT_PAUSE_IN_WRITE"].partition("@")
    count = [0]

    def atomic_save(obj, path):
        count[0] += 1
        pause = float(seconds) if not nth or int(nth) == count[0] else 0.0
        buf = io.BytesIO()
        torch.save(obj, buf)
        data = buf.getvalue()
        with atomic_write(path) as f:
            f.write(data[: len(data) // 2])
            if pause:
                f.flush()
                print(f"[fault] pausing {pause:g}s inside a checkpoint write of {path.name}", file=sys.stderr,
                      flush=True)
                time.sleep(pause)
            f.write(data[len(data) // 2:])

    writer.atomic_save = atomic_save


def _slow_cache(cache):
    who, _, seconds = os.environ["FAULT_SLOW_CACHE"].partition(":")
    if int(who) != _rank():
        return
    real = cache.decode_rgb

    def decode_rgb(*args, **kwargs):
        time.sleep(float(seconds))
        return real(*args, **kwargs)

    cache.decode_rgb = decode_rgb


def _record_samples(datasets):
    folder = os.environ["FAULT_RECORD_SAMPLES"]
    from ddp_trainer.data.samplers import SampleKey

    real = datasets.FolderDataset.__getitem__

    def getitem(self, key):
        item = real(self, key)
        if isinstance(key, SampleKey) and key.weight > 0:
            with open(os.path.join(folder, f"samples-r{_rank()}-{os.getpid()}.txt"), "a") as f:
                f.write(f"{key.epoch} {key.index}\n")
        return item

    datasets.FolderDataset.__getitem__ = getitem


def _exit_after_row(report):
    epoch = int(os.environ["FAULT_EXIT_AFTER_ROW"])
    real = report.EpochReport.epoch

    def patched(self, fig, *args, **kwargs):
        row = real(self, fig, *args, **kwargs)
        if fig.epoch == epoch and _rank() == 0:
            print(f"[fault] exiting after epoch {epoch}'s row, before its checkpoint", file=sys.stderr, flush=True)
            os._exit(9)
        return row

    report.EpochReport.epoch = patched


def _exit_at_step(engine):
    who, step, marker = os.environ["FAULT_EXIT_AT_STEP"].split(":", 2)
    real = engine.Engine.train_steps

    def patched(self, *args, **kwargs):
        for n, done in enumerate(real(self, *args, **kwargs), 1):
            yield done
            if _rank() == int(who) and n == int(step) and not os.path.exists(marker):
                open(marker, "w").close()
                print(f"[fault] rank {who} exiting after step {step}", file=sys.stderr, flush=True)
                os._exit(9)

    engine.Engine.train_steps = patched


def _keep_checkpoints(writer):
    import shutil

    folder = os.environ["FAULT_KEEP_CHECKPOINTS"]
    real = writer.CheckpointWriter.save
    count = [0]

    def save(self, *args, **kwargs):
        first = real(self, *args, **kwargs)
        count[0] += 1
        shutil.copyfile(first, os.path.join(folder, f"{count[0]:03d}-{first.name}"))
        return first

    writer.CheckpointWriter.save = save


if os.environ.get("FAULT_EXIT_AFTER_ROW"):
    PATCHES.setdefault("ddp_trainer.training.report", []).append(_exit_after_row)
if os.environ.get("FAULT_EXIT_AT_STEP"):
    PATCHES.setdefault("ddp_trainer.training.engine", []).append(_exit_at_step)
if os.environ.get("FAULT_PAUSE_IN_WRITE"):
    PATCHES.setdefault("ddp_trainer.checkpoint.writer", []).append(_pause_in_write)
if os.environ.get("FAULT_KEEP_CHECKPOINTS"):
    PATCHES.setdefault("ddp_trainer.checkpoint.writer", []).append(_keep_checkpoints)
if os.environ.get("FAULT_SLOW_CACHE"):
    PATCHES.setdefault("ddp_trainer.data.decoded_cache", []).append(_slow_cache)
if os.environ.get("FAULT_RECORD_SAMPLES"):
    PATCHES.setdefault("ddp_trainer.data.datasets", []).append(_record_samples)


class _PatchAfterImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: wraps the real loader of a patched module so the patch runs after it."""

    def find_spec(self, name, path=None, target=None):
        if name not in PATCHES:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                break
        else:
            return None
        real_exec = spec.loader.exec_module
        patches = PATCHES[name]

        def exec_module(module):
            real_exec(module)
            for patch in patches:
                patch(module)

        spec.loader.exec_module = exec_module
        return spec


# a module already imported (a child forked by tests/helpers/warm_launcher.py from a parent that
# imported ddp_trainer) is patched now; the others right after their first import
for _name in [n for n in PATCHES if n in sys.modules]:
    for _patch in PATCHES.pop(_name):
        _patch(sys.modules[_name])
if PATCHES:
    sys.meta_path.insert(0, _PatchAfterImport())
