"""Which decode wins at each crop size: one random resized crop of a 500x375 photo-like JPEG to S px,
by PIL, torchvision.io, TorchCodec (each a full decode, then the crop resized), and by the reduced
decode (libjpeg-turbo's DCT scaling through PIL, data.reduced_decode). One thread; the best of
--rounds rounds of --images images; prints ms per image and each one's ratio to PIL.

--by-divisor: the per-divisor table data/decode.py's rule rests on. For each crop size, random
resized crop boxes grouped by the DCT divisor jpeg_reduction gives them (1, 2, 4, 8), and for each
group the same boxes through PIL's draft at that divisor and through each full decoder (the
product's own paths: decode._decode_reduced and decode._crop_full under decode.use); then the
decoded cache's build (a whole picture fitted to a side, kept at twice that side), per divisor. The
methods take turns within every round, so a slow spell of a shared machine hits them all alike.

    OMP_NUM_THREADS=1 python bench/decode_bench.py [--sizes 64,128,224] [--rounds 5] [--images 40]
    OMP_NUM_THREADS=1 python bench/decode_bench.py --by-divisor [--data bench/.data/photos/train]
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


def interleaved_ms(methods: dict, items: list, rounds: int) -> dict[str, float]:
    """The best ms per item of each ``methods[name](item)``, the methods taking turns within a round."""
    best = {name: float("inf") for name in methods}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        for _ in range(rounds):
            for name, fn in methods.items():
                t0 = time.perf_counter()
                for item in items:
                    fn(item)
                best[name] = min(best[name], (time.perf_counter() - t0) / len(items))
    return {name: v * 1e3 for name, v in best.items()}


def by_divisor(files: list[bytes], sizes: list[int], rounds: int, per_group: int) -> None:
    from ddp_trainer.data import decode

    heads = [decode._header("bench.jpg", d, 10 ** 8) for d in files]
    libraries = [n for n in ("torchcodec", "torchvision", "pil") if n in decode.available()]
    before = decode.decoder()

    def full_path(name: str):  # the product's full decode + crop under data.decoder=name
        def run(item):
            decode.use(name)
            data, head, (top, left, h, w), size = item
            return decode._crop_full("bench.jpg", data, head, (top, left, h, w), size, F.InterpolationMode.BILINEAR)
        return run

    def draft(item):
        data, head, (top, left, h, w), size = item
        return decode._decode_reduced("bench.jpg", data, head, decode.jpeg_reduction(w, h, size),
                                      decode._Crop((left, top, left + w, top + h), size, F.InterpolationMode.BILINEAR))

    print("crop  divisor  share  " + "  ".join(f"{n:>11}" for n in ["PIL draft", *libraries]) + "  draft vs torchcodec")
    for size in sizes:
        t = ImageTransform(size, ("random_resized_crop",))
        gen = torch.Generator().manual_seed(size)
        groups: dict[int, list] = {1: [], 2: [], 4: [], 8: []}
        drawn = 0
        while drawn < 4000 and min(len(g) for g in groups.values()) < per_group:
            k = drawn % len(files)
            box = t.crop_box(heads[k].height, heads[k].width, gen)
            groups[decode.jpeg_reduction(box[3], box[2], size)].append((files[k], heads[k], box, size))
            drawn += 1
        for d, items in groups.items():
            share = len(items) / drawn
            items = items[:per_group]
            if not items:
                continue
            methods = {**({"PIL draft": draft} if d > 1 else {}), **{n: full_path(n) for n in libraries}}
            ms = interleaved_ms(methods, items, rounds)
            ratio = f"{ms['torchcodec'] / ms['PIL draft']:.2f}x" if d > 1 and "torchcodec" in ms else "-"
            print(f"{size:>4} {d:>8} {share:>6.0%}  " + "  ".join(
                f"{ms[n]:>8.2f} ms" if n in ms else f"{'-':>11}" for n in ["PIL draft", *libraries]) + f"  {ratio}",
                flush=True)
    print("decoded cache build: a whole picture, shorter side kept at twice the side, then fitted")
    for side in (64, 32, 16):
        fit = ImageTransform(side)
        d = decode.jpeg_reduction(heads[0].width, heads[0].height, 2 * side)
        items = list(zip(files[:per_group], heads[:per_group]))

        def reduced(item):
            data, head = item
            return fit.fit(decode._decode_reduced("bench.jpg", data, head, d))

        def full(name: str):
            def run(item):
                decode.use(name)
                return fit.fit(decode._decode("bench.jpg", item[0], item[1]))
            return run
        ms = interleaved_ms({"PIL draft": reduced, **{n: full(n) for n in libraries}}, items, rounds)
        ratio = f"{ms['torchcodec'] / ms['PIL draft']:.2f}x" if "torchcodec" in ms else "-"
        print(f"side {side:>3}, divisor {d}: " + "; ".join(f"{n} {v:.2f} ms" for n, v in ms.items())
              + f"; draft vs torchcodec {ratio}", flush=True)
    decode.use(before)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="64,128,224")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--images", type=int, default=40)
    p.add_argument("--by-divisor", action="store_true", help="the per-divisor table (see the docstring)")
    p.add_argument("--data", default="", help="--by-divisor: a folder of JPEGs to use instead of the made photos")
    args = p.parse_args()
    torch.set_num_threads(1)
    if args.data:
        files = [f.read_bytes() for f in sorted(Path(args.data).rglob("*.jpg"))[: args.images]]
    else:
        files = photos(args.images)
    if args.by_divisor:
        by_divisor(files, [int(s) for s in args.sizes.split(",")], args.rounds, args.images)
        return
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
