"""data.decoder: TorchCodec, torchvision.io and PIL each keep every guarantee of the decode; the two
libjpeg-turbo decoders give the same pixels; the decoded cache's key tells PIL's pixels apart; the
choice is named at start-up and refused with one line where it cannot be had."""
from __future__ import annotations

import io
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import PY, child_env, launch
from PIL import Image

from ddp_trainer import config
from ddp_trainer.data import decode, decoded_cache
from ddp_trainer.data.folder_index import scan
from ddp_trainer.errors import ConfigError, DataError


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    out = io.BytesIO()
    img.save(out, fmt, **kw)
    return out.getvalue()


def _photo(h: int = 48, w: int = 64) -> np.ndarray:
    """Smooth gradients with texture: what a JPEG's chroma and DCT steps actually change."""
    y, x = np.mgrid[0:h, 0:w]
    noise = np.random.default_rng(3).integers(0, 40, (h, w, 3))
    arr = np.stack([x * 255 // w, y * 255 // h, (x + y) * 127 // (w + h) + 60], axis=2) + noise
    return np.clip(arr, 0, 255).astype(np.uint8)


def _kinds() -> dict[str, bytes]:
    rgb = Image.fromarray(_photo())
    pal = Image.new("P", (10, 8), 1)
    pal.putpalette([0, 0, 0, 200, 10, 10] + [0] * 762)
    return {
        "photo.jpg": _encode(rgb, "JPEG", quality=90),
        "progressive.jpg": _encode(rgb, "JPEG", quality=90, progressive=True),
        "grey.jpg": _encode(rgb.convert("L"), "JPEG"),
        "cmyk.jpg": _encode(rgb.convert("CMYK"), "JPEG"),
        "rgb.png": _encode(rgb, "PNG"),
        "palette.png": _encode(pal, "PNG"),
        "rgba.png": _encode(rgb.convert("RGBA"), "PNG"),
        "grey_alpha.png": _encode(rgb.convert("LA"), "PNG"),
        "grey16.png": _encode(Image.fromarray((_photo()[:, :, 0].astype(np.uint16) * 257)), "PNG"),
        "still.webp": _encode(rgb, "WEBP", lossless=True),
        "anim.gif": _encode(rgb.convert("P"), "GIF", save_all=True, append_images=[rgb.rotate(90).convert("P")]),
    }


@pytest.mark.parametrize("name", sorted(_kinds()))
def test_every_kind_decodes_to_rgb_under_each_decoder(each_decoder: str, name: str):
    data = _kinds()[name]
    img = decode.decode_rgb(data, name)
    assert img.dtype == torch.uint8 and img.ndim == 3 and img.shape[0] == 3, (each_decoder, img.shape)
    with Image.open(io.BytesIO(data)) as pil:
        assert tuple(img.shape[1:]) == (pil.height, pil.width)
        want = np.asarray(pil.convert("RGB"), dtype=np.int32) if not name.startswith("grey16") else None
    got = img.permute(1, 2, 0).numpy().astype(np.int32)
    if name.startswith("grey16"):  # the top byte, not PIL's clipping
        assert np.array_equal(got[:, :, 0], _photo()[:, :, 0]) and np.array_equal(got[:, :, 0], got[:, :, 2])
    elif name == "palette.png":
        assert img[:, 0, 0].tolist() == [200, 10, 10]
    else:  # PIL's own decode; JPEG's chroma upsampling may differ by a few levels between libraries
        assert np.abs(got - want).mean() < (2.0 if name.endswith(".jpg") else 0.01), name


@pytest.mark.parametrize("name", ["photo.jpg", "rgb.png"])
def test_a_truncated_file_is_one_line_naming_it_under_each_decoder(each_decoder: str, name: str):
    data = _kinds()[name]
    with pytest.raises(DataError) as err:
        decode.decode_rgb(data[: len(data) // 3], f"train/a/{name}")
    line = err.value.message
    assert f"'train/a/{name}'" in line and "\n" not in line and ".cpp" not in line, line


def test_torchcodec_and_torchvision_give_identical_pixels():
    pytest.importorskip("torchcodec.decoders", reason="the torchcodec extra is not installed")
    before = decode.decoder()
    try:
        for name, data in _kinds().items():
            decode.use("torchvision")
            a = decode.decode_rgb(data, name)
            decode.use("torchcodec")
            b = decode.decode_rgb(data, name)
            assert torch.equal(a, b), name
    finally:
        decode.use(before)


def test_the_decoded_cache_key_tells_pils_pixels_apart(tmp_path: Path):
    for label in ("a", "b"):
        (tmp_path / label).mkdir()
        (tmp_path / label / "x.jpg").write_bytes(_kinds()["photo.jpg"])
    index = scan(tmp_path)
    before = decode.decoder()
    try:
        keys = {}
        for name in decode.available():
            decode.use(name)
            keys[name] = decoded_cache.cache_key(index, 16)
    finally:
        decode.use(before)
    assert keys["pil"] != keys["torchvision"]  # a cache PIL built is rebuilt for the other decoders
    if "torchcodec" in keys:
        assert keys["torchcodec"] == keys["torchvision"]  # identical pixels (the test above): one cache


def test_data_decoder_values_and_the_one_line_refusal():
    assert config.load(None, ["data.decoder=pil"]).data.decoder == "pil"
    with pytest.raises(ConfigError, match="data.decoder"):
        config.load(None, ["data.decoder=nvjpeg"])
    # torchcodec made unimportable in a real process: auto falls back, a forced torchcodec is refused
    code = ("import sys; sys.modules['torchcodec'] = None\n"
            "from ddp_trainer.data import decode\n"
            "print(decode.use('auto'), decode.decoder_name())\n"
            "from ddp_trainer.errors import ConfigError\n"
            "try:\n    decode.use('torchcodec')\nexcept ConfigError as e:\n    print(e.message)\n")
    out = subprocess.run([PY, "-c", code], capture_output=True, text=True, env=child_env(), timeout=120)
    lines = out.stdout.splitlines()
    assert out.returncode == 0, out.stderr
    assert lines[0] == "torchvision torchvision.io (JPEG, PNG, GIF, WebP) + PIL"
    assert lines[1].startswith("data.decoder=torchcodec: torchcodec does not import here") and len(lines) == 2


def test_the_start_up_log_names_the_decoder(small_args: list[str]):
    res = launch(1, *small_args, "train.epochs=1", "data.decoder=pil")
    assert res.returncode == 0, res.stderr
    line = next(line for line in res.stderr.splitlines() if "data: " in line and " val images" in line)
    # data.reduced_decode is on by default: the line states the rule (under PIL, the draft at every scale)
    assert "decoder PIL; reduced decode: JPEGs by PIL's draft at 1/2 or 1/4 or 1/8" in line, line
