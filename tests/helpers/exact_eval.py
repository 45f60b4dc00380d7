"""Evaluate a checkpoint's weights on a val folder with the project's exact sampler, then with a
padding DistributedSampler in its place. Prints one JSON line from rank 0.

Usage (under torchrun): exact_eval.py WEIGHTS DATA_ROOT MODEL IMAGE_SIZE
"""
import json
import os
import sys

import torch
from torch.utils.data.distributed import DistributedSampler

from ddp_trainer.config import load
from ddp_trainer.data.datasets import FolderDataset, build_splits, eval_transform
from ddp_trainer.data.loaders import make_eval_loader
from ddp_trainer.data.transforms import Normalize
from ddp_trainer.launch.dist import process_group
from ddp_trainer.launch.environment import resolve
from ddp_trainer.models import build_model
from ddp_trainer.training.engine import CountMismatch, evaluate

weights, root, model_name, size = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
env = resolve(os.environ)
cfg = load(None, [f"data.root={root}", f"data.image_size={size}", "data.batch_size=4", "data.num_workers=1"])
with process_group(env, "gloo" if env.world_size > 1 else None, torch.device("cpu"), 60) as dist:
    splits = build_splits(cfg, dist)
    model = build_model(model_name, len(splits.classes))
    model.load_state_dict(torch.load(weights, weights_only=True))
    val = FolderDataset(splits.val, eval_transform(cfg.data))
    norm = Normalize(cfg.data.mean, cfg.data.std)
    exact = evaluate(model, make_eval_loader(val, cfg.data, dist, dist.device), norm, dist.device, dist,
                     len(splits.classes), len(val))
    padding = DistributedSampler(val, num_replicas=dist.world_size, rank=dist.rank, shuffle=False)
    try:
        evaluate(model, make_eval_loader(val, cfg.data, dist, dist.device, sampler=padding), norm, dist.device,
                 dist, len(splits.classes), len(val))
        padded = "no error"
    except CountMismatch as exc:
        padded = str(exc)
    if dist.is_main:
        print(json.dumps({"loss": exact.loss, "acc": exact.acc, "count": exact.count, "padded": padded,
                          "world": dist.world_size}))
