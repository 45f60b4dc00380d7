"""data.reduced_decode: a JPEG is decoded at 1/2, 1/4 or 1/8 scale when its random crop (or the
decoded cache's side) needs no more pixels. The crop box is exactly RandomResizedCrop's (drawn from
the header's size, the same generator), the pixels differ from a full decode + resize only by the
smaller intermediate picture (bounded here), and every sample stays reproducible."""
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ddp_trainer.data import decoded_cache
from ddp_trainer.data.datasets import FolderDataset
from ddp_trainer.data.folder_index import scan
from ddp_trainer.data.images import jpeg_reduction, load_rgb
from ddp_trainer.data.samplers import SampleKey
from ddp_trainer.data.transforms import ImageTransform, sample_seed

# the mean absolute difference per channel value (0-255) allowed between a reduced and a full
# decode of the same crop, per image, and over all of them. Measured on these pictures (grain at
# the pixel level: the hard case) at 32 px: at most 2.3, 1.4 on average over the 56 samples
# (non-reduced ones count 0); two different crops of the same pictures differ by 56 on average.
TOLERANCE, MEAN_TOLERANCE = 5.0, 2.5


def photo(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """Smooth light, texture and grain, plus a bright disc: pixels a JPEG encoder works for."""
    small = rng.normal(128, 60, (height // 16 + 1, width // 16 + 1, 3)).clip(0, 255).astype(np.uint8)
    base = np.asarray(Image.fromarray(small).resize((width, height), Image.BICUBIC), dtype=np.float64)
    base += rng.normal(0, 10, (height, width, 3))
    yy, xx = np.mgrid[:height, :width]
    cy, cx, r = rng.integers(height // 4, 3 * height // 4), rng.integers(width // 4, 3 * width // 4), height // 5
    base[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = [240, 60, 40]
    return Image.fromarray(base.clip(0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(3)
    for c in ("a", "b"):
        (root / c).mkdir()
        for i in range(6):
            w, h = (500, 375) if i % 2 else (375, 500)
            photo(rng, w, h).save(root / c / f"{i}.jpg", quality=90)
    (root / "b" / "drawn.png").write_bytes(_png(photo(rng, 400, 300)))
    turned = photo(rng, 500, 375)
    exif = Image.Exif()
    exif[0x0112] = 6  # turned 90 degrees: decoded in full, by PIL, as before
    turned.save(root / "b" / "turned.jpg", quality=90, exif=exif)
    return root


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def datasets(photos: Path, size: int = 32):
    idx = scan(photos)
    tf = ImageTransform(size, ("random_resized_crop", "flip"))
    return idx, FolderDataset(idx, tf, seed=1), FolderDataset(idx, tf, seed=1, reduced_decode=True)


@pytest.mark.usefixtures("each_decoder")
def test_reduced_crops_match_full_decodes_within_the_tolerance(photos: Path):
    idx, full, reduced = datasets(photos)
    diffs, used = [], 0
    tf = full.transform
    for i in range(len(idx)):
        for epoch in range(4):
            key = SampleKey(i, epoch, 1.0)
            a, b = full[key][0].float(), reduced[key][0].float()
            assert a.shape == b.shape == (3, 32, 32)
            diffs.append((a - b).abs().mean().item())
            # where the reduction applied: the box RandomResizedCrop draws from the header's size
            gen = torch.Generator().manual_seed(sample_seed(1, epoch, i))
            img = load_rgb(idx.path(i))
            _, _, h, w = tf.crop_box(img.shape[-2], img.shape[-1], gen)
            used += idx.rel(i).endswith(".jpg") and "turned" not in idx.rel(i) and jpeg_reduction(w, h, 32) > 1
    assert used >= 20  # most crops of these pictures need a quarter of their pixels or fewer
    assert max(diffs) <= TOLERANCE and sum(diffs) / len(diffs) <= MEAN_TOLERANCE, (max(diffs), sum(diffs) / len(diffs))
    # the bound means something: other samples' crops differ far more
    others = [(full[SampleKey(i, 0, 1.0)][0].float() - reduced[SampleKey(i, 1, 1.0)][0].float()).abs().mean().item()
              for i in range(len(idx))]
    assert sum(others) / len(others) > 3 * MEAN_TOLERANCE, others


@pytest.mark.usefixtures("each_decoder")
def test_reduced_samples_are_reproducible_and_keep_the_flip(photos: Path):
    idx, full, reduced = datasets(photos)
    for i in range(len(idx)):
        key = SampleKey(i, 2, 1.0, 1)
        once, again = reduced[key][0], reduced[key][0]
        assert torch.equal(once, again)
        a = full[key][0].float()
        # the generator continues after the box exactly as in the full path: the same flip decision
        assert (a - once.float()).abs().mean() < (a.flip(-1) - once.float()).abs().mean()


@pytest.mark.usefixtures("each_decoder")
def test_pngs_and_turned_jpegs_are_decoded_exactly_as_before(photos: Path):
    idx, full, reduced = datasets(photos)
    for i in range(len(idx)):
        if idx.rel(i).endswith((".png", "turned.jpg")):
            for epoch in range(3):
                key = SampleKey(i, epoch, 1.0)
                assert torch.equal(full[key][0], reduced[key][0]), idx.rel(i)


@pytest.mark.usefixtures("each_decoder")
def test_off_is_todays_pixels(photos: Path):
    idx = scan(photos)
    tf = ImageTransform(32, ("random_resized_crop", "flip"))
    plain = FolderDataset(idx, tf, seed=1)
    for i in range(len(idx)):
        key = SampleKey(i, 0, 1.0)
        gen = torch.Generator().manual_seed(sample_seed(1, 0, i))
        assert torch.equal(plain[key][0], tf(load_rgb(idx.path(i)), gen))


@pytest.mark.usefixtures("each_decoder")
def test_the_decoded_cache_built_reduced_is_close_and_has_its_own_key(photos: Path, tmp_path: Path):
    idx = scan(photos)
    full = decoded_cache.build(idx, 40, tmp_path / "c")
    reduced = decoded_cache.build(idx, 40, tmp_path / "c", reduced=True)
    assert full != reduced  # toggling data.reduced_decode builds its own cache
    a = decoded_cache.CachedImages(full, len(idx), 40)
    b = decoded_cache.CachedImages(reduced, len(idx), 40)
    for i in range(len(idx)):
        assert (a[i].float() - b[i].float()).abs().mean() <= TOLERANCE, idx.rel(i)
    assert any(not torch.equal(a[i], b[i]) for i in range(len(idx)))  # 500x375 -> 40: drafted at 1/4


@pytest.fixture(scope="module")
def photo_tree(tmp_path_factory) -> Path:
    """train/ and val/ of 200x150 JPEG photos: a 16 px random crop of one needs a quarter of its
    pixels or fewer, so nearly every training sample is decoded reduced."""
    root = tmp_path_factory.mktemp("photo_tree")
    rng = np.random.default_rng(5)
    for split, count in (("train", 10), ("val", 2)):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True)
            for i in range(count):
                w, h = (200, 150) if i % 2 else (150, 200)
                photo(rng, w, h).save(root / split / c / f"{i}.jpg", quality=90)
    return root


def _train(photo_tree: Path, out: Path, *more: str, env: dict | None = None):
    from conftest import launch

    return launch(1, f"data.root={photo_tree}", f"output_dir={out}", "model.name=tiny_cnn", "data.image_size=16",
                  "data.batch_size=4", "data.num_workers=1", "data.augment=[random_resized_crop,flip]",
                  "train.epochs=2", "checkpoint.every_steps=2", "checkpoint.async=false", "optim.lr=0.05", "seed=3", *more, env=env)


def test_a_run_decoding_reduced_resumes_mid_epoch_bitwise(photo_tree: Path, tmp_path: Path):
    from conftest import child_env

    reference = _train(photo_tree, tmp_path / "reference")
    assert reference.returncode == 0, reference.stderr
    out, marker = tmp_path / "killed", tmp_path / "killed-once"
    first = _train(photo_tree, out, env=child_env(FAULT_EXIT_AT_STEP=f"0:3:{marker}"))
    assert first.returncode != 0 and marker.exists(), first.stderr[-2000:]
    state = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert state["position"] > 0 and not state["epoch_complete"]  # step 2 of 5: inside the first epoch
    again = _train(photo_tree, out)
    assert again.returncode == 0, again.stderr
    assert "samples into the epoch" in again.stderr
    a = torch.load(out / "checkpoints" / "last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "reference" / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in b)
    # and the reduced decode was in force: decoding in full trains other weights
    full = _train(photo_tree, tmp_path / "full", "data.reduced_decode=false")
    assert full.returncode == 0, full.stderr
    c = torch.load(tmp_path / "full" / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert any(not torch.equal(c[k], b[k]) for k in b)


# data.reduced_decode's rule (data/decode.py): PIL's draft from decode.draft_from() on, the chosen
# decoder's full decode below it. The oracles below are the libraries themselves, not the product.

def _library_full(name: str, data: bytes) -> torch.Tensor:
    """``data`` decoded in full by the library data.decoder=``name`` names, as CHW uint8."""
    if name == "torchcodec":
        from torchcodec.decoders import decode_jpeg
        return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode="RGB")
    if name == "torchvision":
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            from torchvision.io import ImageReadMode, decode_jpeg
        return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    with Image.open(io.BytesIO(data)) as pil:
        return torch.from_numpy(np.array(pil.convert("RGB"))).permute(2, 0, 1)


def _pil_draft(data: bytes, divisor: int, box: tuple[int, int, int, int], size: int) -> torch.Tensor:
    """PIL's draft at 1/``divisor``, the (top, left, h, w) box resampled at its fractional place."""
    top, left, h, w = box
    with Image.open(io.BytesIO(data)) as pil:
        width, height = pil.size
        pil.draft("RGB", (width // divisor, height // divisor))
        assert pil.size == (-(-width // divisor), -(-height // divisor))
        out = pil.resize((size, size), Image.BILINEAR,
                         box=(left / divisor, top / divisor, (left + w) / divisor, (top + h) / divisor))
        return torch.from_numpy(np.array(out.convert("RGB"))).permute(2, 0, 1)


def _full_crop(name: str, data: bytes, box: tuple[int, int, int, int], size: int) -> torch.Tensor:
    from torchvision.transforms.v2 import functional as F

    return F.resized_crop(_library_full(name, data), *box, [size, size], interpolation=F.InterpolationMode.BILINEAR,
                          antialias=True)


def test_the_rule_drafts_from_divisor_4_under_a_library_and_from_2_under_pil(each_decoder: str):
    from ddp_trainer.data import decode

    assert decode.draft_from() == (2 if each_decoder == "pil" else 4)


def test_the_rule_picks_the_draft_or_the_decoders_full_decode_by_divisor(each_decoder: str, photos: Path):
    from torchvision.transforms.v2 import functional as F

    from ddp_trainer.data import decode

    idx = scan(photos)
    seen: dict[tuple[int, str], int] = {}
    told_apart = 0  # divisor-2 samples where the draft's pixels and the full decode's differ
    # 32 px crops of these 500x375 pictures reduce by 4 or 8, 64 px ones by 2 or 4
    for i, size in ((i, size) for size in (32, 64) for i in range(len(idx))):
        tf = ImageTransform(size, ("random_resized_crop",))
        if not idx.rel(i).endswith(".jpg") or "turned" in idx.rel(i):
            continue
        data = idx.read(i)
        with Image.open(io.BytesIO(data)) as probe:
            width, height = probe.size
        for epoch in range(6):
            box = tf.crop_box(height, width, torch.Generator().manual_seed(sample_seed(1, epoch, i)))
            divisor = jpeg_reduction(box[3], box[2], size)
            got = decode.decode_rgb_cropped(data, idx.name(i), 10 ** 8, lambda h, w, b=box: b, size,
                                            F.InterpolationMode.BILINEAR)
            assert torch.equal(got, decode.decode_rgb_cropped(data, idx.name(i), 10 ** 8, lambda h, w, b=box: b,
                                                              size, F.InterpolationMode.BILINEAR))  # deterministic
            full = _full_crop(each_decoder, data, box, size)
            drafted = divisor >= decode.draft_from()
            want = _pil_draft(data, divisor, box, size) if drafted else full
            assert torch.equal(got, want), (idx.rel(i), epoch, divisor, each_decoder)
            if divisor == 2:
                told_apart += not torch.equal(_pil_draft(data, 2, box, size), full)
            kind = "draft" if drafted else "full"
            seen[(divisor, kind)] = seen.get((divisor, kind), 0) + 1
    # both branches ran, at the divisors the rule gives them under this decoder
    assert seen.get((2, "draft" if each_decoder == "pil" else "full"), 0) >= 3, seen
    assert sum(n for (d, kind), n in seen.items() if d >= 4 and kind == "draft") >= 3, seen
    assert told_apart >= 3  # the two oracles differ: the equalities above pick one of them


def test_a_reduced_cache_at_divisor_2_holds_the_decoders_full_pixels(each_decoder: str, photos: Path,
                                                                    tmp_path: Path):
    idx = scan(photos)
    side = 64  # 2 x 64 = 128 px kept: the 375 px side of these pictures gives divisor 2, not 4
    assert jpeg_reduction(500, 375, 2 * side) == 2
    full = decoded_cache.CachedImages(decoded_cache.build(idx, side, tmp_path / "c"), len(idx), side)
    reduced = decoded_cache.CachedImages(decoded_cache.build(idx, side, tmp_path / "c", reduced=True), len(idx), side)
    same = [torch.equal(full[i], reduced[i]) for i in range(len(idx))]
    if each_decoder == "pil":  # PIL drafts at 1/2 too: the JPEGs differ from the full decode
        assert not all(same)
    else:
        assert all(same)


def test_the_reduced_cache_key_names_the_rule(monkeypatch: pytest.MonkeyPatch, photos: Path):
    from ddp_trainer.data import decode

    idx = scan(photos)
    before = decode.decoder()
    try:
        decode.use("pil")  # drafting at every divisor, as before the rule: the caches it built keep their key
        assert decoded_cache._geometry(40, None, "bilinear", True) == " reduced_decode decoder=pil"
        decode.use("torchvision")
        assert decoded_cache._geometry(40, None, "bilinear", True) == " reduced_decode=draft4"
        ruled = decoded_cache.cache_key(idx, 40, reduced=True)
        assert ruled != decoded_cache.cache_key(idx, 40)  # data.reduced_decode still has its own cache
        # a rule that changes which scales the draft decodes changes the key: the cache is rebuilt
        monkeypatch.setitem(decode._DRAFT_FROM, "torchvision", 2)
        assert decoded_cache.cache_key(idx, 40, reduced=True) != ruled
        monkeypatch.setitem(decode._DRAFT_FROM, "torchvision", 8)
        assert decoded_cache.cache_key(idx, 40, reduced=True) not in (ruled, decoded_cache.cache_key(idx, 40))
    finally:
        decode.use(before)


def test_the_start_up_name_states_the_rule(each_decoder: str):
    from ddp_trainer.data import decode

    plain, ruled = decode.decoder_name(), decode.decoder_name(reduced=True)
    assert ruled.startswith(plain + "; reduced decode: JPEGs by PIL's draft at ")
    if each_decoder == "pil":
        assert "1/2 or 1/4 or 1/8" in ruled and "in full" not in ruled
    else:
        assert "at 1/4 or 1/8 " in ruled and "1/2" not in ruled
        assert ruled.endswith({"torchcodec": "TorchCodec", "torchvision": "torchvision.io"}[each_decoder] + " in full")
