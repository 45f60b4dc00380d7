"""How loader workers start: every DataLoader of the project (training, evaluation, the decoded
cache's build, ``check --verify``) takes its ``multiprocessing_context`` from :func:`start_method`.

``fork`` where the platform has it (Linux): a worker starts in milliseconds with the parent's
imports and the dataset already in memory, and the project's worker set-up (signals, the
``before_fork`` wait for a checkpoint write) is written for it. It is chosen explicitly because
Python 3.14 changes the default on Linux to ``forkserver``, which would otherwise change how every
worker starts (and pickle each dataset into it) without a line of this project changing. Elsewhere
(macOS, Windows) the platform's default. The datasets and worker init functions are kept picklable
all the same, so that a loader also works under ``spawn`` and ``forkserver``
(``tests/test_never_lose_r4_reading.py``).
"""
from __future__ import annotations

import multiprocessing
import sys

START_METHOD: str | None = "fork" if sys.platform.startswith("linux") else None


def start_method(workers: int) -> str | None:
    """The ``multiprocessing_context`` for a DataLoader with ``workers`` workers (None: the default,
    and always None without workers, where torch refuses a context)."""
    if workers <= 0 or START_METHOD is None or START_METHOD not in multiprocessing.get_all_start_methods():
        return None
    return START_METHOD
