"""The project computes what a hand-written DDP loop computes (issue 12, Part 0).

bench/plain_ddp.py is the loop a user writes by hand (ImageFolder, DDP, SGD, torch.save). Given the
project's sample order and decode path and no augmentation (the only random streams), both sides
must end with bitwise-equal weights: any change to the project's loss scaling, gradient averaging,
optimizer grouping, BatchNorm handling or data order breaks this test. Awkward sizes: 133 training
images (a tail of 5 that both sides leave out), batch 8 per process, 2 processes.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import torchvision
from conftest import ROOT, TORCHRUN, launch, metrics, run

from ddp_trainer.config import OptimConfig
from ddp_trainer.training.optim import parameter_groups

SEED = 3


@pytest.fixture(scope="module")
def odd_data(tmp_path_factory) -> Path:
    """10 classes: 13 train images each but one class with 16 (133 in all), 5 val each, 32x32 px."""
    from ddp_trainer.data.demo import write_demo_data

    root = write_demo_data(tmp_path_factory.mktemp("parity"), train_per_class=13, val_per_class=5, size=32)
    first = sorted((root / "train").iterdir())[0]
    for i in range(3):  # 133 = 8 steps of 16 + a tail of 5
        (first / f"zz_extra_{i}.png").write_bytes(sorted(first.iterdir())[i].read_bytes())
    return root


@pytest.fixture(scope="module")
def project_run(odd_data: Path, tmp_path_factory) -> Path:
    """One project run, shared by both tests (it only reads the files)."""
    out = tmp_path_factory.mktemp("parity-project") / "run"
    res = launch(2, f"data.root={odd_data}", f"output_dir={out}", "model.name=resnet18", "data.image_size=32",
                 "data.batch_size=8", "data.num_workers=1", "data.augment=[]", "data.drop_last=true",
                 "optim.name=sgd", "optim.lr=0.1", "optim.momentum=0.9", "optim.weight_decay=5e-4",
                 "optim.norm_weight_decay=5e-4", "sched.name=none", "sched.warmup_epochs=0", "train.epochs=2",
                 f"seed={SEED}", "train.log_every_steps=1", "log.progress=off", "checkpoint.every_epochs=1")
    assert res.returncode == 0, res.stderr[-3000:]
    return out


def _plain(data: Path, out: Path, *options: str) -> dict:
    res = run([*TORCHRUN, "--standalone", "--nproc_per_node=2", str(ROOT / "bench" / "plain_ddp.py"), str(data),
               str(out), "2", str(SEED), "none", "--batch", "8", "--image-size", "32", *options])
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads([l for l in res.stdout.splitlines() if l.startswith("{")][-1])


def test_project_equals_hand_written_loop_bitwise(odd_data: Path, project_run: Path, tmp_path: Path) -> None:
    plain = _plain(odd_data, tmp_path / "plain", "--order", "project", "--augment", "none", "--decode", "tensor")

    mine = torch.load(project_run / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    theirs = torch.load(tmp_path / "plain" / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert mine["step"] == 16 == len(plain["running_loss"])  # 8 full steps per epoch, the tail of 5 left out
    assert mine["model"].keys() == theirs["net"].keys()
    differ = [k for k in mine["model"] if not torch.equal(mine["model"][k], theirs["net"][k])]
    assert differ == [], f"{len(differ)} tensors differ, first {differ[:3]}"
    # the optimizer's momentum buffers too: the project keeps two groups (decay / norm parameters), so
    # its slots are mapped to names through the same grouping on a fresh model
    model = torchvision.models.resnet18(num_classes=10)
    name_of = {id(p): n for n, p in model.named_parameters()}
    groups = parameter_groups(model, OptimConfig(name="sgd", weight_decay=5e-4, norm_weight_decay=5e-4))
    slot_names = [name_of[id(p)] for g in groups for p in g["params"]]
    plain_names = [n for n, _ in model.named_parameters()]  # the plain loop's one group: model order
    mine_mom = {slot_names[i]: s["momentum_buffer"] for i, s in mine["optimizer"]["state"].items()}
    theirs_mom = {plain_names[i]: s["momentum_buffer"] for i, s in theirs["optimizer"]["state"].items()}
    assert mine_mom.keys() == theirs_mom.keys() == set(plain_names)
    assert [n for n in plain_names if not torch.equal(mine_mom[n], theirs_mom[n])] == []

    # the logged curve: rank 0's running mean loss after every step (the project logs 4 decimals)
    logged = [float(x) for x in re.findall(r"loss=([0-9.]+) \(this rank\)",
                                           (project_run / "train.log").read_text())]
    assert len(logged) == 16
    assert max(abs(a - b[2]) for a, b in zip(logged, plain["running_loss"])) <= 6e-5
    # 50 val images split evenly over 2 ranks: the plain loop's padded sampler adds nothing, so its
    # figures are exact too and must match the project's
    last = metrics(project_run)[-1]
    assert last["val_acc"] == pytest.approx(plain["val_acc"], abs=1e-12)
    assert last["val_loss"] == pytest.approx(plain["val_loss"], rel=1e-6)


def test_one_difference_breaks_the_equality(odd_data: Path, project_run: Path, tmp_path: Path) -> None:
    """The twin: the same loop in DistributedSampler's order ends elsewhere, so the check above can
    fail (equality is not an artefact of, say, both sides never training)."""
    _plain(odd_data, tmp_path / "plain", "--order", "sampler", "--augment", "none", "--decode", "tensor")
    mine = torch.load(project_run / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    theirs = torch.load(tmp_path / "plain" / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert not torch.equal(mine["model"]["fc.weight"], theirs["net"]["fc.weight"])
