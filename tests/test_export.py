"""ddp-trainer export (issue 32): a checkpoint to an ONNX file or a torch.export program, checked
against the PyTorch model before it is written; predict --model runs the file from its metadata.

Real onnx / onnxruntime / onnxscript (the ``export`` extra); each test that needs them skips with a
reason where they are missing. One small run (tiny_cnn_bn, 16 px, with an EMA) serves every test."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from conftest import PY, ROOT, child_env, run

from ddp_trainer import api
from ddp_trainer.checkpoint.reader import read_checkpoint
from ddp_trainer.checkpoint.weights import load_weights
from ddp_trainer.data.datasets import FolderDataset, eval_transform, scan_splits
from ddp_trainer.data.transforms import Normalize
from ddp_trainer.errors import ConfigError
from ddp_trainer.export import artifact
from ddp_trainer.models import build_model

HELPERS = ROOT / "tests" / "helpers"
NEEDS = "the export extra (pip install -e '.[export]')"


def _ort():
    for module in ("onnx", "onnxscript"):
        pytest.importorskip(module, reason=f"{module} is missing: {NEEDS}")
    return pytest.importorskip("onnxruntime", reason=f"onnxruntime is missing: {NEEDS}")


def cli(*args, env=None):
    return run([PY, "-m", "ddp_trainer", *map(str, args)], env=env)


@pytest.fixture
def trained(reference_run, small_args) -> Path:
    """best.pt of the small run with an EMA (trained once per session: reference_run)."""
    return reference_run(0, [*small_args, "train.ema_decay=0.9"]).path / "checkpoints" / "best.pt"


def _eager(checkpoint: Path, ema: bool = False):
    """The checkpoint's PyTorch model (eval, CPU), its run's config, and its val images (uint8) through
    the training pipeline's own validation transform."""
    loaded = read_checkpoint(checkpoint)
    cfg, name = api.evaluation_model(loaded, None, {})
    model = build_model(name, len(loaded.class_to_idx))
    load_weights(model, loaded.weights(ema))
    val = FolderDataset(scan_splits(cfg.data, Path(cfg.data.root)).val, eval_transform(cfg.data))
    images = torch.stack([val[i][0] for i in range(len(val))])
    return model.eval(), cfg, loaded, images, [val.index.path(i) for i in range(len(val))]


def _session(ort, path: Path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_onnx_export_is_checked_and_matches_the_model_at_batch_1_and_7_with_its_metadata(trained, tmp_path):
    ort = _ort()
    out = tmp_path / "model.onnx"
    res = cli("export", trained, out)
    assert res.returncode == 0, res.stderr
    assert "dynamo exporter" in res.stdout and "top-1 agrees on 40/40" in res.stdout, res.stdout
    assert "40 validation images" in res.stdout, res.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]  # no temporary file left
    model, cfg, loaded, images, _ = _eager(trained)
    session = _session(ort, out)
    meta = {k: json.loads(v) for k, v in session.get_modelmeta().custom_metadata_map.items()}
    assert meta["classes"] == sorted(loaded.class_to_idx, key=loaded.class_to_idx.get)
    assert (meta["image_size"], meta["mean"], meta["std"]) == (16, list(cfg.data.mean), list(cfg.data.std))
    assert (meta["epoch"], meta["metrics"]["best"], meta["exporter"]) == (loaded.epoch, loaded.get("best"), "dynamo")
    assert meta["val_crop_pct"] == cfg.data.val_crop_pct and meta["batch"] == "dynamic"
    row = [json.loads(l) for l in (trained.parents[1] / "metrics.jsonl").read_text().splitlines()][loaded.epoch]
    assert (meta["metrics"]["val_acc"], meta["metrics"]["val_loss_ema"]) == (row["val_acc"], row["val_loss_ema"])
    x = Normalize(cfg.data.mean, cfg.data.std)(images)
    for n in (1, 7):
        got = session.run(["logits"], {"input": x[:n].numpy()})[0]
        with torch.no_grad():
            want = model(x[:n]).numpy()
        assert got.shape == (n, 10)
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
        assert (got.argmax(1) == want.argmax(1)).all()


def test_preprocess_ema_export_agrees_with_the_validation_transform_and_predict_reads_the_file(trained, tmp_path):
    ort = _ort()
    out = tmp_path / "pre.onnx"
    res = cli("export", trained, out, "--ema", "--preprocess")
    assert res.returncode == 0, res.stderr
    ema_model, cfg, _, images, paths = _eager(trained, ema=True)
    plain_model = _eager(trained)[0]
    session = _session(ort, out)
    assert session.get_inputs()[0].type == "tensor(uint8)"
    got = session.run(["logits"], {"input": images.numpy()})[0]  # raw pixels: the file normalises them
    norm = Normalize(cfg.data.mean, cfg.data.std)
    with torch.no_grad():
        want, plain = ema_model(norm(images)).numpy(), plain_model(norm(images)).numpy()
    assert (got.argmax(1) == want.argmax(1)).all()
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    assert np.abs(got - plain).max() > 1e-3  # the EMA's weights, not the model's
    classes = json.loads(session.get_modelmeta().custom_metadata_map["classes"])
    pred = cli("predict", "--model", out, "--top", "1", *paths[:3])
    assert pred.returncode == 0, pred.stderr
    lines = pred.stdout.strip().splitlines()
    assert [l.split(": ")[1].split()[0] for l in lines] == [classes[i] for i in want.argmax(1)[:3]], pred.stdout


def test_exported_program_with_a_fixed_batch_reads_back_with_its_metadata(trained, tmp_path):
    out = tmp_path / "model.pt2"
    res = cli("export", trained, out, "--batch", "4", "--check", "9")
    assert res.returncode == 0, res.stderr
    assert "torch.export" in res.stdout and "top-1 agrees on 9/9" in res.stdout, res.stdout
    extra = {artifact.PT2_METADATA: ""}
    program = torch.export.load(out, extra_files=extra)
    meta = json.loads(extra[artifact.PT2_METADATA])
    assert (meta["batch"], meta["exporter"], meta["image_size"]) == (4, "torch.export", 16)
    model, cfg, _, images, _ = _eager(trained)
    x = Normalize(cfg.data.mean, cfg.data.std)(images[:4])
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), model(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fmt", ["onnx", "exported"])
def test_an_export_that_computes_otherwise_is_refused_and_leaves_nothing(fmt, demo_small, tmp_path):
    if fmt == "onnx":
        _ort()
    sys.path.insert(0, str(HELPERS))
    try:
        import export_trap  # noqa: PLC0415 - a helper module of tests/helpers, as the command loads it
    finally:
        sys.path.remove(str(HELPERS))
    checkpoint = tmp_path / "trap.pt"
    torch.save(export_trap.build(10).state_dict(), checkpoint)
    out = tmp_path / "out" / f"trap.{'onnx' if fmt == 'onnx' else 'pt2'}"
    env = child_env(PYTHONPATH=f"{ROOT}{os.pathsep}{HELPERS}")
    res = cli("export", checkpoint, out, "model.name=export_trap:build", f"data.root={demo_small}",
              "data.image_size=16", env=env)
    assert res.returncode == 2, res.stdout + res.stderr
    errors = [l for l in res.stderr.splitlines() if l.startswith("error:")]
    assert len(errors) == 1 and "export refused (nothing written)" in errors[0], res.stderr
    if fmt == "onnx":  # the dynamo exporter raised, the TorchScript one traced a constant: the check saw it
        assert "dynamo exporter (torch.onnx.export dynamo=True) raised" in errors[0], errors[0]
        assert "TorchScript-based exporter (torch.onnx.export dynamo=False): largest logit difference" in errors[0]
    assert not out.exists() and (not out.parent.exists() or not any(out.parent.iterdir()))


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small", "convnext_tiny"])
def test_torchvision_models_export_through_the_dynamo_exporter(name, tmp_path):
    """Three paths of torch's exporters: residual convolutions with BatchNorm (resnet18; resnet50 is the
    same path, deeper: bench/), depthwise convolutions with squeeze-excitation and hardswish
    (mobilenet_v3_small), LayerNorm / GELU / permutes (convnext_tiny); vit_b_16 (attention, 224 px
    only) takes 25 s: bench/export_bench.py."""
    _ort()
    model = torchvision.models.get_model(name, num_classes=5)
    for m in model.modules():  # statistics of real inputs (fresh ones make the logits about 1e-10)
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None
            m.reset_running_stats()
    with torch.no_grad():
        model.train()(torch.randn(32, 3, 32, 32, generator=torch.Generator().manual_seed(0)))
    checkpoint = tmp_path / "dp.pt"  # saved from a DataParallel wrapper: every key prefixed 'module.'
    torch.save({f"module.{k}": v for k, v in model.state_dict().items()}, checkpoint)
    res = cli("export", checkpoint, tmp_path / f"{name}.onnx", f"model.name={name}", "data.image_size=32",
              f"data.root={tmp_path / 'none'}")
    assert res.returncode == 0, res.stderr
    assert "64 random images" in res.stdout and "check (dynamo)" in res.stdout, res.stdout
    assert "by the dynamo exporter" in res.stdout and "tells nothing" not in res.stdout, res.stdout


def test_a_timm_model_exports_through_the_dynamo_exporter(tmp_path):
    """model.name=timm/NAME: the model timm builds, its state dict as convert writes it."""
    _ort()
    timm = pytest.importorskip("timm", reason="the timm extra is not installed (pip install -e '.[timm]')")
    model = timm.create_model("test_resnet.r160_in1k", pretrained=False, num_classes=5)
    for m in model.modules():  # statistics of real inputs (fresh ones make the logits tiny)
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None
            m.reset_running_stats()
    with torch.no_grad():
        model.train()(torch.randn(32, 3, 32, 32, generator=torch.Generator().manual_seed(0)))
    checkpoint = tmp_path / "timm.pt"
    torch.save(model.state_dict(), checkpoint)
    res = cli("export", checkpoint, tmp_path / "timm.onnx", "model.name=timm/test_resnet.r160_in1k",
              "data.image_size=32", f"data.root={tmp_path / 'none'}")
    assert res.returncode == 0, res.stderr
    assert "by the dynamo exporter" in res.stdout and "tells nothing" not in res.stdout, res.stdout


def test_a_foreign_trainers_checkpoint_exports_as_the_model_it_names(trained, demo_small, tmp_path):
    """torchvision's references layout: weights under 'model', the model in args.model, the last
    finished epoch; no config, so the input side comes from overrides."""
    _ort()
    foreign = tmp_path / "checkpoint.pth"
    torch.save({"model": read_checkpoint(trained).model, "optimizer": None, "epoch": 5,
                "args": argparse.Namespace(model="tiny_cnn_bn")}, foreign)
    out = tmp_path / "foreign.onnx"
    res = cli("export", foreign, out, "data.image_size=16", f"data.root={demo_small}", "--check", "8")
    assert res.returncode == 0, res.stderr
    assert "export: tiny_cnn_bn from" in res.stdout and "8 validation images" in res.stdout, res.stdout
    import onnx  # noqa: PLC0415 - present: _ort() skipped the test otherwise

    meta = {p.key: json.loads(p.value) for p in onnx.load(out).metadata_props}
    assert (meta["epoch"], meta["checkpoint_format"], meta["classes"]) == (5, "torchvision_references",
                                                                          [str(i) for i in range(10)])


def test_bad_flags_and_a_missing_package_are_one_line(trained, tmp_path, monkeypatch):
    for flag, value in (("--batch", "many"), ("--check", "0"), ("--opset", "x")):
        res = cli("export", trained, tmp_path / "m.onnx", flag, value)
        assert res.returncode == 2 and res.stderr.strip().count("\n") == 0, res.stderr
        assert res.stderr.startswith(f"error: {flag}: bad value"), res.stderr
    assert not any(tmp_path.iterdir())
    _ort()
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    res = cli("predict", "--model", junk, trained)
    assert res.returncode == 2 and res.stderr.startswith("error: --model '") and res.stderr.count("\n") == 1, res.stderr
    assert "is not an ONNX file ONNX Runtime loads" in res.stderr, res.stderr
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if not installed
    with pytest.raises(ConfigError, match=r"needs onnxruntime, which is not installed: .*pip install -e '\.\[export\]'"):
        artifact.require("onnxruntime")


def test_the_checks_rule_is_relative_to_the_largest_logit_and_forgives_only_near_ties():
    ref = np.array([[10.0, 2.0, 0.0], [1.0, 1.00005, 0.0], [0.0, 0.5, 0.2]])
    assert artifact.compare(ref, ref + 9e-4).ok  # 1e-4 x 10: allowed
    assert not artifact.compare(ref, ref + 1.1e-3).ok
    swapped = ref.copy()
    swapped[1] = [1.00005, 1.0, 0.0]  # a near-tie swapped (5e-5 apart, tolerance 1e-3): fp32 cannot order it
    verdict = artifact.compare(ref, swapped)
    assert verdict.ok and (verdict.agree, verdict.ties) == (2, 1)
    swapped[2] = [0.0, 0.2, 0.5]  # a clear top-1 changed
    assert not artifact.compare(ref, swapped).ok
    assert not artifact.compare(ref, np.full_like(ref, np.nan)).ok
    small = np.array([[1e-3, 0.0], [0.0, 2e-3]])  # logits below 1: 1e-4 absolute
    assert artifact.compare(small, small + 9e-5).ok and not artifact.compare(small, small + 2e-4).ok
    assert artifact.compare(np.zeros((2, 3)), np.zeros((2, 3))).flat
