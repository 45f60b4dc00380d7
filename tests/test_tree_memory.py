"""data.index_cache: a second scan of an unchanged tree lists no directory; a change in a class
folder (a file added, removed or renamed, also in a subfolder) or a class folder added or removed
lists that folder again, alone; a stale or broken memory is never trusted."""
import logging
import os
import time
from pathlib import Path

import pytest

from ddp_trainer.data.folder_index import FolderIndex, scan
from ddp_trainer.data.tree_memory import TreeMemory


def make_tree(root: Path, classes=("ant", "bee", "cat"), per_class=4) -> Path:
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            (root / c / f"{i}.png").write_bytes(b"x")
    (root / "cat" / "sub").mkdir(exist_ok=True)
    (root / "cat" / "sub" / "deep.jpg").write_bytes(b"x")
    return root


def age(root: Path, seconds: float = 60) -> None:
    """Set every directory's mtime into the past: what a tree not touched for a while looks like
    (a listing is trusted only when its directory is older than the scan by 2 s)."""
    t = time.time_ns() - int(seconds * 1e9)
    for dirpath, _, _ in os.walk(root):
        os.utime(dirpath, ns=(t, t))


def scan_logged(root: Path, memory: Path, caplog) -> tuple:
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="ddp_trainer"):
        index = scan(root, None, memory)
    lines = [r.getMessage() for r in caplog.records if "data.index_cache" in r.getMessage()]
    return index, lines


def test_an_unchanged_tree_is_not_listed_again(tmp_path: Path, caplog):
    root, memory = make_tree(tmp_path / "train"), tmp_path / "memory"
    age(root)
    first, lines = scan_logged(root, memory, caplog)
    assert lines == []  # nothing remembered yet
    assert len(list(memory.iterdir())) == 1
    second, lines = scan_logged(root, memory, caplog)
    assert second == first == scan(root)  # the same index as a scan without memory
    assert lines and "3 class folder(s) unchanged since the last scan, 0 listed again" in lines[0]
    # and a listing is really not what produced it: a file slipped in with the old mtime put back
    # (what no real change does) stays unseen, which proves the directory was not listed
    t = os.stat(root / "bee").st_mtime_ns
    (root / "bee" / "sneaky.png").write_bytes(b"x")
    os.utime(root / "bee", ns=(t, t))
    third, _ = scan_logged(root, memory, caplog)
    assert "bee/sneaky.png" not in [rel for rel, _ in third.samples]


@pytest.mark.parametrize("change", ["add", "remove", "rename", "add_in_subfolder", "new_subfolder"])
def test_a_changed_class_folder_is_listed_again_alone(change: str, tmp_path: Path, caplog):
    root, memory = make_tree(tmp_path / "train"), tmp_path / "memory"
    age(root)
    scan(root, None, memory)
    if change == "add":
        (root / "bee" / "9.png").write_bytes(b"x")
    elif change == "remove":
        (root / "bee" / "0.png").unlink()
    elif change == "rename":
        (root / "bee" / "0.png").rename(root / "bee" / "0b.png")
    elif change == "add_in_subfolder":
        (root / "cat" / "sub" / "more.jpg").write_bytes(b"x")
    else:
        (root / "bee" / "new").mkdir()
        (root / "bee" / "new" / "n.png").write_bytes(b"x")
    index, lines = scan_logged(root, memory, caplog)
    assert index == scan(root)  # exactly what a fresh scan finds
    assert "2 class folder(s) unchanged since the last scan, 1 listed again" in lines[0]


def test_class_folders_added_or_removed_are_seen(tmp_path: Path, caplog):
    root, memory = make_tree(tmp_path / "train"), tmp_path / "memory"
    age(root)
    scan(root, None, memory)
    (root / "dog").mkdir()
    (root / "dog" / "d.png").write_bytes(b"x")
    index, lines = scan_logged(root, memory, caplog)
    assert index.classes == ("ant", "bee", "cat", "dog") and index == scan(root)
    assert "3 class folder(s) unchanged since the last scan, 1 listed again" in lines[0]
    age(root)
    scan(root, None, memory)
    for f in (root / "ant").iterdir():
        f.unlink()
    (root / "ant").rmdir()
    index, _ = scan_logged(root, memory, caplog)
    assert index.classes == ("bee", "cat", "dog") and index == scan(root)


def test_a_listing_taken_right_after_a_change_is_listed_again_next_time(tmp_path: Path, caplog):
    """A file added in the same clock tick as the scan may leave the mtime unchanged ("racy git"):
    directories modified within 2 s of the recording scan are not trusted."""
    root, memory = make_tree(tmp_path / "train"), tmp_path / "memory"  # mtimes: just now
    scan(root, None, memory)
    _, lines = scan_logged(root, memory, caplog)
    assert lines == []  # listed again: nothing reused
    age(root)
    scan(root, None, memory)
    _, lines = scan_logged(root, memory, caplog)
    assert "3 class folder(s) unchanged" in lines[0]


def test_a_broken_or_foreign_memory_file_is_ignored(tmp_path: Path, caplog):
    root, memory = make_tree(tmp_path / "train"), tmp_path / "memory"
    age(root)
    first = scan(root, None, memory)
    (path,) = memory.iterdir()
    for damage in (b"garbage", path.read_bytes()[:-3], path.read_bytes() + b"x", b""):
        path.write_bytes(damage)
        index, lines = scan_logged(root, memory, caplog)
        assert index == first and len(lines) == 1 and "is damaged" in lines[0]  # a full scan, remembered again
        assert TreeMemory(memory, root, FolderIndex._from_buffers)._old_index == first
    # another folder's memory put in this folder's place (a copied cache) is not used for this one
    other = make_tree(tmp_path / "other", classes=("x", "y", "cat"))
    age(other)
    scan(other, None, memory)
    (theirs,) = [p for p in memory.iterdir() if p != path]
    path.write_bytes(theirs.read_bytes())
    assert TreeMemory(memory, root, FolderIndex._from_buffers)._old_index is None
    index, lines = scan_logged(root, memory, caplog)
    assert index == first and lines == []


def test_memory_that_cannot_be_written_only_warns(tmp_path: Path, caplog):
    root = make_tree(tmp_path / "train")
    blocker = tmp_path / "memory"
    blocker.write_text("a file where the folder should be")
    with caplog.at_level(logging.WARNING, logger="ddp_trainer"):
        index = scan(root, None, blocker)
    assert index == scan(root)
    assert any("could not remember the scan" in r.getMessage() for r in caplog.records)
