"""Checkpoints written the way pytorch/examples, torchvision's references, timm and Lightning write them
(with a real torchvision resnet18 and real optimizer steps): inspect, evaluate, convert, init_from,
resume at the right epoch with the optimizer state carried over, and the messages users meet."""
import argparse
import json
import math
from pathlib import Path

import pytest
import torch
import torchvision
from conftest import PY, ROOT, child_env, metrics, run
from torch import nn

from ddp_trainer.checkpoint.reader import read_checkpoint
from ddp_trainer.checkpoint.weights import load_weights
from ddp_trainer.commands import summary
from ddp_trainer.config import OptimConfig
from ddp_trainer.errors import CheckpointError
from ddp_trainer.training.optim import build_optimizer, carry_over_state

CLASSES = 10


def _stepped(optimizer_name: str, groups: str, classes: int = CLASSES, wrap_dp: bool = False):
    """A resnet18 and its optimizer after two real steps (momentum buffers / Adam moments exist)."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=classes)
    if groups == "timm":  # timm's param_groups_weight_decay: [no decay (ndim <= 1), decay]
        params = [{"params": [p for p in model.parameters() if p.ndim <= 1], "weight_decay": 0.0},
                  {"params": [p for p in model.parameters() if p.ndim > 1], "weight_decay": 0.05}]
    else:  # pytorch/examples, torchvision's references (no norm weight decay), Lightning: one group
        params = model.parameters()
    opt = (torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-4) if optimizer_name == "sgd"
           else torch.optim.AdamW(params, lr=1e-3))
    for _ in range(2):
        x = torch.randn(4, 3, 16, 16)
        loss = nn.functional.cross_entropy(model(x), torch.randint(0, classes, (4,)))
        opt.zero_grad()
        loss.backward()
        opt.step()
    holder = nn.DataParallel(model) if wrap_dp else model
    return model, holder, opt


def write_pytorch_examples(path: Path) -> tuple[nn.Module, torch.optim.Optimizer]:
    model, holder, opt = _stepped("sgd", "one", wrap_dp=True)  # main.py wraps in DataParallel
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=30, gamma=0.1)
    # main.py: save_checkpoint({'epoch': epoch + 1, 'arch', 'state_dict', 'best_acc1', 'optimizer', 'scheduler'})
    torch.save({"epoch": 3, "arch": "resnet18", "state_dict": holder.state_dict(), "best_acc1": torch.tensor(41.5),
                "optimizer": opt.state_dict(), "scheduler": sched.state_dict()}, path)
    return model, opt


def _averaged(model: nn.Module, decay: float, updates: int) -> torch.optim.swa_utils.AveragedModel:
    """torchvision's utils.ExponentialMovingAverage: an AveragedModel (use_buffers=True) with the EMA
    average function, updated ``updates`` times while the weights move (its state dict: ``module.*``
    keys plus the ``n_averaged`` buffer)."""
    ema = torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(decay),
                                              use_buffers=True)
    for _ in range(updates):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01)
        ema.update_parameters(model)
    with torch.no_grad():
        for p in model.parameters():
            p.sub_(0.01 * updates)
    return ema


def write_torchvision_references(path: Path, classes: int = CLASSES) -> tuple[nn.Module, torch.optim.Optimizer]:
    model, _, opt = _stepped("sgd", "one", classes=classes)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=30, gamma=0.1)
    args = argparse.Namespace(model="resnet18", lr=0.1, momentum=0.9, weight_decay=1e-4, epochs=90,
                              output_dir="out", norm_weight_decay=None, label_smoothing=0.0, batch_size=32,
                              world_size=8, model_ema=True, model_ema_steps=32, model_ema_decay=0.99998)
    # train.py --model-ema: alpha = min(1, (1 - decay) x world x batch x steps / epochs)
    ema = _averaged(model, 1.0 - min(1.0, (1 - 0.99998) * 8 * 32 * 32 / 90), updates=3)
    # train.py: checkpoint = {"model", "optimizer", "lr_scheduler", "epoch", "args", "model_ema"}; resumes at epoch + 1
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "lr_scheduler": sched.state_dict(),
                "epoch": 2, "args": args, "model_ema": ema.state_dict()}, path)
    return model, opt


def write_timm(path: Path) -> tuple[nn.Module, torch.optim.Optimizer]:
    model, _, opt = _stepped("adamw", "timm")
    args = argparse.Namespace(model="resnet18", opt="adamw", lr=1e-3, weight_decay=0.05, epochs=300,
                              model_ema=True, model_ema_decay=0.9998)
    ema = _averaged(model, 0.9998, updates=2).module  # timm's ModelEmaV3 keeps the averaged model as .module
    # CheckpointSaver._save: epoch (finished), arch, state_dict, optimizer, version 2, args, metric, and
    # with --model-ema state_dict_ema = get_state_dict(model_ema, unwrap_model): the averaged model's keys
    torch.save({"epoch": 2, "arch": "resnet18", "state_dict": model.state_dict(), "optimizer": opt.state_dict(),
                "version": 2, "args": args, "metric": 37.25, "state_dict_ema": ema.state_dict()}, path)
    return model, opt


EMA_LAYOUTS = ("torchvision_references", "timm")  # the writers above ran with --model-ema


def write_lightning(path: Path) -> tuple[nn.Module, torch.optim.Optimizer]:
    model, _, opt = _stepped("sgd", "one")  # configure_optimizers: SGD(self.parameters())
    # a LightningModule with self.model = resnet18(...): keys "model.conv1.weight", ...
    torch.save({"epoch": 2, "global_step": 90, "pytorch-lightning_version": "2.6.0",
                "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                "loops": {"fit_loop": {"epoch_progress": {"current": {"completed": 3}}}}, "callbacks": {},
                "optimizer_states": [opt.state_dict()], "lr_schedulers": [], "hparams_name": "kwargs",
                "hyper_parameters": {"lr": 0.1}}, path)
    return model, opt


WRITERS = {"pytorch_examples": write_pytorch_examples, "torchvision_references": write_torchvision_references,
           "timm": write_timm, "lightning": write_lightning}
# what each file's "epoch" means, and the epoch a resume continues in (all four: the 4th, index 3)
EPOCH = {"pytorch_examples": (3, "next epoch to run"), "torchvision_references": (2, "last finished epoch"),
         "timm": (2, "last finished epoch"), "lightning": (2, "last finished epoch")}


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, tuple[Path, nn.Module, torch.optim.Optimizer]]:
    d = tmp_path_factory.mktemp("foreign")
    out = {}
    for name, write in WRITERS.items():
        path = d / f"{name}.pth"
        model, opt = write(path)
        out[name] = (path, model, opt)
    return out


@pytest.mark.parametrize("layout", list(WRITERS))
def test_inspect_names_the_layout_and_what_its_epoch_means(files, layout):
    path, model, _ = files[layout]
    loaded = read_checkpoint(path)  # no --trust-checkpoint, argparse.Namespace included
    info = summary(loaded)
    entry, means = EPOCH[layout]
    assert info["format"] == layout and info["epoch"] == entry and info["epoch_means"] == means
    assert info["resumes_at_epoch"] == 3 and info["has_optimizer"]
    net = torchvision.models.resnet18(num_classes=CLASSES)
    load_weights(net, loaded.model, source=layout)  # Lightning's "model." stripped, "module." repaired
    for k, v in model.state_dict().items():
        assert torch.equal(net.state_dict()[k], v), k
    res = run([PY, "-m", "ddp_trainer", "inspect", str(path), "--json"])
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["epoch_means"] == means


def test_real_code_in_a_file_is_still_refused_and_named(tmp_path: Path):
    torch.save({"model": torchvision.models.resnet18().state_dict(), "loss": nn.CrossEntropyLoss()}, tmp_path / "x.pt")
    with pytest.raises(CheckpointError, match=r"holds the Python object torch\.nn\.modules\.loss\.CrossEntropyLoss"):
        read_checkpoint(tmp_path / "x.pt")
    assert read_checkpoint(tmp_path / "x.pt", trust=True).model  # and --trust-checkpoint still opens it


@pytest.mark.parametrize("layout", list(WRITERS))
def test_convert_writes_a_file_that_loads_strictly(files, layout, tmp_path: Path):
    path, model, _ = files[layout]
    out = tmp_path / "plain.pt"
    args = [PY, "-m", "ddp_trainer", "convert", str(path), str(out)]
    if layout == "lightning":  # the file names no model: without one, convert refuses instead of writing model.* keys
        refused = run(args)
        assert refused.returncode == 2 and "every key of" in refused.stderr and "starts with 'model.'" in refused.stderr
        assert not out.exists()
        args += ["--model", "resnet18"]
    res = run(args)
    assert res.returncode == 0, res.stderr
    assert "loads into resnet18" in res.stdout
    net = torchvision.models.resnet18(num_classes=CLASSES)
    net.load_state_dict(torch.load(out, weights_only=True), strict=True)
    for k, v in model.state_dict().items():
        assert torch.equal(net.state_dict()[k], v), k
    if layout == "lightning":
        stripped = tmp_path / "stripped.pt"
        for prefix in ("model.", "model"):  # with or without its dot (without: was refused with advice that failed)
            res = run([PY, "-m", "ddp_trainer", "convert", str(path), str(stripped), "--strip-prefix", prefix])
            assert res.returncode == 0, res.stderr
            torchvision.models.resnet18(num_classes=CLASSES).load_state_dict(torch.load(stripped, weights_only=True))
        wrong = run([PY, "-m", "ddp_trainer", "convert", str(path), str(tmp_path / "w.pt"), "--strip-prefix", "mod"])
        assert wrong.returncode == 2 and "--strip-prefix 'mod.': key 'model." in wrong.stderr, wrong.stderr


def test_head_of_another_class_count_points_to_init_from(tmp_path: Path):
    write_torchvision_references(tmp_path / "imagenet.pth", classes=1000)  # main.py / train.py keep the 1000-class head
    loaded = read_checkpoint(tmp_path / "imagenet.pth")
    with pytest.raises(CheckpointError, match=r"only the classifier head differs \(fc\.weight: \(1000, 512\) in the "
                                              r"checkpoint, \(10, 512\) in the model.*model\.init_from=PATH"):
        load_weights(torchvision.models.resnet18(num_classes=10), loaded.model, source="x")
    sd = {f"backbone.{k}": v for k, v in torchvision.models.resnet18(num_classes=10).state_dict().items()}
    sd["backbone.extra.weight"] = torch.zeros(1)  # a prefix, and keys that do not fit even without it
    with pytest.raises(CheckpointError, match=r"keys all start with 'backbone\.'.*--strip-prefix backbone\."):
        load_weights(torchvision.models.resnet18(num_classes=10), sd, source="x")


def _state_of(opt: torch.optim.Optimizer, p: torch.Tensor) -> dict:
    return opt.state[p]


@pytest.mark.parametrize("layout, optim_name, key", [("pytorch_examples", "sgd", "momentum_buffer"),
                                                    ("lightning", "sgd", "momentum_buffer"),
                                                    ("timm", "adamw", "exp_avg_sq")])
def test_foreign_optimizer_state_is_carried_into_our_groups(files, layout, optim_name, key):
    path, model, foreign_opt = files[layout]
    loaded = read_checkpoint(path)
    ours_model = torchvision.models.resnet18(num_classes=CLASSES)
    load_weights(ours_model, loaded.model)
    ours = build_optimizer(ours_model, OptimConfig(name=optim_name, lr=0.5))
    assert len(ours.param_groups) == 2  # decay / no decay: neither one group nor timm's order
    carried = carry_over_state(loaded.optimizer, ours, list(ours_model.parameters()))
    assert carried == len(list(ours_model.parameters()))
    for p_ours, p_theirs in zip(ours_model.parameters(), model.parameters()):
        assert torch.equal(_state_of(ours, p_ours)[key], _state_of(foreign_opt, p_theirs)[key])
    assert [g["lr"] for g in ours.param_groups] == [0.5, 0.5]  # hyperparameters from the config
    # a model whose shapes differ: nothing is carried
    other = torchvision.models.resnet34(num_classes=CLASSES)
    assert carry_over_state(loaded.optimizer, build_optimizer(other, OptimConfig(name=optim_name)),
                            list(other.parameters())) is None


@pytest.fixture(scope="module")
def data10(tmp_path_factory) -> Path:
    from ddp_trainer.data.demo import write_demo_data

    return write_demo_data(tmp_path_factory.mktemp("d10"), train_per_class=4, val_per_class=2, size=16)


def _train(*args: str):
    return run([PY, str(ROOT / "launch.py"), *args], env=child_env(), timeout=240)


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(WRITERS))
def test_resume_continues_at_the_right_epoch_with_the_optimizer_state(files, layout, data10, tmp_path: Path):
    path, _, _ = files[layout]
    optim = "adamw" if layout == "timm" else "sgd"
    out = tmp_path / "run"
    res = _train(f"data.root={data10}", f"output_dir={out}", "model.name=resnet18", "data.image_size=16",
                 "data.batch_size=8", "data.num_workers=0", "train.epochs=4", f"optim.name={optim}",
                 f"resume={path}", "train.ema_decay=0.999")
    assert res.returncode == 0, res.stderr
    assert "nothing left to train" not in res.stderr
    assert f"from {path} ({layout} format), epoch 3" in res.stderr
    assert f"{optim} optimizer state of the {layout} file carried over for 62 parameter(s)" in res.stderr
    if layout in EMA_LAYOUTS:  # the file's EMA continues (was: a new EMA, without a word)
        count = "3 updates so far, its decay 0.99818" if layout == "torchvision_references" else \
            "unknown updates so far, its decay 0.9998"
        assert f"resume: the EMA weights of the {layout} file carried over ({count}); train.ema_decay=0.999" \
            in res.stderr, res.stderr
        assert "val_loss_ema" in metrics(out)[0]
    else:
        assert f"resume: {path} holds no EMA weights; train.ema_decay starts a new EMA" in res.stderr, res.stderr
    assert [r["epoch"] for r in metrics(out)] == [3]  # exactly the one epoch left
    if layout not in ("pytorch_examples", "timm"):
        return
    wrong = _train(f"data.root={data10}", f"output_dir={tmp_path / 'run2'}", "model.name=resnet18",
                   "data.image_size=16", "data.batch_size=8", "data.num_workers=0", "train.epochs=4",
                   f"optim.name={'adamw' if optim == 'sgd' else 'sgd'}", f"resume={path}")
    assert wrong.returncode == 0 and f"optimizer state of the {layout} file skipped" in wrong.stderr


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(WRITERS))
def test_evaluate_and_init_from_every_layout(files, layout, data10, tmp_path: Path):
    path, _, _ = files[layout]
    res = run([PY, "-m", "ddp_trainer", "evaluate", "--checkpoint", str(path), "--json", f"data.root={data10}",
               "model.name=resnet18", "data.image_size=16", "data.num_workers=0"], timeout=240)
    assert res.returncode == 0, res.stderr
    row = json.loads(res.stdout.strip().splitlines()[-1])
    assert row["count"] == 20 and math.isfinite(row["val_loss"])
    init = _train(f"data.root={data10}", f"output_dir={tmp_path / 'ft'}", "model.name=resnet18", "data.image_size=16",
                  "data.batch_size=8", "data.num_workers=0", "train.epochs=1", f"model.init_from={path}")
    assert init.returncode == 0, init.stderr
    assert f"model.init_from: weights loaded from {path}" in init.stderr


def test_the_ema_weights_of_torchvision_and_timm_files_are_read_shown_and_converted(files, tmp_path: Path):
    for layout in WRITERS:
        path, model, _ = files[layout]
        loaded = read_checkpoint(path, trust=True)
        info = summary(loaded)
        if layout not in EMA_LAYOUTS:
            assert info["ema"] is None
            with pytest.raises(CheckpointError, match=f"holds no EMA weights .*the {layout} trainer's --model-ema"):
                loaded.weights(ema=True)
            continue
        raw = torch.load(path, weights_only=False)
        want = raw["model_ema"] if layout == "torchvision_references" else raw["state_dict_ema"]
        want = {k.removeprefix("module."): v for k, v in want.items() if k != "n_averaged"}
        ema = loaded.weights(ema=True)
        assert set(ema) == set(model.state_dict()) and all(torch.equal(ema[k], want[k]) for k in ema)
        assert not torch.equal(ema["fc.weight"], model.state_dict()["fc.weight"])  # the EMA, not the model
        assert info["ema"] == ("122 tensors, 3 updates, decay 0.99818 (read with --ema)" if layout != "timm"
                               else "122 tensors, unknown updates, decay 0.9998 (read with --ema)")
    path = files["torchvision_references"][0]
    res = run([PY, "-m", "ddp_trainer", "convert", str(path), str(tmp_path / "ema.pt"), "--ema"])
    assert res.returncode == 0, res.stderr  # was: "holds no EMA weights (it was trained without train.ema_decay)"
    net = torchvision.models.resnet18(num_classes=CLASSES)
    net.load_state_dict(torch.load(tmp_path / "ema.pt", weights_only=True), strict=True)
    assert torch.equal(net.state_dict()["fc.weight"], read_checkpoint(path, trust=True).weights(ema=True)["fc.weight"])
