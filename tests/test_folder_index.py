"""FolderIndex as flat buffers: the same entries, fingerprint and pickling as the tuples it replaced,
and a forked loader worker that reads it copies (almost) none of it."""
import hashlib
import os
import pickle
import sys
from pathlib import Path

import pytest

from ddp_trainer.data.folder_index import FolderIndex, scan

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))


def entries(n: int, classes: int = 10) -> list[tuple[str, int]]:
    return [(f"c{i % classes}/img_{i}.JPEG", i % classes) for i in range(n)]


def test_entries_paths_labels_and_the_samples_view():
    items = entries(50) + [("c3/caf\u00e9 \u6771\u4eac.png", 3), ("c4/sub/x.jpg", 4)]
    index = FolderIndex("/data/train", [f"c{k}" for k in range(10)], items)
    assert len(index) == len(index.samples) == 52
    assert list(index.samples) == items
    assert index.samples[50] == items[50] and index.samples[-1] == items[-1]
    assert index.samples[3:7] == items[3:7]
    assert list(index.labels) == [label for _, label in items]
    assert index.path(51) == os.path.join("/data/train", "c4/sub/x.jpg") and index.label(50) == 3
    with pytest.raises(IndexError):
        index.samples[52]
    with pytest.raises(AttributeError, match="immutable"):
        index.root = "/elsewhere"
    assert index.subset([1, 50]).samples[:] == [items[1], items[50]]
    assert list(index.without({items[0][0]}).samples) == items[1:]


def test_a_file_name_that_is_not_utf8_survives_the_index_and_pickling(tmp_path: Path):
    folder = tmp_path / "train" / "cat"
    folder.mkdir(parents=True)
    raw = os.fsencode(str(folder)) + b"/\xff\xfe.png"  # Latin-1 bytes: not UTF-8
    with open(raw, "wb") as f:
        f.write(b"x")
    (tmp_path / "train" / "dog").mkdir()
    (tmp_path / "train" / "dog" / "a.png").write_bytes(b"x")
    index = scan(tmp_path / "train")
    back = pickle.loads(pickle.dumps(index))
    assert back == index and back.samples[:] == index.samples[:]
    assert os.path.exists(back.path(0))  # the path still names the file


def test_fingerprint_is_the_hash_of_the_entries_as_earlier_versions_wrote_it():
    """Checkpoints hold it (train_data): a new representation must not change it."""
    items = entries(1000)
    index = FolderIndex("/r", [f"c{k}" for k in range(10)], items)
    expected = hashlib.sha256("\n".join(f"{rel}\t{label}" for rel, label in items).encode()).hexdigest()
    assert index.fingerprint() == {"count": 1000, "sha256": expected}


def test_pickling_keeps_everything_and_is_compact():
    index = FolderIndex("/r", [f"c{k}" for k in range(10)], entries(20_000))
    blob = pickle.dumps(index)
    assert pickle.loads(blob) == index
    assert len(blob) < 1.2 * sum(len(rel) + 12 for rel, _ in index.samples)  # paths + 12 bytes per entry


@pytest.mark.skipif(not Path("/proc/self/smaps_rollup").exists(), reason="needs Linux's /proc/self/smaps_rollup")
def test_a_forked_worker_reading_every_entry_copies_almost_nothing():
    """Tuples of (path, label) are copied page by page into every worker that reads them (their
    reference counts change); the flat buffers are not."""
    from scale import _forked_private_kb

    n = 200_000
    items = entries(n, 100)
    index = FolderIndex("/r", [f"c{k}" for k in range(100)], items)
    as_tuples = tuple(items)
    del items

    def read_index():
        for i in range(n):
            index.path(i)
            index.label(i)

    def read_tuples():
        for i in range(n):
            as_tuples[i][0], as_tuples[i][1]

    idle = _forked_private_kb(None)
    flat = _forked_private_kb(read_index) - idle
    tuples = _forked_private_kb(read_tuples) - idle
    assert tuples > 10_000  # KiB: the old layout's copies are visible at this size (about 30 MB)
    assert flat < 2_000, (flat, tuples)
