"""Pictures of a run: a grid of one augmented batch with class names, and curves from metrics.jsonl."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from PIL import Image, ImageDraw

from .errors import UserError
from .extras import optional
from .runlog import MetricsFile

GRID_COLUMNS = 8
GRID_PAD = 4
LABEL_HEIGHT = 14
CURVES_SIZE = (10, 7)  # inches at 100 dpi -> 1000 x 700 pixels
CURVES_DPI = 100


def tile_size(image_size: int) -> int:
    """Tiles are upscaled (nearest) to at least 96 px so that small images stay visible."""
    return max(image_size, 96) // image_size * image_size if image_size < 96 else image_size


def grid_size(count: int, image_size: int) -> tuple[int, int]:
    """(width, height) in pixels of a grid of ``count`` images."""
    t = tile_size(image_size)
    cols = min(GRID_COLUMNS, count)
    rows = -(-count // cols)
    return cols * t + (cols + 1) * GRID_PAD, rows * (t + LABEL_HEIGHT) + (rows + 1) * GRID_PAD


def save_grid(images: torch.Tensor, labels: Sequence[int], classes: Sequence[str], out: Path) -> tuple[int, int]:
    """``images``: uint8 [N, 3, H, W] as the model receives them before normalisation (the
    denormalised view). Writes a PNG; returns its size."""
    n, _, h, w = images.shape
    t = tile_size(h)
    width, height = grid_size(n, h)
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    cols = min(GRID_COLUMNS, n)
    for i in range(n):
        r, c = divmod(i, cols)
        x = GRID_PAD + c * (t + GRID_PAD)
        y = GRID_PAD + r * (t + LABEL_HEIGHT + GRID_PAD)
        tile = Image.fromarray(images[i].permute(1, 2, 0).contiguous().numpy()).resize((t, t * h // w or t),
                                                                                       Image.Resampling.NEAREST)
        canvas.paste(tile, (x, y))
        draw.text((x + 1, y + t + 1), str(classes[labels[i]])[: max(4, t // 6)], fill=(0, 0, 0))
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out)
    return canvas.size


def save_curves(run_dir: Path, out: Path) -> tuple[int, int]:
    """Loss, accuracy, learning rate and throughput per epoch from ``run_dir/metrics.jsonl``."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        raise UserError(f"'{path}' not found; give the output_dir of a run (it holds metrics.jsonl)")
    rows = MetricsFile(path).rows()  # a damaged line is named and skipped
    if not rows:
        raise UserError(f"'{path}' holds no finished epoch yet")
    optional("matplotlib", "plot", "plot").use("Agg")  # no display: draw into files (before pyplot loads)
    plt = optional("matplotlib.pyplot", "plot", "plot")
    epochs = [r["epoch"] for r in rows]
    fig, axes = plt.subplots(2, 2, figsize=CURVES_SIZE, dpi=CURVES_DPI)
    panels = [
        (axes[0][0], "loss", [("train_loss", "train"), ("val_loss", "val")]),
        (axes[0][1], "accuracy", [("val_acc", "val top-1"), ("val_acc5", "val top-5")]),
        (axes[1][0], "learning rate (end of epoch)", [("lr", "lr")]),
        (axes[1][1], "throughput (images/s, global)", [("images_per_s", "train")]),
    ]
    for ax, title, series in panels:
        for key, label in series:
            values = [r.get(key) for r in rows]
            if any(v is not None for v in values):
                ax.plot(epochs, [float("nan") if v is None else v for v in values], marker="o", label=label)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(loc="best")
    fig.suptitle(str(run_dir))
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=CURVES_DPI)
    plt.close(fig)
    with Image.open(out) as im:
        return im.size
