"""The private DataLoader internals that ``data.LoaderOwner`` relies on. If a torch upgrade breaks
one of these, this test names it (torch has no public way to stop a loader's workers early)."""
import multiprocessing
import signal
import time

import torch
from torch.utils.data import DataLoader, Dataset

from ddp_trainer.data.loaders import LoaderOwner


class Numbers(Dataset):
    def __len__(self):
        return 8

    def __getitem__(self, i):
        return torch.tensor([i])


def test_persistent_loader_keeps_its_iterator_with_a_shutdown_method():
    sigchld = signal.getsignal(signal.SIGCHLD)  # torch's first loader with workers sets a handler for good
    loader = DataLoader(Numbers(), batch_size=2, num_workers=1, persistent_workers=True)
    list(loader)
    signal.signal(signal.SIGCHLD, sigchld)
    it = getattr(loader, "_iterator", "missing")
    assert it != "missing" and it is not None, "torch no longer keeps DataLoader._iterator for persistent workers"
    assert callable(getattr(it, "_shutdown_workers", None)), "torch's loader iterator lost _shutdown_workers()"
    it._shutdown_workers()


def test_owner_stops_workers_at_once_and_forks_only_when_needed():
    forks = []
    owner = LoaderOwner(before_fork=lambda: forks.append(1))
    persistent = DataLoader(Numbers(), batch_size=2, num_workers=1, persistent_workers=True)
    fresh = DataLoader(Numbers(), batch_size=2, num_workers=1, persistent_workers=False)
    for _ in range(2):
        assert sum(len(b) for b in owner.iterate(persistent)) == 8
    assert len(forks) == 1  # persistent workers fork once
    it = owner.iterate(fresh)
    next(it)  # a pass left half-way, as an exception would
    assert len(forks) == 2
    assert multiprocessing.active_children()  # workers of both loaders are alive
    owner.close()
    deadline = time.monotonic() + 10
    while multiprocessing.active_children() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not multiprocessing.active_children()
    assert persistent._iterator is None
    owner.close()  # idempotent
