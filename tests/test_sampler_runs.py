"""data.sampler end to end: each rank of a real run (1, 2, 3 processes) trains what the sampler's
definition says, and a run SIGKILLed mid-epoch resumes bitwise equal to the uninterrupted one."""
import os
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import PY, ROOT, TORCHRUN, child_env, kept_mid_epoch, metrics, run
from torch.utils.data import DistributedSampler

from ddp_trainer.data.samplers import epoch_order

HELPERS = ROOT / "tests" / "helpers"
SAMPLERS = ["distributed", "repeated_augment", "class_balanced"]
SEED, BATCH = 5, 8


def env(**extra: str) -> dict:
    return child_env(PYTHONPATH=f"{ROOT}{os.pathsep}{HELPERS}", **extra)


@pytest.fixture(scope="module")
def lopsided(demo_small: Path, tmp_path_factory) -> Path:
    """demo_small with its first class copied up to 10x the images of each other class (120 + 9 x 12)."""
    root = tmp_path_factory.mktemp("lopsided")
    shutil.copytree(demo_small, root, dirs_exist_ok=True)
    first = sorted(p for p in (root / "train").iterdir() if p.is_dir())[0]
    originals = sorted(first.iterdir())
    for k in range(1, 10):
        for f in originals:
            shutil.copy(f, first / f"copy{k}_{f.name}")
    return root


def data_for(sampler: str, demo_small: Path, lopsided: Path) -> Path:
    return lopsided if sampler == "class_balanced" else demo_small


def args_for(sampler: str, data: Path, out: Path, epochs: int = 1, model: str = "tiny_cnn_bn") -> list[str]:
    return [f"data.root={data}", f"output_dir={out}", f"model.name={model}", "data.image_size=16",
            f"data.batch_size={BATCH}", "data.num_workers=1", "data.augment=[flip,random_resized_crop]",
            f"data.sampler={sampler}", f"train.epochs={epochs}", "checkpoint.every_steps=3", "optim.lr=0.01",
            f"seed={SEED}"]


def command(nproc: int, args: list[str]) -> list[str]:
    if nproc == 1:
        return [PY, str(ROOT / "launch.py"), *args]
    return [*TORCHRUN, "--standalone", f"--nproc_per_node={nproc}", str(ROOT / "launch.py"), *args]


def recorded(folder: Path) -> dict[int, dict[int, list[int]]]:
    """{rank: {epoch: sample indices in load order}} from FAULT_RECORD_SAMPLES files."""
    out: dict[int, dict[int, list[int]]] = {}
    for f in sorted(folder.iterdir()):
        rank = int(f.name.split("-")[1][1:])
        for line in f.read_text().splitlines():
            e, i = map(int, line.split())
            out.setdefault(rank, {}).setdefault(e, []).append(i)
    return out


def train_labels(data: Path) -> list[int]:
    """The training index's labels, as the run scans them (sorted classes, sorted files)."""
    from ddp_trainer.data.folder_index import scan

    return [label for _, label in scan(data / "train", None).samples]


def check_against_definition(sampler: str, data: Path, seen: dict, world: int, epochs: int) -> None:
    labels = train_labels(data)
    n = len(labels)
    assert sorted(seen) == list(range(world))
    for epoch in range(epochs):
        if sampler == "distributed":
            for r in range(world):
                s = DistributedSampler(range(n), num_replicas=world, rank=r, shuffle=True, seed=SEED)
                s.set_epoch(epoch)
                stream = list(s)
                assert seen[r][epoch] == stream[: len(stream) // BATCH * BATCH]  # its batches, the partial one dropped
        elif sampler == "repeated_augment":
            order = [i for i in epoch_order(n, SEED, epoch) for _ in range(3)][:n]
            consumed = n // (world * BATCH) * world * BATCH
            for r in range(world):
                assert seen[r][epoch] == [order[p] for p in range(r, consumed, world)]
        else:
            gen = torch.Generator().manual_seed(SEED * 1_000_003 + epoch)
            probs = 1.0 / torch.bincount(torch.tensor(labels)).double()[torch.tensor(labels)]
            draws = torch.multinomial((probs / probs.sum()).float(), n, replacement=True, generator=gen).tolist()
            got = [i for r in range(world) for i in seen[r][epoch]]
            consumed = n // (world * BATCH) * world * BATCH
            assert Counter(got) == Counter(draws[:consumed])
            per_class = Counter(labels[i] for i in got)
            # class 0 holds 10x the images of each other class; drawn, it is not 10x as frequent
            assert per_class[0] < 3 * max(per_class[c] for c in range(1, 10))


@pytest.fixture(scope="module")
def references(demo_small: Path, lopsided: Path, tmp_path_factory) -> dict[str, tuple[Path, Path, Path]]:
    """Per sampler: an uninterrupted 2-process, 2-epoch run of the slow model, samples recorded, every
    checkpoint it wrote kept: (run folder, recorded samples, kept checkpoints)."""
    out = {}
    for sampler in SAMPLERS:
        base = tmp_path_factory.mktemp(f"ref_{sampler}")
        rec, kept = base / "rec", base / "kept"
        rec.mkdir()
        kept.mkdir()
        args = args_for(sampler, data_for(sampler, demo_small, lopsided), base / "run", epochs=2,
                        model="slow_model:build")
        res = run(command(2, args), env=env(FAULT_RECORD_SAMPLES=str(rec), FAULT_KEEP_CHECKPOINTS=str(kept),
                                            SLOW_MODEL_SLEEP="0"))
        assert res.returncode == 0, res.stderr
        out[sampler] = (base / "run", rec, kept)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("nproc", [1, 2, 3])
def test_each_rank_trains_what_the_sampler_defines(sampler: str, nproc: int, demo_small: Path, lopsided: Path,
                                                   references, tmp_path: Path):
    data = data_for(sampler, demo_small, lopsided)
    if nproc == 2:  # the reference run (2 epochs) is the 2-process case
        run_dir, rec, _ = references[sampler]
        epochs = 2
    else:
        rec, run_dir, epochs = tmp_path / "rec", tmp_path / "run", 1
        rec.mkdir()
        res = run(command(nproc, args_for(sampler, data, run_dir)), env=env(FAULT_RECORD_SAMPLES=str(rec)))
        assert res.returncode == 0, res.stderr
        assert f"data.sampler={sampler}" in res.stderr
    check_against_definition(sampler, data, recorded(rec), nproc, epochs)
    assert [r["epoch"] for r in metrics(run_dir)] == list(range(epochs))


@pytest.mark.slow
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_a_mid_epoch_checkpoint_resumes_bitwise_equal(sampler: str, demo_small: Path, lopsided: Path,
                                                      references, tmp_path: Path):
    # the subject is the sampler's position in a mid-epoch checkpoint, not the kill (test_resume's
    # first test kills for real): resume from the first mid-epoch state the reference run saved
    out = tmp_path / "run"
    args = args_for(sampler, data_for(sampler, demo_small, lopsided), out, epochs=2, model="slow_model:build")
    kept_mid_epoch(references[sampler][2], out)
    state = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert state["train_order"]["sampler"] == sampler
    if sampler == "distributed":  # its order depends on the world size: on 1 process the epoch restarts
        out1 = tmp_path / "run1"
        shutil.copytree(out, out1)
        res = run(command(1, args_for(sampler, demo_small, out1, epochs=2, model="slow_model:build")),
                  env=env(SLOW_MODEL_SLEEP="0"))
        assert res.returncode == 0, res.stderr
        assert f"epoch {state['epoch']} restarts its order from the beginning" in res.stderr
        assert "world_size 2 -> 1" in res.stderr
    res = run(command(2, args), env=env(SLOW_MODEL_SLEEP="0"))
    assert res.returncode == 0, res.stderr
    assert f"{state['position']} samples into the epoch" in res.stderr
    ref = torch.load(references[sampler][0] / "checkpoints" / "last.pt", weights_only=True)["model"]
    got = torch.load(out / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert ref.keys() == got.keys()
    for k in ref:
        assert torch.equal(ref[k], got[k]), k
