"""data.reduced_decode's rule in the loader's own order: FolderDataset samples 0..n-1 (a fresh
epoch's crops each round) with the draft from divisor 2 against the draft from divisor 4 (divisor
2 in full by the chosen decoder), the two taking turns for 6 rounds; images/s per round on one
thread and the median ratio (> 1: the draft from 2 is faster). Unlike `decode_bench.py
--by-divisor`, which times each divisor's boxes as a group, the crops here come mixed, as training
sees them.

    OMP_NUM_THREADS=1 python bench/decode_rule.py [DATA] [N]   (DATA: bench/.data/photos/train)
"""
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import torch  # noqa: E402

from ddp_trainer.data import decode  # noqa: E402
from ddp_trainer.data.datasets import FolderDataset  # noqa: E402
from ddp_trainer.data.folder_index import scan  # noqa: E402
from ddp_trainer.data.samplers import SampleKey  # noqa: E402
from ddp_trainer.data.transforms import ImageTransform  # noqa: E402


def main() -> None:
    torch.set_num_threads(1)
    idx = scan(sys.argv[1] if len(sys.argv) > 1 else ROOT / "bench" / ".data" / "photos" / "train")
    n = min(len(idx), int(sys.argv[2]) if len(sys.argv) > 2 else 1000)
    chosen = decode.decoder()
    for size in (64, 128):
        ds = FolderDataset(idx, ImageTransform(size, ("random_resized_crop", "flip")), reduced_decode=True)
        rates: dict[int, list[float]] = {2: [], 4: []}
        for rnd in range(6):
            for first in ((2, 4) if rnd % 2 else (4, 2)):
                decode._DRAFT_FROM[chosen] = first
                t = time.perf_counter()
                for i in range(n):
                    ds[SampleKey(i, rnd, 1.0)]
                rates[first].append(n / (time.perf_counter() - t))
        ratio = statistics.median(a / b for a, b in zip(rates[2], rates[4]))
        print(f"{size} px, {decode.decoder()}, images/s: draft from 4 {[round(r) for r in rates[4]]}, draft from 2 "
              f"{[round(r) for r in rates[2]]}; median ratio {ratio:.3f}", flush=True)


if __name__ == "__main__":
    main()
