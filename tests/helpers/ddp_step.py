"""Run optimizer steps of the real Engine on fixed in-memory data; save the parameters (rank 0).

Usage (under torchrun or alone): ddp_step.py OUT BATCH ACCUM STEPS
Also records how many gradient all-reduces DDP issued (a communication hook counts them).
"""
import json
import os
import sys

import torch

from ddp_trainer.data.samplers import EpochPlan
from ddp_trainer.data.transforms import Normalize
from ddp_trainer.launch.dist import process_group
from ddp_trainer.launch.environment import resolve
from ddp_trainer.launch.mode import decide_mode, unwrap, wrap
from ddp_trainer.models import TinyCNN
from ddp_trainer.training.engine import Engine

out, batch, accum, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
env = resolve(os.environ)
decision = decide_mode("auto", "auto", env.world_size, env.local_world_size, 0)
with process_group(env, decision.backend, torch.device("cpu"), 60) as dist:
    g = torch.Generator().manual_seed(1)
    n = 64
    images = torch.randint(0, 256, (n, 3, 16, 16), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, 5, (n,), generator=g)
    torch.manual_seed(0)
    model = TinyCNN(5, batchnorm=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model = wrap(model, decision, dist.device)
    calls = [0]
    if dist.active:
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import (
            allreduce_hook,
        )

        def counting_hook(state, bucket):
            calls[0] += 1
            return allreduce_hook(state, bucket)

        model.register_comm_hook(None, counting_hook)
    engine = Engine(model, opt, Normalize([0.5] * 3, [0.25] * 3), dist.device)
    plan = EpochPlan(n, world=dist.world_size, rank=dist.rank, batch_size=batch, accum=accum, seed=0, epoch=0,
                     max_steps=steps)

    def batches():
        for mb in plan.micro_batches():
            idx = torch.tensor([k.index for k in mb])
            yield images[idx], labels[idx], torch.tensor([k.weight for k in mb], dtype=torch.float32)

    done = list(engine.train_steps(batches(), plan, lambda consumed: 0.1))
    if dist.is_main:
        torch.save(unwrap(model).state_dict(), out)
        with open(out + ".json", "w") as f:
            json.dump({"steps": len(done), "allreduce_calls": calls[0], "world": dist.world_size}, f)
    # let go of DDP (its reducer holds the process group and this helper's Python hook) while the
    # interpreter runs: destroyed during interpreter shutdown instead, it aborted 4 runs in 20
    del engine, model, done
    __import__("gc").collect()
