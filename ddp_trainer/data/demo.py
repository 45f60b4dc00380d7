"""Built-in demo data: a deterministic, learnable set of coloured shapes in 10 class folders.

Nothing is downloaded: images are drawn from a fixed seed. ``ensure_demo_data`` writes them once
into a cache folder (atomically: a temporary folder renamed into place), so concurrent writers
and killed runs never leave a half-written dataset behind.
"""
from __future__ import annotations

import math
import os
import random
import shutil
import tempfile
from pathlib import Path

from PIL import Image, ImageDraw

VERSION = 2
SHAPES = ("circle", "square", "triangle", "cross", "ring")
PALETTES = {  # hue families: warm vs cool, each with jitter
    "warm": [(225, 35, 30), (240, 125, 20), (235, 205, 30)],
    "cool": [(30, 70, 225), (20, 175, 210), (35, 185, 70)],
}
CLASSES = tuple(f"{shape}_{family}" for shape in SHAPES for family in PALETTES)
TRAIN_PER_CLASS = 200
VAL_PER_CLASS = 50
IMAGE_SIZE = 32


def cache_root() -> Path:
    """Where derived data is cached: $DDP_TRAINER_CACHE, else $XDG_CACHE_HOME/ddp_trainer."""
    if os.environ.get("DDP_TRAINER_CACHE"):
        return Path(os.environ["DDP_TRAINER_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "ddp_trainer"


def demo_dir() -> Path:
    return cache_root() / f"demo-v{VERSION}"


def _jitter(rng: random.Random, color: tuple[int, int, int], amount: int = 25) -> tuple[int, int, int]:
    return tuple(max(0, min(255, c + rng.randint(-amount, amount))) for c in color)  # type: ignore[return-value]


def draw(label: int, rng: random.Random, size: int = IMAGE_SIZE) -> Image.Image:
    """One image of class ``label``: a shape of the class's kind and colour family on noise."""
    shape, family = CLASSES[label].split("_")
    big = size * 4  # draw large, then downsample: smooth edges
    grey = rng.randint(60, 200)
    bg = _jitter(rng, (grey, grey, grey), 30)  # muted background: colour carries the class family
    img = Image.new("RGB", (big, big), bg)
    d = ImageDraw.Draw(img)
    for _ in range(3):  # small grey specks that carry no class information
        x, y = rng.randrange(big), rng.randrange(big)
        r = rng.randint(big // 40, big // 20)
        g = rng.randint(0, 255)
        d.ellipse([x - r, y - r, x + r, y + r], fill=(g, g, g))
    color = _jitter(rng, rng.choice(PALETTES[family]))
    r = rng.uniform(0.28, 0.42) * big
    cx = rng.uniform(r + 2, big - r - 2)
    cy = rng.uniform(r + 2, big - r - 2)
    w = max(2, int(r * 0.35))
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color)
    elif shape == "square":
        a = rng.uniform(0, math.pi / 2)
        pts = [(cx + r * math.cos(a + k * math.pi / 2), cy + r * math.sin(a + k * math.pi / 2)) for k in range(4)]
        d.polygon(pts, fill=color)
    elif shape == "triangle":
        a = rng.uniform(0, 2 * math.pi)
        pts = [(cx + r * math.cos(a + k * 2 * math.pi / 3), cy + r * math.sin(a + k * 2 * math.pi / 3)) for k in range(3)]
        d.polygon(pts, fill=color)
    elif shape == "cross":
        d.rectangle([cx - r, cy - w / 2, cx + r, cy + w / 2], fill=color)
        d.rectangle([cx - w / 2, cy - r, cx + w / 2, cy + r], fill=color)
    else:  # ring
        d.ellipse([cx - r, cy - r, cx + r, cy + r], outline=color, width=w)
    return img.resize((size, size), Image.Resampling.LANCZOS)


def write_demo_data(out: str | Path, train_per_class: int = TRAIN_PER_CLASS,
                    val_per_class: int = VAL_PER_CLASS, size: int = IMAGE_SIZE) -> Path:
    """Write ``out/train/<class>/*.png`` and ``out/val/<class>/*.png``; returns ``out``."""
    out = Path(out)
    for split, count, seed in (("train", train_per_class, 1), ("val", val_per_class, 2)):
        for label, name in enumerate(CLASSES):
            folder = out / split / name
            folder.mkdir(parents=True, exist_ok=True)
            rng = random.Random(seed * 1_000_003 + label)
            for i in range(count):
                draw(label, rng, size).save(folder / f"{i:05d}.png", optimize=False, compress_level=1)
    return out


def ensure_demo_data() -> Path:
    """The cached demo dataset, written first if it is missing. Safe against concurrent writers."""
    target = demo_dir()
    if (target / "COMPLETE").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        write_demo_data(tmp)
        (tmp / "COMPLETE").write_text(f"ddp_trainer demo data v{VERSION}\n")
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "COMPLETE").exists():  # a stale, incomplete folder: replace it
                shutil.rmtree(target, ignore_errors=True)
                os.rename(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
