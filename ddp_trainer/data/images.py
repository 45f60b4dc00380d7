"""Image files to uint8 CHW RGB tensors: the file is read here (refusing what is not a regular
file), the bytes are decoded by :mod:`.decode`. A file that cannot be read or decoded is a DataError
naming it."""
from __future__ import annotations

import os
import stat
from typing import Callable

import torch
from torchvision.transforms.v2 import functional as F

from ..errors import ImageError, show_path
from .decode import MAX_IMAGE_PIXELS, allow_pixels, bad_image, decode_rgb, decode_rgb_cropped, jpeg_reduction

__all__ = ["MAX_IMAGE_PIXELS", "allow_pixels", "jpeg_reduction", "load_rgb", "load_rgb_cropped", "read_regular_file"]


def read_regular_file(path: str) -> bytes:
    """The bytes of ``path``; DataError naming it when it cannot be read or is not a regular file.

    Opened non-blocking and checked before reading: a FIFO, socket or device named like an image
    would otherwise block the read forever (or never end)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise bad_image(path, exc.strerror or str(exc)) from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = ("a FIFO (named pipe)" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode)
                    else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a file")
            raise ImageError(f"'{show_path(path)}' is not a regular file ({kind}); only image files belong in "
                             f"the class folders: remove it, {ImageError.TRAINING_FIX}")
        with os.fdopen(fd, "rb", closefd=True) as f:
            fd = -1
            return f.read()
    except OSError as exc:
        raise bad_image(path, exc.strerror or str(exc)) from None
    finally:
        if fd >= 0:
            os.close(fd)


def load_rgb(path: str, max_pixels: int = MAX_IMAGE_PIXELS, min_side: int | None = None) -> torch.Tensor:
    """The image file ``path`` as :func:`.decode.decode_rgb` decodes it."""
    return decode_rgb(read_regular_file(path), path, max_pixels, min_side)


def load_rgb_cropped(path: str, max_pixels: int, box: Callable[[int, int], tuple[int, int, int, int]],
                     size: int, interpolation: F.InterpolationMode) -> torch.Tensor:
    """The image file ``path`` as :func:`.decode.decode_rgb_cropped` crops and decodes it."""
    return decode_rgb_cropped(read_regular_file(path), path, max_pixels, box, size, interpolation)
