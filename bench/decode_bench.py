"""Which decode wins at each crop size: one random resized crop of a 500x375 photo-like JPEG to S px,
by PIL, torchvision.io, TorchCodec (each a full decode, then the crop resized), and by the reduced
decode (libjpeg-turbo's DCT scaling through PIL, data.reduced_decode). One thread; the best of
--rounds rounds of --images images; prints ms per image and each one's ratio to PIL.

    OMP_NUM_THREADS=1 python bench/decode_bench.py [--sizes 64,128,224] [--rounds 5] [--images 40]
"""
from __future__ import annotations

import argparse
import io
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ddp_trainer.data.decode import decode_rgb_cropped  # noqa: E402
from ddp_trainer.data.transforms import ImageTransform  # noqa: E402


def photos(n: int) -> list[bytes]:
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        small = rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)
        pic = np.asarray(Image.fromarray(small).resize((500, 375), Image.BICUBIC), dtype=np.float64)
        pic += rng.normal(0, 8, pic.shape)
        buf = io.BytesIO()
        Image.fromarray(pic.clip(0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def full_decoders() -> dict:
    def pil(data: bytes) -> torch.Tensor:
        with Image.open(io.BytesIO(data)) as im:
            return torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1)
    found = {"PIL": pil}
    with warnings.catch_warnings():  # the bench names torchvision's deprecated decoder on purpose
        warnings.simplefilter("ignore", DeprecationWarning)
        from torchvision.io import ImageReadMode, decode_jpeg
    found["torchvision.io"] = lambda data: decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8),
                                                       mode=ImageReadMode.RGB)
    try:
        from torchcodec.decoders import decode_jpeg as tc_jpeg
        found["TorchCodec"] = lambda data: tc_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode="RGB")
    except ImportError:
        print("TorchCodec: not installed, left out")
    return found


def best_ms(fn, files: list[bytes], boxes: list, rounds: int) -> float:
    best = float("inf")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        for _ in range(rounds):
            t0 = time.perf_counter()
            for data, box in zip(files, boxes):
                fn(data, box)
            best = min(best, (time.perf_counter() - t0) / len(files))
    return best * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="64,128,224")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--images", type=int, default=40)
    args = p.parse_args()
    torch.set_num_threads(1)
    files = photos(args.images)
    decoders = full_decoders()
    for size in (int(s) for s in args.sizes.split(",")):
        t = ImageTransform(size, ("random_resized_crop",))
        gen = torch.Generator().manual_seed(size)
        boxes = [t.crop_box(375, 500, gen) for _ in files]
        figures = {}
        for name, dec in decoders.items():
            figures[name] = best_ms(lambda d, b, dec=dec: F.resized_crop(dec(d), *b, [size, size], antialias=True),
                                    files, boxes, args.rounds)
        figures["reduced (PIL draft)"] = best_ms(
            lambda d, b: decode_rgb_cropped(d, "bench.jpg", 10 ** 8, lambda h, w, b=b: b, size,
                                            F.InterpolationMode.BILINEAR), files, boxes, args.rounds)
        base = figures["PIL"]
        print(f"{size:>4} px: " + "; ".join(f"{k} {v:.2f} ms ({base / v:.2f}x PIL)" for k, v in figures.items()),
              flush=True)


if __name__ == "__main__":
    main()
