"""Images as cameras and scanners write them: turned by EXIF orientation, 16-bit and float scaled,
decompression bombs refused before decoding, animations' first frames alike."""
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import PY, run
from PIL import Image, ImageOps

from ddp_trainer.data import decoded_cache
from ddp_trainer.data.folder_index import scan
from ddp_trainer.data.images import load_rgb
from ddp_trainer.data.transforms import ImageTransform
from ddp_trainer.errors import DataError

pytestmark = pytest.mark.usefixtures("each_decoder")  # every guarantee holds under each decoder


def _oriented_jpeg(path: Path, orientation: int = 6) -> Path:
    """A phone's picture: stored 40 wide x 20 high, meant to be seen turned (orientation 6: 90 degrees)."""
    arr = np.zeros((20, 40, 3), dtype=np.uint8)
    arr[:, :20] = (220, 30, 30)  # the left half red, the right half blue
    arr[:, 20:] = (30, 30, 220)
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(arr).save(path, quality=95, exif=exif.tobytes())
    return path


def test_exif_orientation_turns_the_picture_in_training_and_in_the_cache(tmp_path):
    path = _oriented_jpeg(tmp_path / "phone.jpg")
    img = load_rgb(str(path))
    with Image.open(path) as pil:
        want = torch.from_numpy(np.array(ImageOps.exif_transpose(pil).convert("RGB"))).permute(2, 0, 1)
    assert tuple(img.shape) == (3, 40, 20)  # was: 3x20x40, trained sideways
    assert torch.equal(img, want)
    # the decoded cache builds through the same decoder
    root = tmp_path / "data"
    for label in ("a", "b"):
        (root / label).mkdir(parents=True)
        shutil.copy(path, root / label / "x.jpg")
    index = scan(root)
    cache = decoded_cache.build(index, 16, tmp_path / "cache")
    stored = torch.from_numpy(np.fromfile(cache, dtype=np.uint8).reshape(2, 3, 16, 16)[0])
    assert torch.equal(stored, ImageTransform(16).fit(img))


def test_16_bit_and_float_tiffs_are_scaled_not_clipped(tmp_path):
    grey16 = np.linspace(0, 60000, 32 * 32).reshape(32, 32).astype(np.uint16)
    Image.fromarray(grey16).save(tmp_path / "scan16.tif")
    floats = np.linspace(0, 1, 32 * 32, dtype=np.float32).reshape(32, 32)
    Image.fromarray(floats).save(tmp_path / "float.tif")
    a = load_rgb(str(tmp_path / "scan16.tif"))
    b = load_rgb(str(tmp_path / "float.tif"))
    # was: 16-bit clipped at 255 (almost all white), float cast (all black)
    assert torch.equal(a[0], torch.from_numpy((grey16 >> 8).astype(np.uint8)))
    assert torch.equal(b[1], torch.from_numpy(np.round(floats * 255).astype(np.uint8)))
    assert torch.equal(a[0], a[2])


def test_a_decompression_bomb_is_refused_before_it_is_decoded(tmp_path, each_decoder):
    bomb = tmp_path / "bomb.png"
    limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        Image.new("L", (3000, 3000)).save(bomb)  # 9 MB of pixels, a few KB on disk
    finally:
        Image.MAX_IMAGE_PIXELS = limit
    assert bomb.stat().st_size < 100_000
    with pytest.raises(DataError) as info:
        load_rgb(str(bomb), max_pixels=1_000_000)
    assert info.value.message.startswith(f"image '{bomb}' is 3000x3000 = 9,000,000 pixels, more than "
                                         f"data.max_image_pixels=1,000,000")
    assert load_rgb(str(bomb)).shape == (3, 3000, 3000)  # under the default limit it decodes
    # check --verify names it (was: "readable")
    root = tmp_path / "data"
    for split in ("train", "val"):
        for label in ("a", "b"):
            (root / split / label).mkdir(parents=True)
            Image.new("RGB", (8, 8), (9, 9, 9)).save(root / split / label / "ok.png")
    shutil.copy(bomb, root / "train" / "a" / "bomb.png")
    res = run([PY, "-m", "ddp_trainer", "check", f"data.root={root}", "--verify", "data.max_image_pixels=1000000",
               "data.num_workers=0", "model.name=tiny_cnn", f"data.decoder={each_decoder}"], timeout=120)
    assert res.returncode == 2, res.stdout + res.stderr
    assert "'a/bomb.png': image" in res.stdout and "more than data.max_image_pixels=1,000,000" in res.stdout


def test_an_animated_webp_gives_its_first_frame_as_an_animated_gif_does(tmp_path):
    frames = [Image.new("RGB", (16, 16), c) for c in ((250, 10, 10), (10, 250, 10))]
    for name in ("anim.webp", "anim.gif"):
        frames[0].save(tmp_path / name, save_all=True, append_images=frames[1:], duration=100, loop=0,
                       **({"lossless": True} if name.endswith(".webp") else {}))
    webp, gif = load_rgb(str(tmp_path / "anim.webp")), load_rgb(str(tmp_path / "anim.gif"))  # was: webp refused
    assert webp.shape == gif.shape == (3, 16, 16)
    assert webp[0].float().mean() > 200 and webp[1].float().mean() < 50  # the first (red) frame
    assert (webp.int() - gif.int()).abs().max() <= 8  # GIF's palette may round the red
