"""``data.decode_device=cuda``: JPEG files decoded by the batch on the training process's GPU.

The work splits in two. In a loader worker, :class:`DeviceDecodeDataset` reads a sample's bytes and,
for a still JPEG, only draws its crop box and flip from the sample's ``(seed, epoch, sample)``
generator, from the header's size: the same draws, in the same order, as the CPU path
(:class:`.datasets.FolderDataset`), so a run's augmentation does not depend on where it decodes.
Every other file (PNG, WebP, EXIF-turned, CMYK JPEG, ...) and every transform that needs the picture
in the worker (the policies, random erasing) is decoded and transformed there, on the CPU, as today.
In the training process, :func:`assemble` decodes the batch's JPEGs in one call of a batch decoder
(:func:`jpeg_batch_decoder`: nvJPEG through TorchCodec or torchvision.io on ``cuda``; the same call on
the CPU stands in for it in tests), crops, resizes and flips each on that device, and stacks them with
the worker-decoded ones in the batch's order: a uint8 ``[B, 3, S, S]`` batch that normalises as today.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import torch
from torchvision.transforms.v2 import functional as F

from ..errors import ConfigError
from . import decode
from .samplers import SampleKey
from .transforms import ImageTransform, sample_seed

DECODE_DEVICES = ("cpu", "cuda")  # data.decode_device's values

# the transforms the training process can do after its decode; any other needs the picture in the worker
_DEFERRABLE = frozenset({"flip", "random_resized_crop"})

BatchDecoder = Callable[[list[torch.Tensor]], list[torch.Tensor]]


class DeferredJPEG(NamedTuple):
    """A worker's item for a JPEG the training process decodes: its bytes and its drawn geometry."""

    encoded: torch.Tensor  # uint8, 1-D: the file's bytes
    box: tuple[int, int, int, int] | None  # (top, left, h, w) to resize to the side; None: the fit geometry
    flip: bool


def check_decode_device(value: str, run_device: torch.device | None = None) -> None:
    """Raise ConfigError (one line: the key, the value, the fix) for a ``data.decode_device`` this
    machine cannot honour: an unknown value, ``cuda`` without a CUDA device, or ``cuda`` for a run
    whose ``run_device`` is not a GPU."""
    if value not in DECODE_DEVICES:
        raise ConfigError(f"data.decode_device={value!r} is not a device; use cpu or cuda")
    if value == "cuda" and not torch.cuda.is_available():
        raise ConfigError("data.decode_device=cuda: this machine has no CUDA device (torch.cuda.is_available() "
                          "is False); set data.decode_device=cpu")
    if value == "cuda" and run_device is not None and run_device.type != "cuda":
        raise ConfigError(f"data.decode_device=cuda: this run trains on {run_device}, not a GPU; "
                          f"set data.decode_device=cpu")


def deferrable(transform: ImageTransform) -> bool:
    """Whether ``transform``'s geometry and augmentation can wait for the training process's decode."""
    return set(transform.augment) <= _DEFERRABLE


def draw(transform: ImageTransform, height: int, width: int,
         gen: torch.Generator | None) -> tuple[tuple[int, int, int, int] | None, bool]:
    """The crop box and flip of a ``height x width`` picture, drawn from ``gen`` in the order
    :meth:`.ImageTransform.__call__` draws them (the box first, then the flip)."""
    box = transform.crop_box(height, width, gen) if transform.crops_randomly and gen is not None else None
    flip = "flip" in transform.augment and gen is not None and torch.rand(1, generator=gen).item() < 0.5
    return box, flip


class DeviceDecodeDataset(torch.utils.data.Dataset):
    """The items of ``cpu`` (a FolderDataset reading the files, not a decoded cache) for the device
    decode: a :class:`DeferredJPEG` for a still JPEG under a deferrable transform, ``cpu``'s own
    decoded and transformed tensor for everything else; the label and the weight as ``cpu`` gives them."""

    def __init__(self, cpu) -> None:
        if cpu.cached is not None:
            raise ValueError("a decoded cache holds pixels already: there is nothing to decode on the device")
        self.cpu = cpu

    def __len__(self) -> int:
        return len(self.cpu)

    def __getitem__(self, key: SampleKey | int):
        cpu = self.cpu
        i, epoch, weight, draw_no = key if isinstance(key, SampleKey) else (int(key), 0, 1.0, 0)
        if not deferrable(cpu.transform):
            return cpu[key]
        data = cpu.index.read(i)
        head = decode._header(cpu.index.name(i), data, cpu.max_pixels)  # the size, limit and kind; nothing decoded
        if not head.jpeg or head.turned or head.frames > 1:
            return cpu[key]  # the CPU path reads the file again: these are the rare files
        gen = None
        if cpu.transform.random:
            gen = torch.Generator().manual_seed(sample_seed(cpu.seed, epoch, i, draw_no))
        box, flip = draw(cpu.transform, head.height, head.width, gen)
        return DeferredJPEG(torch.frombuffer(bytearray(data), dtype=torch.uint8), box, flip), cpu.index.label(i), weight


def collate(batch: Sequence[tuple]) -> tuple[list, torch.Tensor, torch.Tensor]:
    """A loader batch of :class:`DeviceDecodeDataset` items: the images as a list (deferred JPEGs and
    decoded tensors mixed, in order), the labels and the weights as tensors."""
    images, labels, weights = zip(*batch)
    return list(images), torch.tensor(labels, dtype=torch.long), torch.tensor(weights, dtype=torch.float32)


def jpeg_batch_decoder(device: torch.device | str, library: str | None = None) -> BatchDecoder:
    """A function decoding a list of JPEG byte tensors to uint8 CHW RGB tensors on ``device`` in one
    call: ``library`` ``torchcodec`` (TorchCodec's ``decode_jpeg``; the default where it imports) or
    ``torchvision`` (torchvision.io's); both nvJPEG on ``cuda``, libjpeg-turbo on the CPU."""
    if library in (None, "torchcodec"):
        try:
            # an optional extra (torchcodec): imported when a batch decoder is made, not at import
            from torchcodec.decoders import decode_jpeg as batch
            return _after_queued_work(lambda encoded: batch(encoded, mode="RGB", device=device), device)
        except Exception:  # not installed, or a wheel built for another torch (its library fails to load)
            if library is not None:
                raise
    # the fallback: torchvision 0.29 deprecates its decoders, so they load only when used
    from torchvision.io import ImageReadMode, decode_jpeg
    return _after_queued_work(lambda encoded: decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device), device)


def _after_queued_work(decoder: BatchDecoder, device: torch.device | str) -> BatchDecoder:
    """``decoder``, waiting on a CUDA ``device`` for the work already queued on its current stream.
    nvJPEG writes its output on a stream of its own that does not wait for this one (torchvision's,
    and TorchCodec's before 0.17): memory the caching allocator hands the decode may still be read by
    training kernels queued before it."""
    if torch.device(device).type != "cuda":
        return decoder

    def decode_after(encoded: list[torch.Tensor]) -> list[torch.Tensor]:
        torch.cuda.current_stream(torch.device(device)).synchronize()
        return decoder(encoded)
    return decode_after


def assemble(images: Sequence, transform: ImageTransform, decoder: BatchDecoder,
             device: torch.device | str) -> torch.Tensor:
    """The uint8 ``[B, 3, S, S]`` batch on ``device``: the :class:`DeferredJPEG` items decoded by
    ``decoder`` in one call, each cropped and resized (antialiased, the transform's interpolation) or
    fitted, and flipped as drawn; the decoded tensors moved there; all in ``images``' order."""
    deferred = [k for k, x in enumerate(images) if isinstance(x, DeferredJPEG)]
    out: list[torch.Tensor | None] = [None] * len(images)
    if deferred:
        decoded = decoder([images[k].encoded for k in deferred])
        for k, img in zip(deferred, decoded):
            item = images[k]
            if item.box is None:
                img = transform.fit(img)
            else:
                top, left, h, w = item.box
                img = F.resized_crop(img, top, left, h, w, [transform.size, transform.size],
                                     interpolation=transform.mode, antialias=True)
            out[k] = F.horizontal_flip(img) if item.flip else img
    for k, x in enumerate(images):
        if out[k] is None:
            out[k] = x.to(device, non_blocking=True)
    return torch.stack(out)


def device_batches(batches, transform: ImageTransform, decoder: BatchDecoder, device: torch.device | str):
    """The batches of a loader over :class:`DeviceDecodeDataset` (collated by :func:`collate`) as the
    training loop takes them: ``(uint8 [B, 3, S, S] on device, labels, weights)``, each batch decoded
    by ``decoder`` on ``device`` as it is taken (the next one stays in the workers meanwhile)."""
    for images, labels, weights in batches:
        yield (assemble(images, transform, decoder, device), labels.to(device, non_blocking=True),
               weights.to(device, non_blocking=True))
