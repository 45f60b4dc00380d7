"""Encoded image bytes to uint8 CHW RGB tensors: the one module that decides which library decodes.

JPEG, PNG, GIF and still WebP through TorchCodec where it imports, torchvision.io where it does not
(both libjpeg-turbo and libpng: faster than PIL, strict about truncated files, the same pixels), PIL
for the rest: every other format, EXIF-turned pictures and animated WebP. ``data.decoder`` forces
one of them (:func:`use`); :func:`decoder_name` is what the start-up log names. Where the bytes come from (a file, a shard's member) is the caller's business: every function
takes the bytes and the name an error shows. A picture that cannot be decoded is an ImageError
naming it.

``data.reduced_decode``'s rule: a still, unturned JPEG whose crop (or decoded-cache side) can be
decoded at DCT divisor d (:func:`jpeg_reduction`: 2, 4 or 8) is decoded by PIL's draft at 1/d when
d is at least :func:`draft_from` for the chosen decoder, and otherwise in full by the chosen decoder,
exactly as without the option (neither library decoder scales in the DCT). The choice depends only
on the header and the decoder, so a sample's pixels stay a pure function of the config.
"""
from __future__ import annotations

import io
import re
import warnings
from typing import Callable, NamedTuple

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps
from torchvision.transforms.v2 import functional as F

from ..errors import ConfigError, ImageError, show_path

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, not a grey half-image

try:
    from torchcodec.decoders import decode_image as _torchcodec_decode
except Exception:  # not installed, or a wheel built for another torch: torchvision.io decodes instead
    _torchcodec_decode = None

DECODERS = ("torchcodec", "torchvision", "pil")  # data.decoder's choices besides auto


def _by_torchcodec(encoded: torch.Tensor) -> torch.Tensor:
    return _torchcodec_decode(encoded, mode="RGB", output_dtype="auto")


def _by_torchvision(encoded: torch.Tensor) -> torch.Tensor:
    # imported on first use: torchvision 0.29 deprecates its decoders, only a forced or fallback choice calls them
    from torchvision.io import ImageReadMode, decode_image
    return decode_image(encoded, mode=ImageReadMode.RGB)


_LIBRARY = {"torchcodec": _by_torchcodec, "torchvision": _by_torchvision, "pil": None}
_chosen = "torchcodec" if _torchcodec_decode is not None else "torchvision"


def available() -> tuple[str, ...]:
    """The decoders that work in this environment (PIL always; TorchCodec where it imports)."""
    return tuple(d for d in DECODERS if d != "torchcodec" or _torchcodec_decode is not None)


def use(decoder: str) -> str:
    """Make ``decoder`` (``data.decoder``: auto, torchcodec, torchvision, pil) decode from now on in
    this process and the loader workers it forks; returns the one chosen. auto: TorchCodec where it
    imports, else torchvision.io. Raises ConfigError for one that is not installed."""
    global _chosen
    if decoder == "auto":
        decoder = "torchcodec" if _torchcodec_decode is not None else "torchvision"
    if decoder not in DECODERS:
        raise ConfigError(f"data.decoder={decoder!r} is not a decoder; use auto, {', '.join(DECODERS)}")
    if decoder not in available():
        raise ConfigError("data.decoder=torchcodec: torchcodec does not import here; pip install "
                          "'ddp_trainer[torchcodec]' (or torchcodec), or set data.decoder=auto")
    _chosen = decoder
    return decoder


def decoder() -> str:
    """The decoder in use (one of DECODERS)."""
    return _chosen


_NAMES = {"torchcodec": "TorchCodec", "torchvision": "torchvision.io", "pil": "PIL"}

# data.reduced_decode's rule, by decoder: the smallest DCT divisor PIL's draft decodes at. Below it
# the chosen library's full decode (libjpeg-turbo, no DCT scaling) costs no more than the draft,
# measured per divisor by `bench/decode_bench.py --by-divisor` (bench/RESULTS.md, issue 31). Under
# data.decoder=pil the draft is PIL's own decode with less work, so it pays at every divisor.
# Changing a value changes what a reduced-decode cache holds: decoded_cache's key names it.
_DRAFT_FROM = {"torchcodec": 4, "torchvision": 4, "pil": 2}


def draft_from() -> int:
    """The smallest DCT divisor (2, 4 or 8) at which ``data.reduced_decode`` decodes a JPEG
    through PIL's draft under the chosen decoder; at smaller ones it is decoded in full by that decoder."""
    return _DRAFT_FROM[_chosen]


def decoder_name(reduced: bool = False) -> str:
    """What the start-up log names: the library for JPEG, PNG, GIF and WebP, and PIL for the rest;
    with ``reduced`` (``data.reduced_decode``), the rule that picks between PIL's draft and it."""
    name = {"torchcodec": "TorchCodec (JPEG, PNG, GIF, WebP) + PIL", "pil": "PIL",
            "torchvision": "torchvision.io (JPEG, PNG, GIF, WebP) + PIL"}[_chosen]
    if not reduced:
        return name
    scales = [f"1/{d}" for d in (2, 4, 8) if d >= draft_from()]
    below = f", else {_NAMES[_chosen]} in full" if draft_from() > 2 else ""
    return f"{name}; reduced decode: JPEGs by PIL's draft at {' or '.join(scales)} where the crop allows{below}"


def pixel_family() -> str:
    """Which decoders give identical pixels share a family: TorchCodec and torchvision.io (the same
    libjpeg-turbo and libpng calls; tests/test_image_kinds.py compares them) are "", PIL is "pil"
    (its own chroma upsampling). The decoded cache's key holds it, so a cache built by one family is
    rebuilt under the other."""
    return "pil" if _chosen == "pil" else ""


_LIBRARY_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a")


def _decode_with_library(data: bytes) -> bool:
    return _chosen != "pil" and (data.startswith(_LIBRARY_MAGIC) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP"))


def bad_image(path: str, why: str) -> ImageError:
    """The error for the image ``path`` names that cannot be read or decoded, saying ``why``."""
    return ImageError(f"cannot decode image '{show_path(path)}' ({why}); replace or delete the file, "
                      f"{ImageError.TRAINING_FIX}")


MAX_IMAGE_PIXELS = 89_478_485  # data.max_image_pixels' default: PIL's own (Image.MAX_IMAGE_PIXELS)
_ORIENTATION = 0x0112  # the EXIF tag: how the camera held the picture (1: as stored)


# data.max_image_pixels is checked by _header from each file's header; PIL's own guard stays on (it
# refuses more than twice Image.MAX_IMAGE_PIXELS, and warns above it, a warning our check replaces)
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


def allow_pixels(max_pixels: int) -> None:
    """Let PIL open images of up to ``max_pixels`` (a ``data.max_image_pixels`` above twice PIL's
    Image.MAX_IMAGE_PIXELS, which PIL refuses on its own): the global is raised to half of it, at most
    once per larger limit, and never lowered or turned off. Changing it around each decode instead
    raced between decoding threads (one thread's restore undid another's: it stayed None for good)."""
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and 2 * limit < max_pixels:
        Image.MAX_IMAGE_PIXELS = -(-max_pixels // 2)


class Header(NamedTuple):
    """What a file's header tells before anything is decoded."""

    width: int
    height: int
    frames: int
    turned: bool  # an EXIF orientation other than "as stored"
    jpeg: bool


def _header(path: str, data: bytes, max_pixels: int) -> Header:
    allow_pixels(max_pixels)
    try:
        with Image.open(io.BytesIO(data)) as probe:  # the header only: nothing is decoded yet
            width, height = probe.size
            head = Header(width, height, getattr(probe, "n_frames", 1),
                          "exif" in probe.info and probe.getexif().get(_ORIENTATION, 1) != 1,
                          probe.format == "JPEG" and probe.mode in ("RGB", "L"))
    except Image.DecompressionBombError as exc:  # PIL's own guard, at twice its limit: over ours too
        found = re.search(r"\((\d+) pixels\)", str(exc))
        raise _too_large(path, f"{int(found.group(1)):,}" if found else "too many", max_pixels) from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise bad_image(path, _pil_reason(exc)) from None
    if width * height > max_pixels:
        raise _too_large(path, f"{width}x{height} = {width * height:,}", max_pixels)
    return head


def _too_large(path: str, size: str, max_pixels: int) -> ImageError:
    return ImageError(f"image '{show_path(path)}' is {size} pixels, more than data.max_image_pixels={max_pixels:,} "
                      f"(a decompression bomb, or a far larger scan than training needs); shrink or remove the file, "
                      f"raise data.max_image_pixels, {ImageError.TRAINING_FIX}")


def jpeg_reduction(width: int, height: int, need: int) -> int:
    """The largest DCT scaling divisor (8, 4, 2; 1: none) that leaves at least ``need`` pixels across
    a ``width x height`` region of the picture."""
    for d in (8, 4, 2):
        if min(width, height) >= need * d:
            return d
    return 1


class _Crop(NamedTuple):
    """A box (left, top, right, bottom, in the full picture's pixels) to resample to ``size x size``."""

    box: tuple[int, int, int, int]
    size: int
    interpolation: F.InterpolationMode


_PIL_FILTERS = {F.InterpolationMode.NEAREST: Image.NEAREST, F.InterpolationMode.BILINEAR: Image.BILINEAR,
                F.InterpolationMode.BICUBIC: Image.BICUBIC}


def _decode_reduced(path: str, data: bytes, head: Header, divisor: int, crop: _Crop | None = None) -> torch.Tensor:
    """A JPEG decoded by libjpeg-turbo at 1/``divisor`` of its size (the DCT's own scaling: less
    work than decoding every pixel and resizing), as a uint8 CHW RGB tensor; with ``crop``, that
    box of it resampled by PIL's antialiased filter.

    Each reduced pixel is a ``divisor x divisor`` block of the full picture, so a box lands at
    fractions of reduced pixels; PIL's resize takes a fractional box, and the crop lands exactly
    where the full decode's does (rounding the box to whole reduced pixels shifts it by up to
    ``divisor / 2`` full pixels: a mean difference of 9.6 instead of 3.6 on textured photos). One C
    call on the small picture: the float RoIAlign it replaced cost more than the decoding it saved."""
    try:
        with Image.open(io.BytesIO(data)) as pil:
            # PIL's draft takes the largest scale s in 8, 4, 2 with s <= side // asked: for floor(side / d)
            # that quotient lies in [d, 2d), so s is d; libjpeg's sides are then rounded up
            pil.draft("RGB", (head.width // divisor, head.height // divisor))
            if crop is not None:
                if pil.size != (-(-head.width // divisor), -(-head.height // divisor)):
                    pil.close()  # another PIL's rule picked another scale: crop a full decode
                    left, top, right, bottom = crop.box
                    return _crop_full(path, data, head, (top, left, bottom - top, right - left), crop.size,
                                      crop.interpolation)
                pil = pil.resize((crop.size, crop.size), _PIL_FILTERS.get(crop.interpolation, Image.BILINEAR),
                                 box=tuple(v / divisor for v in crop.box))
            arr = np.asarray(pil.convert("RGB") if pil.mode != "RGB" else pil, dtype=np.uint8)
    except (OSError, ValueError, SyntaxError) as exc:
        raise bad_image(path, _pil_reason(exc)) from None
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)




def _crop_full(path: str, data: bytes, head: Header,
               box: tuple[int, int, int, int] | Callable[[int, int], tuple[int, int, int, int]], size: int,
               interpolation: F.InterpolationMode) -> torch.Tensor:
    """The whole picture decoded, then ``box`` (top, left, h, w; or drawn from the decoded size
    when callable: an EXIF turn may swap the header's sides) resized to ``size x size``."""
    img = _decode(path, data, head)
    top, left, h, w = box(img.shape[-2], img.shape[-1]) if callable(box) else box
    return F.resized_crop(img, top, left, h, w, [size, size], interpolation=interpolation, antialias=True)




def _decode(path: str, data: bytes, head: Header) -> torch.Tensor:
    if _decode_with_library(data) and not head.turned and not (head.frames > 1 and data[:4] == b"RIFF"):
        try:
            img = _LIBRARY[_chosen](torch.frombuffer(bytearray(data), dtype=torch.uint8))
        except (RuntimeError, ValueError) as exc:
            why = re.sub(r"^.*?\.cpp:\d+,\s*", "", str(exc).strip().splitlines()[-1])  # drop the C++ location
            raise bad_image(path, why[:160]) from None
        if img.ndim == 4:  # an animated GIF: its first frame
            img = img[0]
        if img.dtype != torch.uint8:  # a 16-bit PNG: scale to 8 bits as PIL does (not the low byte)
            img = F.to_dtype(img, torch.uint8, scale=True)
        return img  # HWC in memory (the decoder's layout): a copy to CHW cost as much as the decode itself
    try:
        with Image.open(io.BytesIO(data)) as pil:
            pil.load()  # the first frame of an animation
            arr = _to_rgb8(ImageOps.exif_transpose(pil))
    except (OSError, ValueError, SyntaxError) as exc:
        raise bad_image(path, _pil_reason(exc)) from None
    return torch.from_numpy(arr).permute(2, 0, 1)


def _pil_reason(exc: BaseException) -> str:
    # PIL names the in-memory buffer it was given; the file is named by _bad already
    return re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-fA-F]+>", "", str(exc))


def _to_rgb8(pil: Image.Image) -> np.ndarray:
    """An HxWx3 uint8 array. 16-bit modes are scaled (the top byte: as torchvision scales a 16-bit
    PNG), float images from [0, 1] (clipped outside); PIL's own conversion would clip them instead
    (a 16-bit scan almost all white, a float one all black)."""
    if pil.mode.startswith("I;16") or pil.mode == "I":
        grey = (np.clip(np.asarray(pil, dtype=np.int64), 0, 65535) >> 8).astype(np.uint8)
    elif pil.mode == "F":
        values = np.nan_to_num(np.asarray(pil, dtype=np.float64), nan=0.0)
        grey = np.round(np.clip(values, 0.0, 1.0) * 255).astype(np.uint8)
    else:
        return np.array(pil.convert("RGB"), dtype=np.uint8)
    return np.repeat(grey[:, :, None], 3, axis=2)

def decode_rgb(data: bytes, path: str, max_pixels: int = MAX_IMAGE_PIXELS,
               min_side: int | None = None) -> torch.Tensor:
    """Decode ``data`` (the encoded bytes of the image ``path`` names: a file, or a shard's member) to a uint8 CHW RGB tensor, as the picture is meant to be seen: turned as its
    EXIF orientation says (phones store pictures sideways), grayscale, palette, RGBA and CMYK
    converted, 16-bit and float images scaled to 8 bits (not clipped), an animation's first frame.

    The header is read first: an image of more than ``max_pixels`` pixels (``data.max_image_pixels``;
    a decompression bomb: a few hundred KB on disk, gigabytes decoded) is refused before it is
    decoded. JPEG, PNG, GIF and still WebP are decoded by TorchCodec or torchvision.io (:func:`use`;
    libjpeg-turbo / libpng: faster than PIL, and strict about truncated files); turned pictures, animated WebP and the other
    formats by PIL. Raises ImageError naming ``path`` when it cannot be decoded.

    ``min_side``: a still JPEG may be decoded at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling) as
    long as its shorter side keeps at least ``min_side`` pixels (the decoded cache's build, which
    resizes to that side next), by PIL's draft at the scales the module's rule gives it
    (:func:`draft_from`), in full by the chosen decoder at the others."""
    head = _header(path, data, max_pixels)
    if min_side is not None and head.jpeg and not head.turned:
        divisor = jpeg_reduction(head.width, head.height, min_side)
        if divisor >= draft_from():
            return _decode_reduced(path, data, head, divisor)
    return _decode(path, data, head)


def decode_rgb_cropped(data: bytes, path: str, max_pixels: int, box: Callable[[int, int], tuple[int, int, int, int]],
                       size: int, interpolation: F.InterpolationMode) -> torch.Tensor:
    """``box(height, width)``'s region of the image ``data`` encodes (named ``path`` in errors) resized to ``size x size``, decoding only as many
    pixels as that needs (``data.reduced_decode``). ``box`` is asked with the full picture's size,
    from its header, before anything is decoded, so the crop is the one a full decode would give.

    A still JPEG (not EXIF-turned) whose box spans at least twice ``size`` may be decoded at 1/2,
    1/4 or 1/8 scale (the most that keeps ``size`` pixels across the box), by PIL's draft where that
    scale is at least :func:`draft_from`; everything else is decoded in full by the chosen decoder
    and the box resized, exactly as without this option. The reduced pixels differ from a
    full decode + resize by the smaller intermediate picture and the resampling filter (bounded in
    tests/test_reduced_decode.py)."""
    head = _header(path, data, max_pixels)
    if not head.jpeg or head.turned:
        return _crop_full(path, data, head, box, size, interpolation)
    top, left, h, w = box(head.height, head.width)
    divisor = jpeg_reduction(w, h, size)
    if divisor < draft_from():
        return _crop_full(path, data, head, (top, left, h, w), size, interpolation)
    return _decode_reduced(path, data, head, divisor, _Crop((left, top, left + w, top + h), size, interpolation))
