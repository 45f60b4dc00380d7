"""The training recipe's optimizer and loss keys (issue 12, part 2), each against torch's own result:
train.label_smoothing, optim.nesterov, optim.lr_scale, optim.norm_weight_decay."""
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import PY, ROOT, TORCHRUN, run
from test_resume import env
from torch import nn

from ddp_trainer.config import OptimConfig, TrainConfig
from ddp_trainer.data.samplers import EpochPlan
from ddp_trainer.data.transforms import Normalize
from ddp_trainer.errors import ConfigError
from ddp_trainer.launch.dist import Dist
from ddp_trainer.launch.environment import LaunchEnv
from ddp_trainer.models import build_model
from ddp_trainer.training.engine import Engine, evaluate
from ddp_trainer.training.optim import build_optimizer, parameter_groups, scaled_lr


def _batch(n: int = 8, classes: int = 10) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, 16, 16), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, classes, (n,), generator=g)
    return images, labels, torch.ones(n)


def train(demo_small: Path, out: Path, *overrides: str, model: str = "tiny_cnn", epochs: int = 1) -> dict:
    """A one-process run on the small demo set; returns its last metrics row."""
    import json

    res = run([PY, str(ROOT / "launch.py"), f"data.root={demo_small}", f"output_dir={out}", f"model.name={model}",
               "data.image_size=16", "data.batch_size=8", "data.num_workers=0", f"train.epochs={epochs}",
               *overrides], env=env())
    assert res.returncode == 0, res.stderr
    return json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])


def test_label_smoothing_applies_to_the_training_loss_only():
    torch.manual_seed(0)
    model = build_model("tiny_cnn", 10)
    norm = Normalize([0.5] * 3, [0.25] * 3)
    images, labels, weights = _batch()
    with torch.no_grad():
        logits = model(norm(images))
    expect_train = F.cross_entropy(logits, labels, label_smoothing=0.1, reduction="sum").item()
    expect_eval = F.cross_entropy(logits, labels, reduction="sum").item()
    assert abs(expect_train - expect_eval) > 1e-3  # the two differ, so the test can tell them apart

    dist = Dist(env=LaunchEnv(), backend=None, device=torch.device("cpu"))
    result = evaluate(model, [(images, labels, weights)], norm, torch.device("cpu"), dist, 10, len(labels))
    assert result.loss == pytest.approx(expect_eval / len(labels), rel=1e-6)

    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    engine = Engine(model, optimizer, norm, torch.device("cpu"), label_smoothing=0.1)
    plan = EpochPlan(8, world=1, rank=0, batch_size=8, accum=1, seed=0, epoch=0, start=0, drop_last=True)
    list(engine.train_steps(iter([(images, labels, weights)]), plan, lambda consumed: 0.0))
    assert engine.running.loss_sum.item() == pytest.approx(expect_train, rel=1e-6)


def test_nesterov_and_its_refusals():
    model = build_model("tiny_cnn", 10)
    opt = build_optimizer(model, OptimConfig(name="sgd", nesterov=True))
    assert isinstance(opt, torch.optim.SGD) and all(g["nesterov"] for g in opt.param_groups)
    assert not any(g["nesterov"] for g in build_optimizer(model, OptimConfig(name="sgd")).param_groups)
    with pytest.raises(ConfigError, match="optim.nesterov"):
        OptimConfig(name="adamw", nesterov=True)
    with pytest.raises(ConfigError, match="optim.nesterov"):
        OptimConfig(name="sgd", momentum=0.0, nesterov=True)
    with pytest.raises(ConfigError, match="train.label_smoothing"):
        TrainConfig(label_smoothing=1.0)


def test_linear_lr_scaling():
    assert scaled_lr(OptimConfig(lr=0.1), 1024) == 0.1
    assert scaled_lr(OptimConfig(lr=0.1, lr_scale="linear"), 1024) == pytest.approx(0.4)
    assert scaled_lr(OptimConfig(lr=0.1, lr_scale="linear"), 64) == pytest.approx(0.025)


def test_warmup_start_factor_is_torchvisions_lr_warmup_decay():
    from ddp_trainer.config import SchedConfig
    from ddp_trainer.training.optim import LRSchedule

    # torchvision: LinearLR(start_factor=--lr-warmup-decay, total_iters=--lr-warmup-epochs), stepped per epoch
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.5)
    linear = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.01, total_iters=5)
    ours = LRSchedule(0.5, SchedConfig(name="none", warmup_epochs=5, warmup_start_factor=0.01), 10)
    for epoch in range(8):
        assert ours.lr(epoch) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-12), epoch
        opt.step()
        linear.step()
    assert ours.lr(2.5) == pytest.approx(0.5 * (0.01 + 0.99 * 0.5))  # and in between, per step
    today = LRSchedule(0.5, SchedConfig(name="none", warmup_epochs=5), 10)
    assert today.lr(0) == 0.0 and today.lr(1) == pytest.approx(0.1)  # the default: from 0, as before
    with pytest.raises(ConfigError, match=r"sched.warmup_start_factor: bad value 1.5; use a factor from 0"):
        SchedConfig(warmup_start_factor=1.5)


def test_norm_weight_decay_groups_match_torchvisions_split():
    model = build_model("tiny_cnn_bn", 10)
    norms = [p for m in model.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters(recurse=False)]
    biases = [p for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)) and m.bias is not None
              for p in [m.bias]]
    assert norms and biases
    default = parameter_groups(model, OptimConfig(weight_decay=0.05))
    assert {id(p) for p in default[1]["params"]} == {id(p) for p in norms + biases}  # today: no decay on 1-D
    assert default[1]["weight_decay"] == 0.0
    tv = parameter_groups(model, OptimConfig(weight_decay=0.05, norm_weight_decay=0.0))
    assert {id(p) for p in tv[1]["params"]} == {id(p) for p in norms} and tv[1]["weight_decay"] == 0.0
    assert {id(p) for p in biases} <= {id(p) for p in tv[0]["params"]} and tv[0]["weight_decay"] == 0.05
    assert len(tv[0]["params"]) + len(tv[1]["params"]) == len(list(model.parameters()))


def test_a_run_with_the_recipe_keys_trains_and_saves_them(demo_small: Path, tmp_path: Path):
    out = tmp_path / "run"
    res = run([PY, str(ROOT / "launch.py"), f"data.root={demo_small}", f"output_dir={out}", "model.name=tiny_cnn_bn",
               "data.image_size=16", "data.batch_size=8", "data.num_workers=0", "train.epochs=1", "optim.name=sgd",
               "optim.lr=0.1", "optim.lr_scale=linear", "optim.nesterov=true", "optim.norm_weight_decay=0.0",
               "train.label_smoothing=0.1"], env=env())
    assert res.returncode == 0, res.stderr
    assert "optim.lr_scale=linear: lr 0.1 x global batch 8 / 256 = 0.003125" in res.stderr
    state = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    groups = state["optimizer"]["param_groups"]
    assert all(g["nesterov"] for g in groups) and [g["weight_decay"] for g in groups] == [0.05, 0.0]


# -- geometry: data.val_crop_pct, data.interpolation, data.rrc_scale / rrc_ratio ----------------------

@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
def test_val_crop_pct_equals_torchvisions_resize_then_center_crop(mode):
    from torchvision.transforms import v2

    from ddp_trainer.config import DataConfig
    from ddp_trainer.data.datasets import eval_transform

    g = torch.Generator().manual_seed(1)
    img = torch.randint(0, 256, (3, 37, 53), dtype=torch.uint8, generator=g)  # odd, non-square
    cfg = DataConfig(image_size=24, val_crop_pct=0.875, interpolation=mode)
    assert cfg.val_resize == int(24 / 0.875) == 27
    ref = v2.Compose([v2.Resize(27, interpolation=v2.InterpolationMode(mode), antialias=True), v2.CenterCrop(24)])
    assert torch.equal(eval_transform(cfg)(img, None), ref(img))
    plain = DataConfig(image_size=24, interpolation=mode)  # 1.0: today's geometry, Resize(24) + CenterCrop(24)
    ref_plain = v2.Compose([v2.Resize(24, interpolation=v2.InterpolationMode(mode), antialias=True), v2.CenterCrop(24)])
    assert torch.equal(eval_transform(plain)(img, None), ref_plain(img))
    square = torch.randint(0, 256, (3, 24, 24), dtype=torch.uint8, generator=g)
    assert not torch.equal(eval_transform(cfg)(square, None), square)  # cropped even when already 24 square
    assert torch.equal(eval_transform(plain)(square, None), square)


def test_rrc_scale_and_ratio_bound_the_crops():
    from ddp_trainer.config import DataConfig
    from ddp_trainer.data.datasets import train_transform

    tf = train_transform(DataConfig(image_size=16, augment=["random_resized_crop"], rrc_scale=[0.3, 0.4],
                                    rrc_ratio=[0.9, 1.1]))
    img = torch.zeros(3, 200, 200, dtype=torch.uint8)
    for seed in range(100):
        top, left, h, w = tf.crop_box(img.shape[-2], img.shape[-1], torch.Generator().manual_seed(seed))
        assert 0.3 - 0.01 <= h * w / 200 ** 2 <= 0.4 + 0.01
        assert 0.9 - 0.02 <= w / h <= 1.1 + 0.02
    with pytest.raises(ConfigError, match="data.rrc_scale"):
        DataConfig(rrc_scale=[0.5, 0.2])
    with pytest.raises(ConfigError, match="data.val_crop_pct"):
        DataConfig(val_crop_pct=1.5)


def test_train_image_size_crops_training_images_and_leaves_validation_at_image_size():
    from ddp_trainer.config import DataConfig
    from ddp_trainer.data.datasets import eval_transform, train_transform

    cfg = DataConfig(image_size=24, train_image_size=16, augment=["flip", "random_resized_crop"], val_crop_pct=0.8)
    img = torch.randint(0, 256, (3, 40, 50), dtype=torch.uint8)
    assert train_transform(cfg)(img, torch.Generator().manual_seed(0)).shape == (3, 16, 16)  # torchvision: 176
    assert eval_transform(cfg)(img, None).shape == (3, 24, 24)  # torchvision: 224 from a resize of 232 (here 30)
    assert (cfg.train_size, cfg.train_cache_size, cfg.val_resize) == (16, 19, 30)
    assert DataConfig(image_size=24).train_size == 24
    with pytest.raises(ConfigError, match="data.cache_size: bad value 12; use at least the training side .16."):
        DataConfig(image_size=24, train_image_size=16, cache_size=12)


def test_val_crop_pct_with_the_decoded_cache_validates_the_same_images(demo_small: Path, tmp_path: Path):
    # training at 12 px, validating at 16 from a resize of 20: each split's geometry, from files or the cache
    base = [PY, str(ROOT / "launch.py"), f"data.root={demo_small}", "model.name=tiny_cnn", "data.image_size=16",
            "data.train_image_size=12", "data.batch_size=8", "data.num_workers=0", "train.epochs=1",
            "data.val_crop_pct=0.8", "data.interpolation=bicubic"]
    rows = []
    for cache in ("none", "decoded"):
        res = run([*base, f"output_dir={tmp_path / cache}", f"data.cache={cache}",
                   f"data.cache_dir={tmp_path / 'cache'}"], env=env())
        assert res.returncode == 0, res.stderr
        rows.append(__import__("json").loads((tmp_path / cache / "metrics.jsonl").read_text().splitlines()[-1]))
    assert rows[0]["val_loss"] == rows[1]["val_loss"] and rows[0]["val_acc"] == rows[1]["val_acc"]
    names = sorted(p.name for p in (tmp_path / "cache").iterdir())
    plain = run([*base[:-2], f"output_dir={tmp_path / 'plain'}", "data.cache=decoded",
                 f"data.cache_dir={tmp_path / 'cache'}"], env=env())
    assert plain.returncode == 0, plain.stderr
    assert len(list((tmp_path / "cache").iterdir())) > len(names)  # another geometry: other cache files


# -- train.ema_decay ----------------------------------------------------------------------------------

def _train_steps(model, steps: int, after_each) -> None:
    """``steps`` SGD steps of ``model`` on the fixed batch, calling ``after_each()`` after each."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    norm = Normalize([0.5] * 3, [0.25] * 3)
    for _ in range(steps):
        images, labels, _ = _batch()
        opt.zero_grad()
        F.cross_entropy(model(norm(images)), labels).backward()
        opt.step()
        after_each()


def test_ema_follows_the_formula_of_an_averaged_model_updated_by_hand():
    from ddp_trainer.checkpoint.registry import SaveContext
    from ddp_trainer.training.ema import WeightEMA

    torch.manual_seed(0)
    model = build_model("tiny_cnn_bn", 10)
    ema = WeightEMA(model, 0.9)
    by_hand = {}

    def update():
        ema.update(model)
        now = {k: v.detach().clone().double() for k, v in model.state_dict().items()}
        by_hand.update(now if not by_hand else {k: 0.9 * by_hand[k] + 0.1 * now[k] for k in now})

    _train_steps(model, 4, update)
    got = ema.module.state_dict()
    for k, v in by_hand.items():
        if v.is_floating_point() and "num_batches" not in k:
            assert torch.allclose(got[k].double(), v, rtol=1e-5, atol=1e-6), k
    assert ema.save(SaveContext())["n_averaged"] == 4


def test_ema_equals_torchs_averaged_model_bitwise_without_a_tensor_counter():
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    from ddp_trainer.training.ema import WeightEMA

    torch.manual_seed(0)
    model = build_model("tiny_cnn_bn", 10)
    ours = WeightEMA(model, 0.9)
    torchs = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True)
    _train_steps(model, 5, lambda: (ours.update(model), torchs.update_parameters(model)))
    a, b = ours.module.state_dict(), torchs.module.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in b)
    assert isinstance(ours.n_averaged, int) and ours.n_averaged == int(torchs.n_averaged) == 5


def test_ema_every_n_steps_with_torchvisions_decay_and_warmup_copy():
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    from ddp_trainer.training.ema import WeightEMA, ema_schedule

    # torchvision's recipe: --model-ema-steps 32 --model-ema-decay 0.99998, 8 GPUs x 128, 600 epochs
    decay, copy_before = ema_schedule(0.99998, 32, "torchvision", 8 * 128, 600, 5.0)
    assert decay == pytest.approx(1 - (1 - 0.99998) * 8 * 128 * 32 / 600, rel=1e-12) and copy_before == 5.0
    assert ema_schedule(0.99998, 32, "none", 8 * 128, 600, 5.0) == (0.99998, 0.0)  # the decay as given
    assert ema_schedule(0.9, 32, "torchvision", 1024, 10, 0.0)[0] == 0.0  # alpha capped at 1

    # torchvision's loop: update_parameters every N-th step; in a warmup epoch, n_averaged.fill_(0) after it
    torch.manual_seed(0)
    model = build_model("tiny_cnn_bn", 10)
    ours = WeightEMA(model, 0.9, every_steps=3, copy_before_epoch=1.0)
    torchs = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True)
    steps = iter(range(1, 100))

    def after_step(epoch: int):
        step = next(steps)
        ours.after_step(model, step, epoch)
        if step % 3 == 0:
            torchs.update_parameters(model)
            if epoch < 1:
                torchs.n_averaged.fill_(0)

    _train_steps(model, 4, lambda: after_step(0))  # the warmup epoch: one update, a copy, then reset
    assert ours.n_averaged == 0 and all(torch.equal(a, b) for a, b in
                                        zip(ours.module.state_dict().values(), torchs.module.state_dict().values()))
    _train_steps(model, 8, lambda: after_step(1))
    a, b = ours.module.state_dict(), torchs.module.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in b) and ours.n_averaged == int(torchs.n_averaged) == 3
    assert not torch.equal(a["fc.weight"], model.state_dict()["fc.weight"])  # an average now, not a copy
    with pytest.raises(ConfigError, match="train.ema_every_steps: bad value 0"):
        TrainConfig(ema_every_steps=0)


def test_flip_tta_validates_on_the_mean_logits_of_each_image_and_its_mirror():
    torch.manual_seed(0)
    model = build_model("tiny_cnn", 10).eval()
    norm = Normalize([0.5] * 3, [0.25] * 3)
    images, labels, _ = _batch(16)
    dist = Dist.single()
    plain = evaluate(model, [(images, labels, None)], norm, torch.device("cpu"), dist, 10, 16)
    flip = evaluate(model, [(images, labels, None)], norm, torch.device("cpu"), dist, 10, 16, tta="flip")
    with torch.no_grad():
        x = norm(images)
        mean = (model(x) + model(x.flip(-1))) / 2
    assert flip.loss == pytest.approx(F.cross_entropy(mean, labels).item(), rel=1e-6)
    assert flip.acc == (mean.argmax(1) == labels).float().mean().item()
    assert plain.loss == pytest.approx(F.cross_entropy(model(x), labels).item(), rel=1e-6)
    assert flip.loss != plain.loss and flip.count == plain.count == 16


def test_ema_is_validated_saved_monitored_and_evaluated(demo_small: Path, tmp_path: Path):
    import json

    out = tmp_path / "run"
    train(demo_small, out, "train.ema_decay=0.9", "checkpoint.monitor=val_acc_ema", "checkpoint.mode=max",
          "train.val_tta=flip", model="tiny_cnn_bn", epochs=2)
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert all("val_loss_ema" in r and "val_acc_ema" in r for r in rows)
    assert rows[-1]["val_loss_ema"] != rows[-1]["val_loss"]
    state = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert state["model_ema"]["n_averaged"] == state["step"]

    def evaluate(*extra: str) -> dict:
        r = run([PY, "-m", "ddp_trainer", "evaluate", "--checkpoint", str(out / "checkpoints" / "last.pt"),
                 "--json", *extra], env=env())
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout.strip().splitlines()[-1])

    # the run validated with train.val_tta=flip: evaluate's default is the run's, --tta none the plain one
    assert evaluate("--ema")["val_loss"] == pytest.approx(rows[-1]["val_loss_ema"], rel=1e-9)
    assert evaluate()["val_loss"] == pytest.approx(rows[-1]["val_loss"], rel=1e-9)
    assert evaluate("--tta", "none")["val_loss"] != pytest.approx(rows[-1]["val_loss"], rel=1e-6)
    plain = tmp_path / "plain.pt"
    conv = run([PY, "-m", "ddp_trainer", "convert", str(out / "checkpoints" / "last.pt"), str(plain), "--ema"],
               env=env())
    assert conv.returncode == 0, conv.stderr
    weights = torch.load(plain, weights_only=True)
    assert all(torch.equal(weights[k], v) for k, v in state["model_ema"]["weights"].items())

    refused = run([PY, str(ROOT / "launch.py"), f"data.root={demo_small}", f"output_dir={tmp_path / 'x'}",
                   "checkpoint.monitor=val_acc_ema"], env=env())
    assert refused.returncode == 2 and "set train.ema_decay too" in refused.stderr


@pytest.mark.slow
def test_a_mid_epoch_checkpoint_with_the_recipe_on_resumes_model_and_ema_bitwise(demo_small: Path, tmp_path: Path):
    # the subject is the recipe's state in a mid-epoch checkpoint (EMA, warmup, mixing), not the kill:
    # resume from the first mid-epoch state the uninterrupted run saved
    from conftest import kept_mid_epoch
    from test_resume import resume_args

    recipe = ["train.ema_decay=0.999", "train.ema_every_steps=2", "train.ema_decay_adjust=torchvision",
              "sched.warmup_epochs=1", "sched.warmup_start_factor=0.01",
              "train.label_smoothing=0.1", "optim.name=sgd", "optim.nesterov=true",
              "optim.lr_scale=linear", "optim.norm_weight_decay=0.0", "data.val_crop_pct=0.875",
              "data.interpolation=bicubic", "data.rrc_scale=[0.3,1.0]",
              "data.augment=[flip,random_resized_crop,trivialaugment,random_erasing]", "data.mixup_alpha=0.2",
              "data.cutmix_alpha=1.0", "model.weights=null"]
    ref, out, kept = tmp_path / "ref", tmp_path / "run", tmp_path / "kept"
    kept.mkdir()
    res = run([*TORCHRUN, "--standalone", "--nproc_per_node=2", str(ROOT / "launch.py"),
               *resume_args(demo_small, ref), *recipe], env=env(SLOW_MODEL_SLEEP="0", FAULT_KEEP_CHECKPOINTS=str(kept)))
    assert res.returncode == 0, res.stderr
    state = kept_mid_epoch(kept, out)
    res = run([*TORCHRUN, "--standalone", "--nproc_per_node=2", str(ROOT / "launch.py"),
               *resume_args(demo_small, out), *recipe], env=env(SLOW_MODEL_SLEEP="0"))
    assert res.returncode == 0, res.stderr
    assert f"{state['position']} samples into the epoch" in res.stderr
    a = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(ref / "checkpoints" / "last.pt", weights_only=True)
    for part in ("model", ):
        assert all(torch.equal(a[part][k], b[part][k]) for k in b[part]), part
    assert all(torch.equal(a["model_ema"]["weights"][k], b["model_ema"]["weights"][k]) for k in b["model_ema"]["weights"])
    assert a["model_ema"]["n_averaged"] == b["model_ema"]["n_averaged"]


# -- model.weights ------------------------------------------------------------------------------------

def test_pretrained_weights_come_from_the_hub_cache_or_a_message_saying_how(demo_small: Path, tmp_path: Path):
    import torchvision

    home = tmp_path / "torch_home"
    args = [PY, str(ROOT / "launch.py"), f"data.root={demo_small}", "model.name=resnet18", "model.weights=DEFAULT",
            "data.image_size=16", "data.batch_size=8", "data.num_workers=0", "train.epochs=1", "optim.lr=1e-9"]
    missing = run([*args, f"output_dir={tmp_path / 'a'}"], env=env(TORCH_HOME=str(home)))
    assert missing.returncode == 2, missing.stderr
    (line,) = [l for l in missing.stderr.splitlines() if "error:" in l]
    assert "'resnet18-f37072fd.pth' (ResNet18_Weights.IMAGENET1K_V1)" in line and str(home / "hub" / "checkpoints") in line
    assert "https://download.pytorch.org/models/resnet18-f37072fd.pth" in line and "never downloads" in line
    shown = run([PY, "-m", "ddp_trainer", "weights", "resnet18"], env=env(TORCH_HOME=str(home)))
    assert shown.returncode == 0 and "resnet18-f37072fd.pth" in shown.stdout and "(missing)" in shown.stdout

    # the file torchvision would have downloaded: a 1000-class resnet18 state dict under that name
    torch.manual_seed(5)
    imagenet = torchvision.models.resnet18(weights=None).state_dict()
    (home / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(imagenet, home / "hub" / "checkpoints" / "resnet18-f37072fd.pth")
    res = run([*args, f"output_dir={tmp_path / 'b'}", "optim.name=sgd", "optim.momentum=0", "optim.weight_decay=0"],
              env=env(TORCH_HOME=str(home)))
    assert res.returncode == 0, res.stderr
    assert "model.weights=DEFAULT: ResNet18_Weights.IMAGENET1K_V1 from" in res.stderr
    assert "classifier head fc. left new" in res.stderr
    trained = torch.load(tmp_path / "b" / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert trained["fc.weight"].shape == (10, 512)
    conv = trained["conv1.weight"]
    assert torch.allclose(conv, imagenet["conv1.weight"], atol=1e-6)  # lr 1e-9: still the loaded weights
    assert not torch.equal(torchvision.models.resnet18(weights=None).state_dict()["conv1.weight"], conv)


# -- augmentation policies ----------------------------------------------------------------------------

@pytest.mark.parametrize("policy", ["trivialaugment", "randaugment", "autoaugment"])
def test_policies_are_torchvisions_on_the_samples_own_numbers(policy):
    from torchvision.transforms import v2

    from ddp_trainer.config import DataConfig
    from ddp_trainer.data.datasets import train_transform

    tf = train_transform(DataConfig(image_size=24, augment=[policy, "random_erasing"], random_erasing_p=0.5,
                                    mean=[0.5, 0.25, 0.0]))
    g = torch.Generator().manual_seed(0)
    img = torch.randint(0, 256, (3, 24, 24), dtype=torch.uint8, generator=g)
    outs = []
    for global_seed in (1, 2):  # the global generator's state does not matter...
        torch.manual_seed(global_seed)
        outs.append(tf(img, torch.Generator().manual_seed(11)))
        after = torch.rand(1)
        torch.manual_seed(global_seed)
        assert torch.equal(after, torch.rand(1))  # ... and is left as it was
    assert torch.equal(outs[0], outs[1])
    assert any(not torch.equal(tf(img, torch.Generator().manual_seed(s)), outs[0]) for s in range(12, 20))
    # the same as torchvision's transforms, run by hand on the numbers the sample's generator gives
    sample = torch.Generator().manual_seed(11)
    bilinear = v2.InterpolationMode.BILINEAR
    ref = {"trivialaugment": v2.TrivialAugmentWide(interpolation=bilinear),
           "randaugment": v2.RandAugment(interpolation=bilinear), "autoaugment": v2.AutoAugment(interpolation=bilinear)}[policy]
    x = img
    for t in (ref, v2.RandomErasing(p=0.5, value=[128, 64, 0])):
        child = int(torch.randint(0, 2 ** 62, (1,), generator=sample))
        torch.manual_seed(child)
        x = t(x)
    assert torch.equal(x, outs[0])
    with pytest.raises(ConfigError, match="at most one"):
        DataConfig(augment=["trivialaugment", "autoaugment"])


def test_a_run_with_a_policy_is_the_same_for_any_num_workers(demo_small: Path, tmp_path: Path):
    policy = "data.augment=[random_resized_crop,flip,trivialaugment,random_erasing]"
    rows = [train(demo_small, tmp_path / f"w{w}", policy, f"data.num_workers={w}") for w in (0, 2)]
    assert rows[0]["train_loss"] == rows[1]["train_loss"] and rows[0]["val_loss"] == rows[1]["val_loss"]


# -- mixup / cutmix -----------------------------------------------------------------------------------

def test_mixed_batches_have_soft_targets_reproducible_from_the_seed():
    from torchvision.transforms import v2

    from ddp_trainer.data.mixing import BatchMixer

    g = torch.Generator().manual_seed(0)
    images = torch.randn(8, 3, 16, 16, generator=g)
    labels = torch.randint(0, 10, (8,), generator=g)
    mixer = BatchMixer(10, mixup_alpha=0.2, cutmix_alpha=1.0, seed=3, rank=0)
    torch.manual_seed(1)
    before = torch.get_rng_state()
    x, soft = mixer(images, labels, step=5, micro=0)
    assert torch.equal(torch.get_rng_state(), before)  # the global generator is untouched
    assert soft.shape == (8, 10) and torch.allclose(soft.sum(1), torch.ones(8))
    assert not torch.equal(x, images)
    again = mixer(images, labels, step=5, micro=0)
    assert torch.equal(again[0], x) and torch.equal(again[1], soft)
    assert not torch.equal(mixer(images, labels, step=6, micro=0)[1], soft)
    assert not torch.equal(BatchMixer(10, 0.2, 1.0, seed=3, rank=1)(images, labels, 5, 0)[1], soft)
    torch.manual_seed(mixer.seed_of(5, 0))  # torchvision's own transforms, by hand, on the same numbers
    ref = v2.RandomChoice([v2.MixUp(alpha=0.2, num_classes=10), v2.CutMix(alpha=1.0, num_classes=10)])
    rx, rsoft = ref(images, labels)
    assert torch.equal(rx, x) and torch.equal(rsoft, soft)


def test_a_run_with_mixup_and_cutmix_trains_on_soft_targets(demo_small: Path, tmp_path: Path):
    mixed = train(demo_small, tmp_path / "run", "data.mixup_alpha=0.2", "data.cutmix_alpha=1.0",
                  "train.label_smoothing=0.1")
    unmixed = train(demo_small, tmp_path / "plain", "train.label_smoothing=0.1")
    assert mixed["train_loss"] != unmixed["train_loss"]  # the mixed batches reached the loss


# -- checkpoint.keep_best -----------------------------------------------------------------------------

def test_keep_best_keeps_the_k_best_epochs_across_a_resume(demo_small: Path, tmp_path: Path):
    import json

    out = tmp_path / "run"
    ck = out / "checkpoints"

    def check(epochs: int) -> None:
        rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
        assert [r["epoch"] for r in rows] == list(range(epochs))
        best3 = sorted(rows, key=lambda r: r["val_loss"])[:3]
        assert sorted(p.name for p in ck.glob("best_epoch_*.pt")) == sorted(
            f"best_epoch_{r['epoch']:04d}.pt" for r in best3)
        for r in best3:
            state = torch.load(ck / f"best_epoch_{r['epoch']:04d}.pt", weights_only=True)
            assert state["epoch"] == r["epoch"] and state["best_k"][0][0] <= r["val_loss"]
        assert torch.load(ck / "best.pt", weights_only=True)["epoch"] == best3[0]["epoch"]

    keys = ["checkpoint.keep_best=3", "checkpoint.keep_last=1", "optim.lr=0.01"]
    train(demo_small, out, *keys, epochs=5)
    check(5)
    train(demo_small, out, *keys, epochs=9)  # resume=auto: the ranking continues from the checkpoint
    check(9)


# -- configs/recipes ----------------------------------------------------------------------------------

@pytest.mark.parametrize("recipe", ["torchvision_resnet50", "finetune_small"])  # timm_rsb_*: test_timm_recipes.py
def test_recipe_configs_load_and_run_a_debug_pass(recipe: str, demo_small: Path, tmp_path: Path):
    import torchvision

    from ddp_trainer import config

    path = ROOT / "configs" / "recipes" / f"{recipe}.yaml"
    cfg = config.load(str(path), [])
    assert cfg.data.augment
    assert cfg.optim.norm_weight_decay == 0.0 and cfg.train.label_smoothing == 0.1
    if recipe == "torchvision_resnet50":
        assert (cfg.data.sampler, cfg.data.ra_repeats, cfg.data.train_image_size) == ("repeated_augment", 4, 176)
    home = tmp_path / "torch_home"
    if cfg.model.weights:  # the pretrained file, as the hub cache would hold it
        (home / "hub" / "checkpoints").mkdir(parents=True)
        torch.save(torchvision.models.get_model(cfg.model.name, weights=None).state_dict(),
                   home / "hub" / "checkpoints" / "resnet18-f37072fd.pth")
    res = run([PY, str(ROOT / "launch.py"), "--debug", "--config", str(path), f"data.root={demo_small}",
               f"output_dir={tmp_path / 'run'}", "data.image_size=32", "data.train_image_size=24", "data.batch_size=4",
               "train.precision=fp32", "debug.epochs=1"],
              env=env(TORCH_HOME=str(home)), timeout=600)
    assert res.returncode == 0, res.stderr
    assert "done: val_loss=" in res.stderr


def test_two_processes_equal_one_with_the_double_batch_with_the_recipe_on(demo_small: Path, tmp_path: Path):
    """Every recipe key but mixup/cutmix (they pair samples within a rank's batch): per-sample
    augmentation seeds, the EMA, label smoothing and the optimizer keys leave DDP equal to one process."""
    keys = [f"data.root={demo_small}", "model.name=tiny_cnn", "data.image_size=16", "data.num_workers=0",
            "train.epochs=2", "optim.name=sgd", "optim.lr=0.5", "optim.nesterov=true", "optim.lr_scale=linear",
            "optim.norm_weight_decay=0.0", "train.label_smoothing=0.1", "train.ema_decay=0.8",
            "data.augment=[random_resized_crop,flip,trivialaugment,random_erasing]", "data.random_erasing_p=0.5",
            "data.val_crop_pct=0.875", "seed=4"]
    one, two = tmp_path / "one", tmp_path / "two"
    res = run([PY, str(ROOT / "launch.py"), *keys, f"output_dir={one}", "data.batch_size=16"], env=env())
    assert res.returncode == 0, res.stderr
    res = run([*TORCHRUN, "--standalone", "--nproc_per_node=2", str(ROOT / "launch.py"), *keys, f"output_dir={two}",
               "data.batch_size=8"], env=env())
    assert res.returncode == 0, res.stderr
    a = torch.load(one / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(two / "checkpoints" / "last.pt", weights_only=True)
    assert a["step"] == b["step"] > 0
    for part in (a["model"], a["model_ema"]["weights"]):
        other = b["model"] if part is a["model"] else b["model_ema"]["weights"]
        for k in part:
            assert torch.allclose(part[k], other[k], rtol=1e-4, atol=1e-5), k
    init = build_model("tiny_cnn", 10)
    assert not torch.allclose(a["model"]["fc.weight"], init.state_dict()["fc.weight"])
