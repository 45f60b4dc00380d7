"""Image files to uint8 CHW RGB tensors: JPEG, PNG, GIF and WebP through torchvision.io (libjpeg-turbo,
libpng: faster than PIL and strict about truncated files), every other format through PIL. A file
that cannot be read or decoded is a DataError naming it."""
from __future__ import annotations

import io
import os
import re
import stat
import warnings

import numpy as np
import torch
from PIL import Image, ImageFile
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms.v2 import functional as F

from ..errors import DataError, show_path

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, not a grey half-image
# torchvision 0.29 marks its decoders deprecated in favour of torchcodec; they are still the fast path here
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                        category=DeprecationWarning)


_TORCHVISION_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a")


def _decode_with_torchvision(data: bytes) -> bool:
    return data.startswith(_TORCHVISION_MAGIC) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP")


def _bad(path: str, why: str) -> DataError:
    return DataError(f"cannot decode image '{show_path(path)}' ({why}); replace or delete the file, "
                     f"or set data.bad_images=skip")


def read_regular_file(path: str) -> bytes:
    """The bytes of ``path``; DataError naming it when it cannot be read or is not a regular file.

    Opened non-blocking and checked before reading: a FIFO, socket or device named like an image
    would otherwise block the read forever (or never end)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise _bad(path, exc.strerror or str(exc)) from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = ("a FIFO (named pipe)" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode)
                    else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a file")
            raise DataError(f"'{show_path(path)}' is not a regular file ({kind}); only image files belong in "
                            f"the class folders: remove it, or set data.bad_images=skip")
        with os.fdopen(fd, "rb", closefd=True) as f:
            fd = -1
            return f.read()
    except OSError as exc:
        raise _bad(path, exc.strerror or str(exc)) from None
    finally:
        if fd >= 0:
            os.close(fd)


def load_rgb(path: str) -> torch.Tensor:
    """Decode ``path`` to a uint8 CHW RGB tensor (grayscale, palette, RGBA and CMYK converted).

    JPEG, PNG, GIF and WebP are decoded by torchvision.io (libjpeg-turbo / libpng: faster than PIL,
    and strict about truncated files); other formats by PIL. Raises DataError naming the file when it
    cannot be decoded (corrupt or truncated).
    """
    data = read_regular_file(path)
    if _decode_with_torchvision(data):
        try:
            img = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
        except (RuntimeError, ValueError) as exc:
            why = re.sub(r"^.*?\.cpp:\d+,\s*", "", str(exc).strip().splitlines()[-1])  # drop the C++ location
            raise _bad(path, why[:160]) from None
        if img.ndim == 4:  # an animated GIF: its first frame
            img = img[0]
        if img.dtype != torch.uint8:  # a 16-bit PNG: scale to 8 bits as PIL does (not the low byte)
            img = F.to_dtype(img, torch.uint8, scale=True)
        return img.contiguous()
    try:
        with Image.open(io.BytesIO(data)) as pil:
            pil.load()
            rgb = pil.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        # PIL names the in-memory buffer it was given; the file is named by _bad already
        raise _bad(path, re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-fA-F]+>", "", str(exc))) from None
    arr = np.asarray(rgb, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()
