"""The hand-written DDP loop the project is measured against (what a user would write by hand).

torchrun --standalone --nproc_per_node=2 bench/plain_ddp.py DATA_ROOT OUT_DIR EPOCHS [SEED [SCHED]]
        [--order sampler|project] [--augment flip|none|rrc] [--decode pil|tensor] [--batch 64] [--image-size 64]
        [--model resnet18|tiny_cnn]
SEED (default 0) seeds the weights and the sampler; SCHED: none (default) or cosine (per step, no warmup).
The options exist to remove one difference from the project at a time (bench/run_bench.py --what
parity): --order project visits the samples in the project's order (its seeded permutation, each
global batch split into contiguous per-rank blocks) instead of DistributedSampler's; --augment none
drops the random flip; --decode tensor feeds uint8 tensors decoded by torchvision.io and normalised
on the batch, as the project does, instead of PIL + ToTensor + Normalize. --augment rrc is
RandomResizedCrop(image size) + flip (bench/run_bench.py --what databound, on photo-sized files);
--model tiny_cnn is the project's small CNN (the model is not what that benchmark measures).
ImageFolder + DistributedSampler, torchvision resnet18, SGD, per-epoch validation (padded
DistributedSampler, as pytorch/examples does), rank-0 torch.save each epoch. Prints one JSON line
from rank 0: train images/s (train phase only), wall time, peak RSS per rank.
"""
import argparse
import json
import math
import os
import resource
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
import torchvision
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler
from torchvision import transforms

ap = argparse.ArgumentParser()
ap.add_argument("root")
ap.add_argument("out")
ap.add_argument("epochs", type=int)
ap.add_argument("seed", type=int, nargs="?", default=0)
ap.add_argument("sched", nargs="?", default="none", choices=["none", "cosine"])
ap.add_argument("--order", default="sampler", choices=["sampler", "project"])
ap.add_argument("--augment", default="flip", choices=["flip", "none", "rrc"])
ap.add_argument("--decode", default="pil", choices=["pil", "tensor"])
ap.add_argument("--batch", type=int, default=64, help="per process")
ap.add_argument("--image-size", type=int, default=64, help="Resize(size): the images are expected square")
ap.add_argument("--model", default="resnet18", choices=["resnet18", "tiny_cnn"])
a = ap.parse_args()
root, out, epochs, seed, sched = a.root, a.out, a.epochs, a.seed, a.sched
t_start = time.perf_counter()
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
flip = [transforms.RandomHorizontalFlip()] if a.augment in ("flip", "rrc") else []
geometry = ([transforms.RandomResizedCrop(a.image_size, antialias=True)] if a.augment == "rrc"
            else [transforms.Resize(a.image_size)])
val_geometry = [transforms.Resize(a.image_size), transforms.CenterCrop(a.image_size)]
if a.decode == "pil":
    norm = transforms.Normalize(MEAN, STD)
    train_tf = transforms.Compose([*geometry, *flip, transforms.ToTensor(), norm])
    val_tf = transforms.Compose([*val_geometry, transforms.ToTensor(), norm])
    loader_kw = {}
    on_batch = lambda x: x  # noqa: E731
else:
    def read(path):
        return torchvision.io.decode_image(torchvision.io.read_file(path), torchvision.io.ImageReadMode.RGB)

    train_tf = transforms.Compose([*geometry, *flip])
    val_tf = transforms.Compose(val_geometry)
    loader_kw = {"loader": read}
    scale = 1.0 / (255.0 * torch.tensor(STD).view(1, 3, 1, 1))
    shift = (torch.tensor(MEAN) / torch.tensor(STD)).view(1, 3, 1, 1)
    on_batch = lambda x: x.float() * scale - shift  # noqa: E731
train = torchvision.datasets.ImageFolder(os.path.join(root, "train"), train_tf, **loader_kw)
val = torchvision.datasets.ImageFolder(os.path.join(root, "val"), val_tf, **loader_kw)


class ProjectOrder(torch.utils.data.Sampler):
    """The project's sample order (ddp_trainer.data.samplers.EpochPlan; no accumulation; a tail shorter than
    one global batch left out, as data.drop_last=true does):
    one seeded permutation of the whole set; global batch j is positions [j*B*world, (j+1)*B*world)
    of it, and rank r takes the r-th contiguous block of B. Written out here so that this loop stays
    independent of the project's code."""

    def __init__(self, n: int, batch: int) -> None:
        self.n, self.batch, self.epoch = n, batch, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        gen = torch.Generator().manual_seed((seed * 1_000_003 + self.epoch) % (1 << 63))
        order = torch.randperm(self.n, generator=gen).tolist()
        step = self.batch * world
        for j in range(self.n // step):
            yield from order[j * step + rank * self.batch: j * step + (rank + 1) * self.batch]

    def __len__(self) -> int:
        return self.n // (self.batch * world) * self.batch


sampler = ProjectOrder(len(train), a.batch) if a.order == "project" else DistributedSampler(train, shuffle=True, seed=seed)
train_loader = DataLoader(train, batch_size=a.batch, sampler=sampler, num_workers=1, persistent_workers=True)
val_loader = DataLoader(val, batch_size=a.batch, sampler=DistributedSampler(val, shuffle=False), num_workers=1,
                        persistent_workers=True)
torch.manual_seed(seed)
if a.model == "tiny_cnn":
    from ddp_trainer.models import TinyCNN  # the same small model as the project's side; the loop stays the user's

    net = TinyCNN(len(train.classes))
else:
    net = torchvision.models.resnet18(num_classes=len(train.classes))
model = torch.nn.parallel.DistributedDataParallel(net)
opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
total_steps = epochs * len(train_loader)
lr_at = (lambda k: 0.5 * (1 + math.cos(math.pi * k / total_steps))) if sched == "cosine" else (lambda k: 1.0)
scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
train_time, images = 0.0, 0
epoch_rates, epoch_waits = [], []  # per epoch: train images/s, fraction of the train phase spent waiting for data
running = []  # rank 0's running mean train loss after each step of the epoch (the project logs the same)
for epoch in range(epochs):
    sampler.set_epoch(epoch)
    model.train()
    t0 = time.perf_counter()
    step_losses = []  # tensors, read once per epoch: no .item() sync per step in the timed loop
    epoch_images, waited = 0, 0.0
    batches = iter(train_loader)
    while True:
        t_wait = time.perf_counter()
        try:
            x, y = next(batches)
        except StopIteration:
            break
        waited += time.perf_counter() - t_wait
        loss = F.cross_entropy(model(on_batch(x)), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        scheduler.step()
        images += x.shape[0] * world
        epoch_images += x.shape[0] * world
        step_losses.append(loss.detach())
    train_time += time.perf_counter() - t0
    epoch_rates.append(epoch_images / (time.perf_counter() - t0))
    epoch_waits.append(waited / (time.perf_counter() - t0))
    loss_sum = 0.0
    for k, value in enumerate(torch.stack(step_losses).tolist()):
        loss_sum += value
        running.append([epoch, k + 1, loss_sum / (k + 1)])
    model.eval()
    correct = torch.zeros(3, dtype=torch.float64)
    with torch.no_grad():
        for x, y in val_loader:
            logits = model(on_batch(x))
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
                      "val_loss": (correct[2] / correct[1]).item(), "running_loss": running,
                      "epoch_images_per_s": epoch_rates, "epoch_data_wait": epoch_waits}), flush=True)
dist.destroy_process_group()
