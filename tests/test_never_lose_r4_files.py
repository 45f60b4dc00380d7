"""Never lose a run, round 4 (issue 28 A, E, G, H): a checkpoint the filesystem will not give now is not a
damaged one; resume tries files by the state they hold; folders that cannot be written are found at
start-up; clear messages for folders, foreign zips and bad images; no library globals changed per call;
retention that logs what it deletes."""
from __future__ import annotations

import builtins
import errno
import io
import os
import shutil
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import PY, ROOT, launch, run
from test_never_lose import _args, _snapshot, finished  # noqa: F401 - finished: a fixture

from ddp_trainer import config as config_mod
from ddp_trainer.checkpoint.format import FORMAT, FORMAT_VERSION, with_checksum
from ddp_trainer.errors import CheckpointError, DataError
from ddp_trainer.training.resume import find_resume


# -- A: resume=auto, in process --------------------------------------------------------------------------

def _ckpt(path: Path, epoch: int, step: int, complete: bool = True, position: int = 0) -> Path:
    """A small file of this project's format holding (epoch, step)."""
    torch.save(with_checksum({"format": FORMAT, "format_version": FORMAT_VERSION, "model": {"w": torch.zeros(3)},
                              "epoch": epoch, "step": step, "epoch_complete": complete, "position": position}),
               path)
    return path


def _auto() -> config_mod.Config:
    return config_mod.load(None, ["resume=auto"])


def _folder(tmp_path: Path) -> Path:
    """last.pt == epoch_0002.pt (epoch 2, step 30), epoch_0001.pt (epoch 1, step 20)."""
    ck = tmp_path / "checkpoints"
    ck.mkdir()
    _ckpt(ck / "epoch_0001.pt", 1, 20)
    _ckpt(ck / "epoch_0002.pt", 2, 30)
    os.link(ck / "epoch_0002.pt", ck / "last.pt")
    return ck


def test_candidates_are_tried_by_the_state_they_hold_not_by_name(tmp_path):
    ck = tmp_path / "checkpoints"
    ck.mkdir()
    _ckpt(ck / "last.pt", 1, 20)  # an older state under the name tried first
    _ckpt(ck / "epoch_0001.pt", 1, 20)
    _ckpt(ck / "best_epoch_0002.pt", 2, 30)
    _ckpt(ck / "best.pt", 3, 40)  # the newest: pruned epoch files, last.pt replaced by hand
    found = find_resume(_auto(), ck, {}, trust=False)
    assert found.path == str(ck / "best.pt") and found.start_epoch == 4
    # a mid-epoch file of epoch 3 is newer than epoch 2's end, older than epoch 3's end
    (ck / "best.pt").unlink()
    _ckpt(ck / "last.pt", 3, 35, complete=False, position=16)
    found = find_resume(_auto(), ck, {}, trust=False)
    assert found.path == str(ck / "last.pt") and (found.start_epoch, found.start_position) == (3, 16)


@pytest.mark.parametrize("where", ["folder", "fifo"])
def test_a_folder_or_fifo_where_the_newest_file_should_be_stops_resume(tmp_path, where):
    ck = _folder(tmp_path)
    for name in ("last.pt", "epoch_0002.pt"):
        (ck / name).unlink()
        os.mkdir(ck / name) if where == "folder" else os.mkfifo(ck / name)
    with pytest.raises(CheckpointError) as err:
        find_resume(_auto(), ck, {}, trust=False)
    kind = "is a folder, not a checkpoint file" if where == "folder" else "is a FIFO, not a regular file"
    assert kind in err.value.message and "last.pt" in err.value.message


@pytest.mark.parametrize("fault", ["ESTALE at open", "EIO mid-read", "EACCES at open"])
def test_an_os_error_reading_the_newest_file_stops_resume_naming_it(tmp_path, monkeypatch, fault):
    ck = _folder(tmp_path)
    target = os.path.realpath(ck / "last.pt")
    code = {"ESTALE": errno.ESTALE, "EIO": errno.EIO, "EACCES": errno.EACCES}[fault.split()[0]]
    real_open = builtins.open

    class FailingRead(io.FileIO):
        def readinto(self, b):
            if self.tell() > 100:
                raise OSError(code, os.strerror(code))
            return super().readinto(b)

    def fake_open(file, mode="r", *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and os.path.realpath(file) in (target, str(ck / "epoch_0002.pt")):
            if fault.endswith("at open"):
                raise OSError(code, os.strerror(code), str(file))
            return FailingRead(file, "r")
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", fake_open)
    with pytest.raises(CheckpointError) as err:
        find_resume(_auto(), ck, {}, trust=False)
    msg = err.value.message
    assert "cannot be read" in msg and errno.errorcode[code] in msg and "not a damaged file" in msg, msg
    assert "last.pt" in msg or "epoch_0002.pt" in msg


def test_a_checkpoint_folder_that_cannot_be_listed_stops_resume(tmp_path, monkeypatch):
    ck = _folder(tmp_path)
    real = os.scandir

    def scandir(path="."):
        if os.fspath(path) == str(ck):
            raise PermissionError(errno.EACCES, "Permission denied", str(ck))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(CheckpointError) as err:
        find_resume(_auto(), ck, {}, trust=False)
    assert f"checkpoint folder '{ck}' cannot be read (PermissionError EACCES" in err.value.message


def test_damaged_content_is_still_skipped_for_the_next_newest(tmp_path):
    ck = _folder(tmp_path)
    data = (ck / "last.pt").read_bytes()
    for name in ("last.pt", "epoch_0002.pt"):
        (ck / name).unlink()
        (ck / name).write_bytes(data[: len(data) // 2])
    found = find_resume(_auto(), ck, {}, trust=False)
    assert found.path == str(ck / "epoch_0001.pt")


# -- A: end to end -----------------------------------------------------------------------------------------

def test_resume_stops_at_an_unreadable_newest_checkpoint_and_changes_nothing(finished, demo_small, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    ck = out / "checkpoints"
    for name in ("last.pt", "epoch_0001.pt"):  # the newest state, under both its names: FIFOs now
        (ck / name).unlink()
        os.mkfifo(ck / name)
    before = _snapshot(out)
    res = launch(0, *_args(demo_small, out, "train.epochs=3"), timeout=120)
    assert res.returncode == 2, res.stderr
    (err,) = [l for l in res.stderr.splitlines() if "error:" in l]
    assert "is a FIFO, not a regular file" in err and ("last.pt" in err or "epoch_0001.pt" in err)
    assert "skipping" not in res.stderr and "resume: from" not in res.stderr
    assert _snapshot(out) == before  # epoch_0000.pt kept, nothing trained, written or pruned


def _without_root_file_access(cmd: list[str]) -> list[str]:
    """``cmd`` run as root without the capabilities that let root read a mode-000 file
    (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH): file modes then apply to it as to any user, so
    opening such a file fails with a real PermissionError (EACCES), as a user's resume meets it."""
    return ["setpriv", "--bounding-set=-dac_override,-dac_read_search", *cmd]


def test_resume_stops_at_a_mode_000_newest_checkpoint_as_a_user_meets_it(finished, demo_small, tmp_path):
    """Issue 28 A.1 as reported: epoch_0001.pt (and its hard links last.pt, best.pt) mode 000."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to drop root's file-access capabilities (as a non-root user "
                    "the mode alone does it: see test_an_os_error_reading_the_newest_file_stops_resume_naming_it)")
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    ck = out / "checkpoints"
    newest = [n for n in ("last.pt", "epoch_0001.pt", "best.pt")
              if os.path.samefile(finished / "checkpoints" / n, finished / "checkpoints" / "epoch_0001.pt")]
    for name in newest:
        os.chmod(ck / name, 0)
    before = _snapshot(out)
    res = run(_without_root_file_access([PY, str(ROOT / "launch.py"), *_args(demo_small, out, "train.epochs=3")]),
              timeout=120, cold=True)
    assert res.returncode == 2, res.stderr
    (err,) = [l for l in res.stderr.splitlines() if "error:" in l]
    assert "cannot be read" in err and "EACCES" in err and "not a damaged file" in err, err
    assert any(name in err for name in ("last.pt", "epoch_0001.pt", "best.pt")), err
    assert "skipping" not in res.stderr and "resume: from" not in res.stderr
    assert _snapshot(out) == before  # epoch_0000.pt kept, nothing trained, written or pruned
    assert all(os.stat(ck / name).st_mode & 0o777 == 0 for name in newest)


def _ro_mount(folder: Path, cmd: list[str]) -> list[str]:
    """``cmd`` run with ``folder`` mounted read-only in a private mount namespace (root ignores modes)."""
    return ["unshare", "-m", "sh", "-c", 'mount --bind -o ro "$0" "$0" && exec "$@"', str(folder), *cmd]


@pytest.mark.parametrize("which", ["checkpoints", "output_dir"])
def test_a_folder_that_cannot_be_written_is_found_at_start_up(finished, demo_small, tmp_path, which):
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare for a read-only bind mount")
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    folder = out / "checkpoints" if which == "checkpoints" else out
    before = _snapshot(out)
    res = run(_ro_mount(folder, [PY, str(ROOT / "launch.py"), *_args(demo_small, out, "train.epochs=3")]),
              timeout=120)
    assert res.returncode == 2, res.stderr
    (err,) = [l for l in res.stderr.splitlines() if "error:" in l]
    assert f"'{folder}' cannot be written" in err and "Read-only file system" in err, err
    assert "epoch 2" not in res.stderr  # found before training
    assert _snapshot(out) == before


# -- H: messages of the commands ---------------------------------------------------------------------------

def _cli(capsys, *argv: str) -> tuple[int, str]:
    from ddp_trainer.cli import main

    code = main(list(argv))
    return code, capsys.readouterr().err


@pytest.mark.parametrize("command", ["inspect", "convert", "evaluate", "predict"])
def test_a_folder_given_as_a_checkpoint_is_named_a_folder_with_its_files(finished, tmp_path, capsys, command):
    ck = finished / "checkpoints"
    argv = {"inspect": ["inspect", str(ck)], "convert": ["convert", str(ck), str(tmp_path / "out.pt")],
            "evaluate": ["evaluate", "--checkpoint", str(ck)],
            "predict": ["predict", "--checkpoint", str(finished), str(tmp_path / "x.png")]}[command]
    code, err = _cli(capsys, *argv)
    assert code == 2, err
    named = finished if command == "predict" else ck
    assert f"checkpoint '{named}' is a folder, not a checkpoint file; give one of its files, e.g. " \
           f"'{ck / 'last.pt'}'" in err, err
    assert "not found" not in err and not (tmp_path / "out.pt").exists()


def test_resume_from_a_folder_is_named_a_folder(finished, demo_small, tmp_path):
    res = launch(0, *_args(demo_small, tmp_path / "run", f"resume={finished / 'checkpoints'}"), timeout=120)
    assert res.returncode == 2, res.stderr
    (err,) = [l for l in res.stderr.splitlines() if "error:" in l]
    assert "is a folder, not a checkpoint file" in err and "last.pt" in err and "not found" not in err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_zip_that_is_not_a_checkpoint_is_named_so_without_torch_internals(tmp_path, capsys):
    z = tmp_path / "weights.pt"
    with zipfile.ZipFile(z, "w") as f:
        f.writestr("notes.txt", "hello")
        f.writestr("data/values.csv", "1,2")
    code, err = _cli(capsys, "inspect", str(z))
    assert code == 2
    assert f"'{z}' is a zip archive, not a checkpoint (torch.save's archives hold a data.pkl; this one holds " \
           f"notes.txt, data/values.csv)" in err, err
    assert "enforce fail" not in err and "inline_container" not in err


def test_predict_names_a_bad_image_without_training_keys_and_predicts_the_others(finished, demo_small, tmp_path):
    good = sorted((demo_small / "val").rglob("*.png"))[:2]
    fake = tmp_path / "photo.jpg"
    fake.write_text("this is a text file, not a JPEG\n")
    res = run([PY, "-m", "ddp_trainer", "predict", "--checkpoint", str(finished / "checkpoints" / "last.pt"),
               str(good[0]), str(fake), str(good[1])], timeout=120)
    assert res.returncode == 2, res.stderr
    assert [l.split(":")[0] for l in res.stdout.splitlines()] == [str(good[0]), str(good[1])], res.stdout
    errors = [l for l in res.stderr.splitlines() if "error:" in l]
    assert any(f"cannot decode image '{fake}'" in l for l in errors), res.stderr
    assert "bad_images" not in res.stderr and "data." not in res.stderr
    assert "1 of 3 image(s) could not be read" in errors[-1]


# -- E: no library global changed per call -----------------------------------------------------------------

def _images(demo_small: Path, tmp_path: Path) -> list[str]:
    """PNGs of the demo set and the same pictures as JPEG, turned by EXIF (PIL's decode path)."""
    from PIL import Image

    pngs = sorted(str(p) for p in (demo_small / "train").rglob("*.png"))[:20]
    turned = []
    for i, p in enumerate(pngs[:5]):
        with Image.open(p) as im:
            exif = Image.Exif()
            exif[0x0112] = 6
            out = tmp_path / f"turned{i}.jpg"
            im.convert("RGB").save(out, exif=exif)
            turned.append(str(out))
    return pngs + turned


def test_decoding_leaves_pils_decompression_bomb_guard_on(demo_small, tmp_path, monkeypatch):
    from PIL import Image

    from ddp_trainer.data import decode, images

    before = Image.MAX_IMAGE_PIXELS
    seen = []
    real_open = Image.open

    def open_(*args, **kwargs):  # what PIL's guard is at each open the decoder makes
        seen.append(Image.MAX_IMAGE_PIXELS)
        return real_open(*args, **kwargs)

    monkeypatch.setattr(Image, "open", open_)
    for path in _images(demo_small, tmp_path):
        images.load_rgb(path)
        images.load_rgb_cropped(path, images.MAX_IMAGE_PIXELS, lambda h, w: (0, 0, h // 2, w // 2), 4,
                                decode.F.InterpolationMode.BILINEAR)
    assert seen and set(seen) == {before}, set(seen)
    assert Image.MAX_IMAGE_PIXELS == before


def test_two_decoding_threads_leave_pils_guard_as_it_was(demo_small, tmp_path):
    import threading

    from PIL import Image

    from ddp_trainer.data import images

    paths = _images(demo_small, tmp_path)
    before = Image.MAX_IMAGE_PIXELS

    def decode():
        for _ in range(10):
            for path in paths:
                images.load_rgb(path)

    threads = [threading.Thread(target=decode) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert Image.MAX_IMAGE_PIXELS == before


def test_a_limit_above_pils_is_raised_once_and_never_lowered(tmp_path):
    from PIL import Image

    from ddp_trainer.data import decode, images

    before = Image.MAX_IMAGE_PIXELS
    wide = tmp_path / "wide.png"
    Image.new("L", (30000, 6100)).save(wide)  # 183 M pixels: above twice PIL's limit (PIL refuses it)
    try:
        with pytest.raises(DataError) as err:  # the default limit: refused (PIL's guard fires first), named
            images.load_rgb(str(wide), max_pixels=images.MAX_IMAGE_PIXELS)
        assert f"image '{wide}' is 183,000,000 pixels, more than data.max_image_pixels=89,478,485" in err.value.message
        assert Image.MAX_IMAGE_PIXELS == before
        head = decode._header(str(wide), wide.read_bytes(), 200_000_000)  # allowed: PIL must open it
        assert (head.width, head.height) == (30000, 6100)
        assert Image.MAX_IMAGE_PIXELS == 100_000_000  # raised to half the limit, PIL refusing at twice
        decode._header(str(wide), wide.read_bytes(), 190_000_000)
        assert Image.MAX_IMAGE_PIXELS == 100_000_000  # never lowered
    finally:
        Image.MAX_IMAGE_PIXELS = before


# -- G: retention and config -------------------------------------------------------------------------------

def test_keep_last_0_removes_no_epoch_file_of_before_and_says_so(tmp_path, caplog):
    from ddp_trainer.checkpoint.writer import CheckpointWriter

    ck = tmp_path / "checkpoints"
    ck.mkdir()
    for e in range(3):
        _ckpt(ck / f"epoch_{e:04d}.pt", e, 10 * e)
    caplog.set_level("INFO", logger="ddp_trainer")
    writer = CheckpointWriter(ck, keep_last=0)
    writer.save({"epoch": 3, "model": {"w": torch.zeros(1)}}, epoch_file=3)
    assert sorted(p.name for p in ck.iterdir()) == ["epoch_0000.pt", "epoch_0001.pt", "epoch_0002.pt", "last.pt"]
    assert "the 3 there from before are kept (epoch_0000.pt, epoch_0001.pt, epoch_0002.pt)" in caplog.text


def test_pruned_epoch_files_are_logged(tmp_path, caplog):
    from ddp_trainer.checkpoint.writer import CheckpointWriter

    ck = tmp_path / "checkpoints"
    caplog.set_level("INFO", logger="ddp_trainer")
    writer = CheckpointWriter(ck, keep_last=1)
    for e in range(3):
        writer.save({"epoch": e}, epoch_file=e)
    assert sorted(p.name for p in ck.iterdir()) == ["epoch_0002.pt", "last.pt"]
    assert "checkpoint: removed epoch_0000.pt (checkpoint.keep_last=1)" in caplog.text
    assert "checkpoint: removed epoch_0001.pt (checkpoint.keep_last=1)" in caplog.text


def test_resume_with_keep_last_0_keeps_the_earlier_epoch_files(finished, demo_small, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    res = launch(0, *_args(demo_small, out, "train.epochs=3", "checkpoint.keep_last=0"), timeout=120)
    assert res.returncode == 0, res.stderr
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert "epoch_0000.pt" in names and "epoch_0001.pt" in names and "epoch_0002.pt" not in names
    assert "checkpoint.keep_last=0: this run writes no epoch files and removes none" in res.stderr
    assert torch.load(out / "checkpoints" / "last.pt", weights_only=True)["epoch"] == 2


def test_replaced_keeps_the_last_earlier_run_only_and_logs_what_it_deletes(small_args, tmp_path):
    out = tmp_path / "run"
    args = [*small_args, "train.epochs=1", "data.num_workers=0"]
    assert launch(0, *args, timeout=120).returncode == 0
    (out / "replaced" / "notes").mkdir(parents=True)  # not a run set aside: left alone
    sizes = []
    for _ in range(3):
        res = launch(0, *args, "resume=none", "overwrite=true", timeout=120)
        assert res.returncode == 0, res.stderr
        runs = sorted(p.name for p in (out / "replaced").iterdir() if p.name != "notes")
        sizes.append(len(runs))
    assert sizes == [1, 1, 1]
    assert "resume=none: deleted " in res.stderr and "replaced/ keeps the last 1" in res.stderr
    assert (out / "replaced" / "notes").is_dir()
    assert (out / "replaced" / runs[0] / "checkpoints" / "last.pt").is_file()  # the run just replaced


def test_ra_repeats_that_leave_one_image_per_epoch_are_refused(small_args, tmp_path):
    res = launch(0, *small_args, "data.sampler=repeated_augment", "data.ra_repeats=1000000000", timeout=120)
    assert res.returncode == 2, res.stderr
    (err,) = [l for l in res.stderr.splitlines() if "error:" in l]
    assert "data.ra_repeats=1000000000 with data.sampler=repeated_augment and 120 training image(s)" in err
    assert "data.ra_repeats=3" in err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_the_repeated_augment_log_line_counts_what_is_drawn(small_args):
    res = launch(0, *small_args, "train.epochs=1", "data.sampler=repeated_augment", "data.ra_repeats=50",
                 timeout=120)
    assert res.returncode == 0, res.stderr
    assert "each epoch draws 120 images, 3 distinct ones 50 time(s) each (the last one 20 time(s))" in res.stderr
