"""Benchmarks on the reference workload. Prints every figure and the ratios; asserts nothing.

    python bench/run_bench.py [--repeats 3] [--what train,loader,checkpoint,accuracy,parity,samplers,databound,stages,timm]
                              [--data DIR]
                              [--seeds 5] [--setting reference|long] [--sides project,plain]
                              [--plain-options '--order project --decode tensor'] [--project-options '...']

Reference workload: 10 classes of 64x64 JPEG images (quality 90), 256 train + 64 val per class;
torchvision resnet18; SGD lr 0.1, momentum 0.9, weight decay 5e-4; batch 64 per process; 1 loader
worker per process; resize to 64, random horizontal flip, normalize; 3 epochs with validation and a
checkpoint every epoch; 2 processes with OMP_NUM_THREADS=1.

train:      the project (torchrun launch.py) and bench/plain_ddp.py, alternately, --repeats times each:
            median train images/s, ratio, peak RSS per process.
accuracy:   both sides at identical settings (the project with weight decay on every parameter, as the
            plain loop; no warmup) for --seeds seeds: mean, spread and standard deviation of the final
            val_acc and val_loss, and the difference of the means. --setting reference (the workload
            above) or long (10 epochs, cosine per step). --sides runs one side only; --plain-options
            gives the plain loop the project's sample order and/or decoder (see bench/plain_ddp.py);
            --project-options adds project overrides (to measure one of its defaults).
parity:     the two sides made to compute the same thing (no augmentation, the project's sample order
            and decode path in the plain loop, weight decay on every parameter, no warmup), then one
            difference put back at a time: the train-loss curves (rank 0's running mean, every step)
            and the final val_acc / val_loss of each pair, seed 0, reference workload.
samplers:   the project on the reference workload for --seeds seeds with data.sampler=plan and
            repeated_augment, and on an imbalanced copy of its training set (one class keeps its 256
            images, the nine others 26 each: 10x fewer; validation stays balanced, so val_acc is the
            mean per-class accuracy) with plan and class_balanced: val_acc, val_loss, train images/s.
            The imbalanced set (490 images, 3 steps per epoch) trains 10 epochs at lr 0.01: at the
            reference's 3 epochs and lr 0.1 it diverges (val_acc 0.10, chance, for either sampler).
databound:  photo-sized files, where decoding decides the rate (issue 23's workload): 10 classes x (200
            train + 50 val) seeded, textured JPEGs of 500x375 / 375x500 at quality 90 (70-100 KB
            each, made once into bench/.data/photos); tiny_cnn at 64 px, random_resized_crop + flip,
            2 processes x batch 64 x 1 loader worker, 4 epochs, SGD as above. Sides, alternating,
            --repeats rounds, medians: the plain loop (ImageFolder + PIL RandomResizedCrop + ToTensor +
            Normalize, DistributedSampler), the project from the files (data.cache=none) with
            data.reduced_decode=false and true, the project with the decoded cache built in the
            run, and with it already built. Figures: wall time,
            train images/s of epochs 2+, data wait. Then loader-only: decode + augment images/s on one
            core at 64 px and 224 px, PIL's pipeline vs the project's, over the same files; then the
            stages (as --what stages).
stages:     where one image's time goes on one core, over the databound files at 64 and 224 px: read,
            header, decode (each data.decoder, PIL as ImageFolder, reduced), crop + resize, the
            sample's generator and draws, a whole sample, collation, and a pass through one loader worker (ms per image).
loader:     decode paths, one process and one thread: images/s per core.
timm:       (needs timm) model.name=timm/resnet18 vs torchvision's resnet18 on the reference workload
            (1 epoch per run, alternately, --repeats runs each): median train images/s and the ratio;
            then the per-image cost of timm's RandAugment string rand-m9-mstd0.5-inc1 vs torchvision's
            RandAugment (data.augment randaugment) on one core over the reference files at 64 and 224
            px: ms per image of each pipeline, flip alone subtracted (the augmentation's own cost).
checkpoint: time the training loop is blocked per save, synchronous torch.save vs async, resnet18/50.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PY = sys.executable


def make_reference_data(root: Path) -> Path:
    from ddp_trainer.data.demo import CLASSES, draw

    if (root / "COMPLETE").exists():
        return root
    for split, count, seed in (("train", 256, 11), ("val", 64, 12)):
        for label, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            rng = random.Random(seed * 1_000_003 + label)
            for i in range(count):
                draw(label, rng, 64).save(folder / f"{i:05d}.jpg", quality=90)
    (root / "COMPLETE").write_text("reference data\n")
    return root


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def launch_project(data: Path, out: Path, extra: tuple[str, ...] = ()) -> tuple[list[dict], float]:
    """The project on the reference settings (``extra`` overrides win): its metrics rows and wall time."""
    args = [f"data.root={data}", f"output_dir={out}", "resume=none", "overwrite=true", "model.name=resnet18",
            "data.image_size=64", "data.batch_size=64", "data.num_workers=1", "data.augment=[flip]",
            "optim.name=sgd", "optim.lr=0.1", "optim.momentum=0.9", "optim.weight_decay=5e-4", "sched.name=none",
            "sched.warmup_epochs=0", "train.epochs=3", "checkpoint.every_epochs=1", "log.progress=off",
            "train.log_every_steps=100000", *extra]
    t0 = time.perf_counter()
    res = subprocess.run([PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(ROOT / "launch.py"), *args], capture_output=True, text=True, env=_env())
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        raise SystemExit(f"project run failed:\n{res.stderr[-3000:]}")
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()], wall


def run_project(data: Path, out: Path, extra: tuple[str, ...] = ()) -> dict:
    rows, wall = launch_project(data, out, extra)
    images = sum(r["images_per_s"] * r["train_time_s"] for r in rows)
    return {"images_per_s": images / sum(r["train_time_s"] for r in rows), "wall_s": wall,
            "peak_rss_mb": max(r["peak_rss_mb"] for r in rows), "val_acc": rows[-1]["val_acc"],
            "val_loss": rows[-1]["val_loss"]}


def run_plain(data: Path, out: Path, epochs: int = 3, seed: int = 0, sched: str = "none",
              extra: tuple[str, ...] = ()) -> dict:
    t0 = time.perf_counter()
    res = subprocess.run([PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(ROOT / "bench" / "plain_ddp.py"), str(data), str(out), str(epochs), str(seed), sched,
                          *extra], capture_output=True, text=True, env=_env())
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        raise SystemExit(f"plain run failed:\n{res.stderr[-3000:]}")
    r = json.loads([l for l in res.stdout.splitlines() if l.startswith("{")][-1])
    return {"images_per_s": r["images_per_s"], "wall_s": wall, "peak_rss_mb": max(r["peak_rss_mb"]),
            "val_acc": r["val_acc"], "val_loss": r["val_loss"], "running_loss": [x[2] for x in r["running_loss"]]}


def project_running_loss(out: Path) -> list[float]:
    """Rank 0's running mean train loss after each step, from train.log (train.log_every_steps=1)."""
    found = re.findall(r"step \d+: \d+/\d+ samples, loss=([0-9.]+) \(this rank\)", (out / "train.log").read_text())
    return [float(x) for x in found]


SETTINGS = {"reference": (3, "none"), "long": (10, "cosine")}


def _photo(label: int, rng: random.Random, width: int, height: int):  # type: ignore[no-untyped-def]
    """A photo-like picture: the demo class's shape over a textured, lit scene (noise at several
    scales, so JPEG sizes are those of photos, not of flat drawings)."""
    import numpy as np
    from PIL import Image

    from ddp_trainer.data.demo import draw

    g = np.random.default_rng(rng.randrange(1 << 32))
    scene = np.zeros((height, width, 3))
    for cells, amp in ((4, 60.0), (16, 35.0), (96, 25.0)):  # coarse light, texture, grain
        small = g.normal(0, amp, (cells * height // width + 1, cells + 1, 3))
        scene += np.asarray(Image.fromarray(np.uint8(np.clip(small + 128, 0, 255))).resize(
            (width, height), Image.BICUBIC), dtype=np.float64) - 128
    scene += g.normal(0, 20, (height, width, 3)) + 120
    img = Image.fromarray(np.uint8(np.clip(scene, 0, 255)))
    side = min(width, height)
    shape = draw(label, rng, side)
    mask = Image.fromarray(np.uint8((np.asarray(shape, dtype=np.int16) - np.asarray(shape)[0, 0]).any(axis=2) * 255))
    img.paste(shape, (rng.randrange(width - side + 1), rng.randrange(height - side + 1)), mask)
    return img


def _photo_class(job: tuple[str, int, int, int]) -> int:
    folder, label, count, seed = job
    Path(folder).mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for i in range(count):
        w, h = (500, 375) if rng.random() < 0.5 else (375, 500)
        _photo(label, rng, w, h).save(Path(folder) / f"{i:05d}.jpg", quality=90)
    return count


def make_photo_data(root: Path) -> Path:
    """bench --what databound's files (made once, by a pool of processes)."""
    from multiprocessing import Pool

    from ddp_trainer.data.demo import CLASSES

    if (root / "COMPLETE").exists():
        return root
    jobs = [(str(root / split / name), label, count, seed * 1_000_003 + label)
            for split, count, seed in (("train", 200, 21), ("val", 50, 22)) for label, name in enumerate(CLASSES)]
    with Pool(os.cpu_count() or 2) as pool:
        pool.map(_photo_class, jobs)
    (root / "COMPLETE").write_text("photo-like data for --what databound\n")
    return root


def _databound_project(data: Path, out: Path, cache: str | None, more: tuple[str, ...] = ()) -> dict:
    extra = ["model.name=tiny_cnn", "data.augment=[random_resized_crop,flip]", "train.epochs=4", *more]
    if cache:
        extra += ["data.cache=decoded", f"data.cache_dir={cache}"]
    rows, wall = launch_project(data, out, tuple(extra))
    later = rows[1:]
    images = sum(r["images_per_s"] * r["train_time_s"] for r in later)
    return {"wall_s": wall, "images_per_s": images / sum(r["train_time_s"] for r in later),
            "wait": [r["data_wait_frac"] for r in rows]}


def _databound_plain(data: Path, out: Path) -> dict:
    t0 = time.perf_counter()
    res = subprocess.run([PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(ROOT / "bench" / "plain_ddp.py"), str(data), str(out), "4", "0", "none",
                          "--augment", "rrc", "--model", "tiny_cnn"], capture_output=True, text=True, env=_env())
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        raise SystemExit(f"plain run failed:\n{res.stderr[-3000:]}")
    r = json.loads([line for line in res.stdout.splitlines() if line.startswith("{")][-1])
    return {"wall_s": wall, "images_per_s": statistics.mean(r["epoch_images_per_s"][1:]), "wait": r["epoch_data_wait"]}


def bench_databound(repeats: int, work: Path) -> None:
    import shutil

    data = make_photo_data(ROOT / "bench" / ".data" / "photos")
    files = sorted((data / "train").rglob("*.jpg"))
    print(f"databound data: {len(files)} train files, mean {statistics.mean(f.stat().st_size for f in files) / 1e3:.0f} KB",
          flush=True)
    sides = ("plain loop", "project, files, full decode", "project, files", "project, cache built in the run",
             "project, cache already built")
    results: dict[str, list[dict]] = {s: [] for s in sides}
    for k in range(repeats):
        for side in sides:
            out = work / f"databound-{k}-{side.replace(', ', '-').replace(' ', '_')}"
            cache = work / f"databound-cache-{k}"
            if side == "plain loop":
                r = _databound_plain(data, out)
            elif side == "project, files":
                r = _databound_project(data, out, None)
            elif side == "project, files, full decode":
                r = _databound_project(data, out, None, ("data.reduced_decode=false",))
            else:
                if side == "project, cache built in the run":
                    shutil.rmtree(cache, ignore_errors=True)
                r = _databound_project(data, out, str(cache))
            results[side].append(r)
            print(f"databound round {k + 1}/{repeats} {side:>30}: wall {r['wall_s']:.1f} s, train {r['images_per_s']:.0f} "
                  f"img/s (epochs 2+), data wait {' '.join(f'{w:.0%}' for w in r['wait'])}", flush=True)
    base = results["plain loop"]
    for side in sides:
        rs = results[side]
        wall, rate = statistics.median(r["wall_s"] for r in rs), statistics.median(r["images_per_s"] for r in rs)
        waits = [w for r in rs for w in r["wait"][1:]]
        print(f"databound {side:>30}: wall {wall:.1f} s (x{wall / statistics.median(r['wall_s'] for r in base):.2f}), "
              f"train {rate:.0f} img/s epochs 2+ (x{rate / statistics.median(r['images_per_s'] for r in base):.2f}), "
              f"data wait epochs 2+ {min(waits):.0%}-{max(waits):.0%}", flush=True)
    bench_loader_only(data)
    bench_loader_stages(data)


def bench_loader_only(data: Path) -> None:
    """Decode + random_resized_crop + flip per image on one core, PIL's pipeline vs the project's."""
    import torch
    import torchvision
    from torchvision import transforms

    from ddp_trainer.data.datasets import FolderDataset
    from ddp_trainer.data.folder_index import scan
    from ddp_trainer.data.samplers import SampleKey
    from ddp_trainer.data.transforms import ImageTransform

    torch.set_num_threads(1)
    idx = scan(data / "train")
    n = min(len(idx), 600)
    for size in (64, 224):
        pil = torchvision.datasets.ImageFolder(str(data / "train"), transforms.Compose(
            [transforms.RandomResizedCrop(size, antialias=True), transforms.RandomHorizontalFlip(),
             transforms.PILToTensor()]))
        tf = ImageTransform(size, ("random_resized_crop", "flip"))
        full, reduced = FolderDataset(idx, tf), FolderDataset(idx, tf, reduced_decode=True)
        r_pil = _best_rate(lambda i: pil[i], n)
        r_full = _best_rate(lambda i: full[SampleKey(i, 0, 1.0)], n)
        r_red = _best_rate(lambda i: reduced[SampleKey(i, 0, 1.0)], n)
        print(f"databound loader-only at {size} px, images/s on one core: PIL pipeline {r_pil:.0f}, project "
              f"full decode {r_full:.0f} (x{r_full / r_pil:.2f}), project reduced decode {r_red:.0f} "
              f"(x{r_red / r_pil:.2f})", flush=True)


def bench_loader_stages(data: Path, n: int = 400) -> None:
    """Where one image's time goes on one core (ms per image, best of 3 passes over ``n`` files):
    the stages of the project's per-sample path, timed one at a time, then the loader around it
    (collation, and the transfer from one worker process to the training process)."""
    import io

    import torch
    from PIL import Image
    from torch.utils.data import DataLoader

    from ddp_trainer.data import decode, images
    from ddp_trainer.data.datasets import FolderDataset
    from ddp_trainer.data.folder_index import scan
    from ddp_trainer.data.loaders import _collate
    from ddp_trainer.data.samplers import SampleKey
    from ddp_trainer.data.transforms import ImageTransform, sample_seed

    torch.set_num_threads(1)
    idx = scan(data / "train")
    paths = [idx.path(i) for i in range(min(n, len(idx)))]
    blobs = [images.read_regular_file(p) for p in paths]
    heads = [decode._header(p, b, decode.MAX_IMAGE_PIXELS) for p, b in zip(paths, blobs)]
    decoded = [decode._decode(p, b, h) for p, b, h in zip(paths, blobs, heads)]

    def per_image(fn) -> float:  # type: ignore[no-untyped-def]
        best = float("inf")
        for _ in range(3):
            t = time.perf_counter()
            for k in range(len(paths)):
                fn(k)
            best = min(best, time.perf_counter() - t)
        return best / len(paths) * 1e3

    def pil_pipeline(k: int):  # type: ignore[no-untyped-def]
        with Image.open(io.BytesIO(blobs[k])) as pil:
            return pil.convert("RGB")

    for size in (64, 224):
        tf = ImageTransform(size, ("random_resized_crop", "flip"))
        boxes = [tf.crop_box(h.height, h.width, torch.Generator().manual_seed(sample_seed(0, 0, k)))
                 for k, h in enumerate(heads)]
        divisors = [images.jpeg_reduction(w, h, size) for _, _, h, w in boxes]
        draft = decode.draft_from()  # data.reduced_decode's rule: the draft from this divisor on
        stages = {
            "read the file": lambda k: images.read_regular_file(paths[k]),
            "header (PIL, nothing decoded)": lambda k: decode._header(paths[k], blobs[k], decode.MAX_IMAGE_PIXELS),
            "decode, full (PIL, as ImageFolder)": pil_pipeline,
            "decode reduced (PIL draft) + crop + resize": lambda k: divisors[k] >= draft and decode._decode_reduced(
                paths[k], blobs[k], heads[k], divisors[k], decode._Crop(
                    (boxes[k][1], boxes[k][0], boxes[k][1] + boxes[k][3], boxes[k][0] + boxes[k][2]), size, tf.mode)),
            "crop + resize (full path)": lambda k: decode.F.resized_crop(
                decoded[k], *boxes[k], [size, size], interpolation=tf.mode, antialias=True),
            "sample generator + crop box + flip draw": lambda k: (
                tf.crop_box(heads[k].height, heads[k].width, g := torch.Generator().manual_seed(sample_seed(0, 0, k))),
                torch.rand(1, generator=g).item()),
        }
        figures = {name: per_image(fn) for name, fn in stages.items()}
        before = decode.decoder()
        for name in decode.available():  # data.decoder's choices, each decoding every pixel
            decode.use(name)
            figures[f"decode, full ({name})"] = per_image(lambda k: decode._decode(paths[k], blobs[k], heads[k]))
        decode.use(before)
        reduced = sum(d >= draft for d in divisors) / len(divisors)
        if reduced:  # per reduced image
            figures["decode reduced (PIL draft) + crop + resize"] /= reduced
        else:
            del figures["decode reduced (PIL draft) + crop + resize"]  # no crop of these files is reduced
        for name, ms in figures.items():
            print(f"databound stages at {size} px: {name:>44}: {ms:.3f} ms/image", flush=True)
        print(f"databound stages at {size} px: {reduced:.0%} of the crops decode reduced by PIL's draft (divisor "
              f"{draft} or more; mean divisor {statistics.mean(divisors):.1f}, "
              f"{sum(1 < d < draft for d in divisors) / len(divisors):.0%} at a divisor the rule decodes in full; "
              f"the reduced stage's figure is per reduced image)", flush=True)
        for reduced_decode in (False, True):
            ds = FolderDataset(idx, tf, reduced_decode=reduced_decode)
            keys = [SampleKey(k, 0, 1.0) for k in range(len(paths))]
            whole = per_image(lambda k: ds[keys[k]])
            items = [ds[key] for key in keys]
            collate = per_image(lambda k: _collate(items[k - k % 64: k - k % 64 + 64]) if k % 64 == 0 else None)
            best = float("inf")
            for _ in range(3):  # from the first batch on: the worker's start is not counted
                loader = iter(DataLoader(keys, batch_size=32, num_workers=1, prefetch_factor=2,
                                         collate_fn=lambda b: _collate([ds[x] for x in b])))
                next(loader)
                t, rest = time.perf_counter(), sum(len(batch[1]) for batch in loader)
                best = min(best, (time.perf_counter() - t) / rest)
            print(f"databound stages at {size} px, reduced_decode={str(reduced_decode).lower()}: a sample "
                  f"{whole:.3f} ms/image; collation {collate:.3f}; through one loader worker (collation and "
                  f"the transfer to this process) {best * 1e3:.3f} ms/image", flush=True)


def _best_rate(get, n: int, rounds: int = 3) -> float:  # type: ignore[no-untyped-def]
    """The best of ``rounds`` passes of ``get(0..n-1)``, in calls per second."""
    best = 0.0
    for _ in range(rounds):
        t = time.perf_counter()
        for i in range(n):
            get(i)
        best = max(best, n / (time.perf_counter() - t))
    return best


def make_imbalanced_data(reference: Path, root: Path, rare: int = 26) -> Path:
    """The reference set with every class but the first cut to ``rare`` training images (hard links)."""
    if (root / "COMPLETE").exists():
        return root
    for split in ("train", "val"):
        for k, folder in enumerate(sorted(p for p in (reference / split).iterdir() if p.is_dir())):
            files = sorted(folder.iterdir())
            if split == "train" and k > 0:
                files = files[:rare]
            (root / split / folder.name).mkdir(parents=True, exist_ok=True)
            for f in files:
                target = root / split / folder.name / f.name
                if not target.exists():
                    os.link(f, target)
    (root / "COMPLETE").write_text("reference data, imbalanced\n")
    return root


def bench_samplers(data: Path, seeds: int, work: Path) -> None:
    imbalanced = make_imbalanced_data(data, data.parent / (data.name + "-imbalanced"))
    cases = [("reference", data, "plan"), ("reference", data, "repeated_augment"),
             ("imbalanced", imbalanced, "plan"), ("imbalanced", imbalanced, "class_balanced")]
    settings = {"reference": (), "imbalanced": ("train.epochs=10", "optim.lr=0.01")}
    results: dict[tuple[str, str], list[dict]] = {(s, k): [] for s, _, k in cases}
    for seed in range(seeds):
        for setname, root, sampler in cases:
            r = run_project(root, work / f"samplers-{setname}-{sampler}-{seed}",
                            (f"data.sampler={sampler}", f"seed={seed}", *settings[setname]))
            results[(setname, sampler)].append(r)
            print(f"samplers {setname} seed {seed} {sampler:>16}: val_acc {r['val_acc']:.4f} val_loss "
                  f"{r['val_loss']:.4f} ({r['images_per_s']:.1f} img/s train phase, wall {r['wall_s']:.0f} s)",
                  flush=True)
    for setname, _, sampler in cases:
        rs = results[(setname, sampler)]
        base = results[(setname, "plan")]
        line = (f"samplers {setname} {sampler:>16} over {seeds} seeds: val_acc {_describe([r['val_acc'] for r in rs])}; "
                f"val_loss {_describe([r['val_loss'] for r in rs])}; median img/s "
                f"{statistics.median(r['images_per_s'] for r in rs):.1f}")
        if sampler != "plan":
            line += (f"; vs plan: val_acc {statistics.mean(r['val_acc'] for r in rs) - statistics.mean(r['val_acc'] for r in base):+.4f}, "
                     f"img/s x{statistics.median(r['images_per_s'] for r in rs) / statistics.median(r['images_per_s'] for r in base):.3f}")
        print(line, flush=True)


def _describe(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"mean {statistics.mean(values):.4f} sd {sd:.4f} range {min(values):.4f}..{max(values):.4f}"


def bench_accuracy(data: Path, seeds: int, setting: str, work: Path, plain_options: tuple[str, ...] = (),
                   sides: tuple[str, ...] = ("project", "plain"), project_options: tuple[str, ...] = ()) -> None:
    epochs, sched = SETTINGS[setting]
    same = ("optim.norm_weight_decay=5e-4", f"train.epochs={epochs}", f"sched.name={sched}",
            "sched.warmup_epochs=0", "data.drop_last=false", *project_options)
    results: dict[str, list[dict]] = {"project": [], "plain": []}
    if plain_options:
        print(f"accuracy {setting}: plain loop with {' '.join(plain_options)}")
    if project_options:
        print(f"accuracy {setting}: project with {' '.join(project_options)}")
    for seed in range(seeds):
        for name in sides:
            out = work / f"acc-{name}-{seed}"
            r = (run_project(data, out, (*same, f"seed={seed}")) if name == "project"
                 else run_plain(data, out, epochs, seed, sched, plain_options))
            results[name].append(r)
            print(f"accuracy {setting} seed {seed} {name:>7}: val_acc {r['val_acc']:.4f} val_loss {r['val_loss']:.4f}"
                  f" ({r['images_per_s']:.1f} img/s train phase, wall {r['wall_s']:.0f} s)", flush=True)
    for key in ("val_acc", "val_loss"):
        p = [r[key] for r in results["project"]]
        q = [r[key] for r in results["plain"]]
        if not (p and q):
            print(f"accuracy {setting} {key} over {seeds} seeds: " + "; ".join(
                f"{side} {_describe([r[key] for r in results[side]])}" for side in sides))
            continue
        print(f"accuracy {setting} {key} over {seeds} seeds: project {_describe(p)}; plain loop {_describe(q)}; "
              f"difference of means {statistics.mean(p) - statistics.mean(q):+.4f}")


# drop_last=true: the plain loop's ProjectOrder leaves out the tail shorter than a global batch too
# (the reference set has no tail; other --data folders may)
ALIGNED_PROJECT = ("data.augment=[]", "optim.norm_weight_decay=5e-4", "sched.warmup_epochs=0",
                   "data.drop_last=true", "train.log_every_steps=1")
ALIGNED_PLAIN = ("--order", "project", "--augment", "none", "--decode", "tensor")
# one difference each: (name, project overrides added, plain options replaced)
PARITY_VARIANTS = (
    ("decode: PIL + ToTensor + Normalize in the plain loop (same pixels, normalised with other rounding)", (),
     ("--decode", "pil")),
    ("data order: DistributedSampler in the plain loop", (), ("--order", "sampler")),
    ("augmentation: random flip on both sides (different random streams)", ("data.augment=[flip]",),
     ("--augment", "flip")),
    ("no weight decay on norms and biases (project default)", ("optim.norm_weight_decay=null",), ()),
    ("warmup 0.5 epoch (project default)", ("sched.warmup_epochs=0.5",), ()),
)


def _replace_options(base: tuple[str, ...], new: tuple[str, ...]) -> tuple[str, ...]:
    opts = dict(zip(base[::2], base[1::2]))
    opts.update(zip(new[::2], new[1::2]))
    return tuple(x for kv in opts.items() for x in kv)


def _curve_gap(a: list[float], b: list[float], epochs: int) -> str:
    """Largest |difference| of two running-loss curves in each epoch."""
    if len(a) != len(b):
        return f"curves of different length ({len(a)} vs {len(b)} steps)"
    steps_per_epoch = len(a) // epochs
    gaps = [max(abs(x - y) for x, y in zip(a[i:i + steps_per_epoch], b[i:i + steps_per_epoch]))
            for i in range(0, len(a), steps_per_epoch)]
    return "train-loss gap by epoch " + " ".join(f"{g:.4f}" for g in gaps)


def _weights_gap(project_out: Path, plain_out: Path) -> str:
    """Compare the final weights and BatchNorm buffers of the two sides' last checkpoints."""
    import torch

    mine = torch.load(project_out / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)["model"]
    theirs = torch.load(plain_out / "checkpoint.pt", map_location="cpu", weights_only=True)["net"]
    if mine.keys() != theirs.keys():
        return "final weights: different keys"
    differ = [k for k in mine if not torch.equal(mine[k], theirs[k])]
    if not differ:
        return f"final weights bitwise equal ({len(mine)} tensors)"
    gap = max((mine[k].double() - theirs[k].double()).abs().max().item() for k in differ)
    return f"final weights: {len(differ)} of {len(mine)} tensors differ, max |difference| {gap:.3g}"


def _same_pixels(data: Path) -> str:
    """Do PIL and torchvision.io decode the training JPEGs to the same pixels?"""
    import numpy as np
    import torch
    import torchvision.io as tio
    from PIL import Image

    files = sorted((data / "train").glob("*/*.jpg"))
    same = 0
    for f in files:
        with Image.open(f) as im:
            a = torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1)
        same += torch.equal(a, tio.decode_image(tio.read_file(str(f)), tio.ImageReadMode.RGB))
    return f"PIL and torchvision.io decode {same} of {len(files)} training files to the same pixels"


def bench_parity(data: Path, work: Path) -> None:
    epochs = 3  # run_project's and run_plain's default: the reference workload
    print(f"parity decode check: {_same_pixels(data)}", flush=True)

    def project(name: str, extra: tuple[str, ...]) -> dict:
        r = run_project(data, work / name, (*ALIGNED_PROJECT, *extra))
        r["out"], r["running_loss"] = work / name, project_running_loss(work / name)
        return r

    def plain(name: str, opts: tuple[str, ...]) -> dict:
        r = run_plain(data, work / name, extra=_replace_options(ALIGNED_PLAIN, opts))
        r["out"] = work / name
        return r

    def show(name: str, p: dict, q: dict) -> None:
        print(f"parity {name}: project val_acc {p['val_acc']:.4f} val_loss {p['val_loss']:.4f}; plain val_acc "
              f"{q['val_acc']:.4f} val_loss {q['val_loss']:.4f}; {_curve_gap(p['running_loss'], q['running_loss'], epochs)}"
              f" (first step {p['running_loss'][0]:.4f} vs {q['running_loss'][0]:.4f}); "
              f"{_weights_gap(p['out'], q['out'])}", flush=True)

    aligned_p, aligned_q = project("par-project", ()), plain("par-plain", ())
    show("aligned", aligned_p, aligned_q)
    for i, (name, p_extra, q_opts) in enumerate(PARITY_VARIANTS):
        p = project(f"par-project-{i}", p_extra) if p_extra else aligned_p
        q = plain(f"par-plain-{i}", q_opts) if q_opts else aligned_q
        show(name, p, q)


def bench_timm(data: Path, repeats: int, work: Path) -> None:
    """timm's resnet18 against torchvision's in the same run settings, then the two RandAugments."""
    sides = {"torchvision resnet18": "model.name=resnet18", "timm/resnet18": "model.name=timm/resnet18"}
    rates: dict[str, list[float]] = {k: [] for k in sides}
    for i in range(repeats):
        for name, key in sides.items():
            r = run_project(data, work / f"timm-{i}-{len(rates[name])}-{name.split()[-1].replace('/', '_')}",
                            (key, "train.epochs=1"))
            rates[name].append(r["images_per_s"])
            print(f"timm run {i + 1}/{repeats} {name:>20}: {r['images_per_s']:.1f} img/s (train phase), "
                  f"wall {r['wall_s']:.1f} s", flush=True)
    med = {k: statistics.median(v) for k, v in rates.items()}
    print(f"timm median train images/s: timm/resnet18 {med['timm/resnet18']:.1f}, torchvision resnet18 "
          f"{med['torchvision resnet18']:.1f}, ratio timm/torchvision "
          f"{med['timm/resnet18'] / med['torchvision resnet18']:.3f}", flush=True)

    import torch

    from ddp_trainer.data.datasets import FolderDataset
    from ddp_trainer.data.folder_index import scan
    from ddp_trainer.data.samplers import SampleKey
    from ddp_trainer.data.transforms import ImageTransform

    torch.set_num_threads(1)
    idx = scan(data / "train")
    n = min(len(idx), 300)
    for size in (64, 224):
        ms = {}
        for label, augment in (("flip", ("flip",)), ("randaugment", ("flip", "randaugment")),
                               ("rand-m9-mstd0.5-inc1", ("flip", "rand-m9-mstd0.5-inc1"))):
            ds = FolderDataset(idx, ImageTransform(size, augment))
            ms[label] = 1000 / _best_rate(lambda i: ds[SampleKey(i, 0, 1.0)], n)
        tv, tm = ms["randaugment"] - ms["flip"], ms["rand-m9-mstd0.5-inc1"] - ms["flip"]
        print(f"RandAugment at {size} px, ms per image on one core (decode + resize + flip + it): flip alone "
              f"{ms['flip']:.3f}; torchvision randaugment {ms['randaugment']:.3f} (its own {tv:.3f}); timm "
              f"rand-m9-mstd0.5-inc1 {ms['rand-m9-mstd0.5-inc1']:.3f} (its own {tm:.3f}); ratio timm/torchvision "
              f"of their own cost {tm / tv:.2f}", flush=True)


def bench_train(data: Path, repeats: int, work: Path) -> None:
    results: dict[str, list[dict]] = {"project": [], "plain": []}
    for i in range(repeats):
        for name, fn in (("project", run_project), ("plain", run_plain)):
            r = fn(data, work / f"{name}-{i}")
            results[name].append(r)
            print(f"train run {i + 1}/{repeats} {name:>7}: {r['images_per_s']:.1f} img/s (train phase), "
                  f"wall {r['wall_s']:.1f} s, peak RSS/process {r['peak_rss_mb']} MiB, val_acc {r['val_acc']:.3f}",
                  flush=True)
    med = {k: statistics.median(r["images_per_s"] for r in v) for k, v in results.items()}
    wall = {k: statistics.median(r["wall_s"] for r in v) for k, v in results.items()}
    mem = {k: max(r["peak_rss_mb"] for r in v) for k, v in results.items()}
    print(f"train median images/s: project {med['project']:.1f}, plain loop {med['plain']:.1f}, "
          f"ratio {med['project'] / med['plain']:.3f} (target >= 0.98)")
    print(f"train median wall time: project {wall['project']:.1f} s, plain loop {wall['plain']:.1f} s")
    print(f"peak RSS per process: project {mem['project']} MiB, plain loop {mem['plain']} MiB, "
          f"ratio {mem['project'] / mem['plain']:.3f} (target <= 1.1)")


def bench_loader(data: Path, work: Path) -> None:
    import torch
    import torchvision
    from torchvision import transforms

    from ddp_trainer.data import decoded_cache
    from ddp_trainer.data.datasets import FolderDataset
    from ddp_trainer.data.folder_index import scan
    from ddp_trainer.data.samplers import SampleKey
    from ddp_trainer.data.transforms import ImageTransform

    torch.set_num_threads(1)
    idx = scan(data / "train")
    n = len(idx)
    pil = torchvision.datasets.ImageFolder(str(data / "train"), transforms.Compose(
        [transforms.Resize(64), transforms.RandomHorizontalFlip(), transforms.PILToTensor()]))
    ours = FolderDataset(idx, ImageTransform(64, ("flip",)))
    t0 = time.perf_counter()
    cache_path = decoded_cache.build(idx, 64, work / "cache")
    build_s = time.perf_counter() - t0
    cached = FolderDataset(idx, ImageTransform(64, ("flip",)), cached=decoded_cache.CachedImages(cache_path, n, 64))

    r_pil = _best_rate(lambda i: pil[i], n)
    r_tv = _best_rate(lambda i: ours[SampleKey(i, 0, 1.0)], n)
    r_cache = _best_rate(lambda i: cached[SampleKey(i, 0, 1.0)], n)
    print(f"loader images/s per core: PIL ImageFolder {r_pil:.0f}, torchvision.io path {r_tv:.0f} "
          f"(x{r_tv / r_pil:.2f}, target >= 1.2), decoded cache {r_cache:.0f} (x{r_cache / r_pil:.2f}, target >= 3); "
          f"one-off cache build {build_s:.1f} s for {n} images")


def bench_checkpoint(work: Path) -> None:
    import torch
    import torchvision

    from ddp_trainer.checkpoint.writer import AsyncCheckpointWriter, CheckpointWriter

    torch.set_num_threads(2)
    for name in ("resnet18", "resnet50"):
        model = torchvision.models.get_model(name, num_classes=10)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        model(torch.randn(2, 3, 64, 64)).sum().backward()
        opt.step()
        state = lambda: {"model": model.state_dict(), "optimizer": opt.state_dict()}  # noqa: E731
        sync, asyn = CheckpointWriter(work / f"sync-{name}", 2), AsyncCheckpointWriter(work / f"async-{name}", 2)
        t_sync, t_async = [], []
        for e in range(5):
            t = time.perf_counter()
            sync.save(state(), epoch_file=e)
            t_sync.append(time.perf_counter() - t)
            t = time.perf_counter()
            asyn.save(state(), epoch_file=e)
            t_async.append(time.perf_counter() - t)
            asyn.wait()  # the next step would run here; keep saves from overlapping the timing
        asyn.close()
        s, a = statistics.median(t_sync), statistics.median(t_async)
        size = (work / f"sync-{name}" / "last.pt").stat().st_size / 2**20
        print(f"checkpoint {name} ({size:.0f} MiB): loop blocked {s * 1000:.0f} ms synchronous, {a * 1000:.0f} ms "
              f"async, ratio {a / s:.3f} (target <= 0.15)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--what", default="train,loader,checkpoint")
    p.add_argument("--data", default=str(ROOT / "bench" / ".data" / "reference"))
    p.add_argument("--seeds", type=int, default=5, help="accuracy: seeds per side")
    p.add_argument("--setting", choices=sorted(SETTINGS), default="reference", help="accuracy: the workload")
    p.add_argument("--plain-options", default="", help="accuracy: options for bench/plain_ddp.py, e.g. "
                   "'--order project --decode tensor' (the project's sample order and decoder)")
    p.add_argument("--sides", default="project,plain", help="accuracy: which sides to run")
    p.add_argument("--project-options", default="", help="accuracy: overrides added to the project's, e.g. "
                   "'optim.norm_weight_decay=null sched.warmup_epochs=0.5' (its defaults)")
    args = p.parse_args()
    import platform

    import torch

    print(f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} cores, Python "
          f"{platform.python_version()}, torch {torch.__version__}; {time.strftime('%Y-%m-%d %H:%M')}")
    data = make_reference_data(Path(args.data))
    with tempfile.TemporaryDirectory(prefix="ddp_bench.") as tmp:
        work = Path(tmp)
        what = args.what.split(",")
        if "checkpoint" in what:
            bench_checkpoint(work)
        if "loader" in what:
            bench_loader(data, work)
        if "train" in what:
            bench_train(data, args.repeats, work)
        if "accuracy" in what:
            bench_accuracy(data, args.seeds, args.setting, work, tuple(args.plain_options.split()),
                           tuple(args.sides.split(",")), tuple(args.project_options.split()))
        if "databound" in what:
            bench_databound(args.repeats, work)
        if "stages" in what:
            bench_loader_stages(make_photo_data(ROOT / "bench" / ".data" / "photos"))
        if "samplers" in what:
            bench_samplers(data, args.seeds, work)
        if "parity" in what:
            bench_parity(data, work)
        if "timm" in what:
            bench_timm(data, args.repeats, work)


if __name__ == "__main__":
    main()
