"""The hand-written DDP loop the project is measured against (what a user would write by hand).

torchrun --standalone --nproc_per_node=2 bench/plain_ddp.py DATA_ROOT OUT_DIR EPOCHS [SEED [SCHED]]
SEED (default 0) seeds the weights and the sampler; SCHED: none (default) or cosine (per step, no warmup).
ImageFolder + DistributedSampler, torchvision resnet18, SGD, per-epoch validation (padded
DistributedSampler, as pytorch/examples does), rank-0 torch.save each epoch. Prints one JSON line
from rank 0: train images/s (train phase only), wall time, peak RSS per rank.
"""
import json
import os
import resource
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
import torchvision
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler
from torchvision import transforms

root, out, epochs = sys.argv[1], sys.argv[2], int(sys.argv[3])
seed = int(sys.argv[4]) if len(sys.argv) > 4 else 0
sched = sys.argv[5] if len(sys.argv) > 5 else "none"
t_start = time.perf_counter()
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
norm = transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
train_tf = transforms.Compose([transforms.Resize(64), transforms.RandomHorizontalFlip(), transforms.ToTensor(), norm])
val_tf = transforms.Compose([transforms.Resize(64), transforms.ToTensor(), norm])
train = torchvision.datasets.ImageFolder(os.path.join(root, "train"), train_tf)
val = torchvision.datasets.ImageFolder(os.path.join(root, "val"), val_tf)
sampler = DistributedSampler(train, shuffle=True, seed=seed)
train_loader = DataLoader(train, batch_size=64, sampler=sampler, num_workers=1, persistent_workers=True)
val_loader = DataLoader(val, batch_size=64, sampler=DistributedSampler(val, shuffle=False), num_workers=1,
                        persistent_workers=True)
torch.manual_seed(seed)
model = torch.nn.parallel.DistributedDataParallel(torchvision.models.resnet18(num_classes=len(train.classes)))
opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
total_steps = epochs * len(train_loader)
lr_at = (lambda k: 0.5 * (1 + __import__("math").cos(__import__("math").pi * k / total_steps))) if sched == "cosine" \
    else (lambda k: 1.0)
scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
train_time, images = 0.0, 0
for epoch in range(epochs):
    sampler.set_epoch(epoch)
    model.train()
    t0 = time.perf_counter()
    for x, y in train_loader:
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        scheduler.step()
        images += x.shape[0] * world
    train_time += time.perf_counter() - t0
    model.eval()
    correct = torch.zeros(3, dtype=torch.float64)
    with torch.no_grad():
        for x, y in val_loader:
            logits = model(x)
            correct += torch.tensor([(logits.argmax(1) == y).sum().item(), y.numel(),
                                     F.cross_entropy(logits, y, reduction="sum").item()], dtype=torch.float64)
    dist.all_reduce(correct)
    if rank == 0:
        os.makedirs(out, exist_ok=True)
        torch.save({"net": model.module.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch},
                   os.path.join(out, "checkpoint.pt"))
    dist.barrier()
rss = [None] * world
dist.all_gather_object(rss, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
if rank == 0:
    print(json.dumps({"images_per_s": images / train_time, "wall_s": time.perf_counter() - t_start,
                      "peak_rss_mb": rss, "val_acc": (correct[0] / correct[1]).item(),
                      "val_loss": (correct[2] / correct[1]).item()}), flush=True)
dist.destroy_process_group()
