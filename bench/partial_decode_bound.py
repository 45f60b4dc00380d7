"""Usage: OMP_NUM_THREADS=1 python bench/partial_decode_bound.py [FILES] [SIZE]

Upper bound of a partial JPEG decode that stops at the crop's bottom row (no library here does it:
libjpeg-turbo's jpeg_skip_scanlines / tj3SetCroppingRegion are not reachable from Python on this
machine). PIL is fed the file truncated a little below the crop's bottom (by the scan's byte
fraction) with LOAD_TRUNCATED_IMAGES, so libjpeg never entropy-decodes the rows below it."""
import io
import sys
import time
import random

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
import numpy as np
import torch
from PIL import Image, ImageFile

from ddp_trainer.data import decode
from ddp_trainer.data.transforms import ImageTransform, sample_seed
import run_bench

torch.set_num_threads(1)
rng = random.Random(5)
files = []
for i in range(int(sys.argv[1]) if len(sys.argv) > 1 else 120):
    w, h = (500, 375) if rng.random() < 0.5 else (375, 500)
    buf = io.BytesIO()
    run_bench._photo(i % 10, rng, w, h).save(buf, "JPEG", quality=90)
    files.append(buf.getvalue())
print("files", len(files), "mean KB", sum(map(len, files)) / len(files) / 1e3)
ImageFile.LOAD_TRUNCATED_IMAGES = True
size = int(sys.argv[2]) if len(sys.argv) > 2 else 64
tf = ImageTransform(size, ("random_resized_crop", "flip"))
items = []
for k, data in enumerate(files):
    head = decode._header("x", data, decode.MAX_IMAGE_PIXELS)
    top, left, ch, cw = tf.crop_box(head.height, head.width, torch.Generator().manual_seed(sample_seed(0, 0, k)))
    d = decode.jpeg_reduction(cw, ch, size)
    sos = data.rfind(b"\xff\xda")
    seglen = int.from_bytes(data[sos + 2:sos + 4], "big")
    start, end = sos + 2 + seglen, len(data) - 2
    bottom = min(head.height, top + ch + 32)  # two MCU rows of margin
    cut = start + int((end - start) * bottom / head.height)
    items.append((data, data[:cut], head, (left, top, left + cw, top + ch), d, bottom / head.height))


def pil_crop(data, head, box, d):
    with Image.open(io.BytesIO(data)) as pil:
        if d > 1:
            pil.draft("RGB", (head.width // d, head.height // d))
        pil.load()
        out = pil.resize((size, size), Image.BILINEAR, box=tuple(v / d for v in box))
    return np.asarray(out)


def product(item):
    data, _, head, box, d, _ = item
    l, t, r, b = box
    return decode.decode_rgb_cropped(data, "x", decode.MAX_IMAGE_PIXELS, lambda hh, ww: (t, l, b - t, r - l), size,
                                     tf.mode)


methods = {
    "product (rule: draft at 4+, TorchCodec in full below)": product,
    "PIL draft at the crop's divisor, whole file": lambda it: pil_crop(it[0], it[2], it[3], it[4]),
    "PIL draft at the crop's divisor, stopped below the crop": lambda it: pil_crop(it[1], it[2], it[3], it[4]),
    "TorchCodec full decode only": lambda it: decode._decode("x", it[0], it[2]),
}
same = sum(np.array_equal(pil_crop(it[0], it[2], it[3], it[4]), pil_crop(it[1], it[2], it[3], it[4])) for it in items)
print(f"crops identical when stopped below the crop: {same}/{len(items)}; mean share of rows decoded "
      f"{np.mean([it[5] for it in items]):.2f}")
best = {m: float("inf") for m in methods}
for r in range(7):
    for name, fn in methods.items():
        t = time.perf_counter()
        for it in items:
            fn(it)
        best[name] = min(best[name], (time.perf_counter() - t) / len(items) * 1e3)
for name, ms in best.items():
    print(f"{size} px {name:>58}: {ms:.3f} ms/image")
