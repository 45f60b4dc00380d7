"""Rank-prefixed logging and the per-epoch ``metrics.jsonl``.

INFO goes to the terminal from global rank 0 only; warnings and errors from every rank. Rank 0 also
appends everything it logs to ``<output_dir>/train.log``.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import logging.handlers
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from .fsutil import atomic_write_text

LOGGER = "ddp_trainer"


class _RankFilter(logging.Filter):
    def __init__(self, rank: int) -> None:
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        record.rank = self.rank
        return True


def setup_logging(rank: int, level: str = "INFO") -> logging.Logger:
    """Console logging for this process: ``[rank N] message``; rank 0 at ``level``, others WARNING."""
    logger = logging.getLogger(LOGGER)
    logger.handlers.clear()
    logger.propagate = False
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_RankFilter(rank))
    handler.setFormatter(logging.Formatter("[rank %(rank)d] %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(getattr(logging, level.upper(), logging.INFO) if rank == 0 else logging.WARNING)
    return logger


@contextmanager
def console_logging(rank: int, level: str = "INFO") -> Iterator[logging.Logger]:
    """:func:`setup_logging` for the length of a call (a train() or evaluate() in a process that goes
    on afterwards, a command called in-process): the logger's handlers, level and propagation are
    put back as they were when it ends."""
    logger = logging.getLogger(LOGGER)
    before = (list(logger.handlers), logger.level, logger.propagate)
    try:
        yield setup_logging(rank, level)
    finally:
        for handler in logger.handlers:
            if handler not in before[0]:
                handler.close()
        logger.handlers[:], logger.level, logger.propagate = before


class EarlyRecords(logging.Handler):
    """Keeps the records logged before ``train.log`` can be opened (the run decides whether it may
    write to its output_dir first), so that :func:`add_file_log` writes them too."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []
        logging.getLogger(LOGGER).addHandler(self)

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def detach(self) -> list[logging.LogRecord]:
        logging.getLogger(LOGGER).removeHandler(self)
        return self.records


def add_file_log(path: Path, rank: int, earlier: EarlyRecords | None = None) -> logging.Handler:
    """Append the log to ``path`` too (call on rank 0 only), starting with ``earlier`` records; the
    caller owns the handler returned (:func:`remove_file_log`)."""
    logger = logging.getLogger(LOGGER)
    # a file name that is not valid UTF-8 is logged with \xNN escapes, never as a logging error; a
    # train.log deleted or moved during the run is opened again at its path (the watched handler
    # compares the path's file with the open one at each record: one stat)
    handler = logging.handlers.WatchedFileHandler(path, mode="a", encoding="utf-8", errors="backslashreplace")
    handler.addFilter(_RankFilter(rank))
    handler.setFormatter(logging.Formatter("%(asctime)s [rank %(rank)d] %(levelname)s %(message)s"))
    for record in earlier.detach() if earlier is not None else []:
        handler.handle(record)
    logger.addHandler(handler)
    return handler


def remove_file_log(handler: logging.Handler) -> None:
    logging.getLogger(LOGGER).removeHandler(handler)
    handler.close()


def close_file_logs() -> None:
    logger = logging.getLogger(LOGGER)
    for h in list(logger.handlers):
        if isinstance(h, logging.FileHandler):
            h.close()
            logger.removeHandler(h)


class MetricsFile:
    """``metrics.jsonl``: exactly one JSON line per finished epoch, appended and fsynced (opened by
    path for each row: a file deleted or moved during the run is created again); and beside it
    ``metrics.csv``, the same rows and columns as a table (timm's ``summary.csv`` habit: what
    spreadsheets and plotting scripts open), rewritten from the JSON lines after each change."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.csv = path.with_suffix(".csv")

    def append(self, row: dict[str, Any]) -> None:
        line = json.dumps(row, sort_keys=False) + "\n"
        with open(self.path, "a", encoding="utf-8", errors="backslashreplace") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        self._write_csv()

    def rows(self) -> list[dict[str, Any]]:
        """The complete rows (a line torn by a kill is left out)."""
        if not self.path.exists():
            return []
        out = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict):
                out.append(row)
        return out

    def _write_csv(self) -> None:
        rows = self.rows()
        columns = list(dict.fromkeys(k for row in rows for k in row))  # first row's order, new ones after
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(self.csv, text.getvalue())

    def cut_back(self, first_epoch_to_drop: int) -> int:
        """Keep only complete rows of epochs before ``first_epoch_to_drop``; returns rows kept.

        Used on resume so that no epoch appears twice and no torn last line survives a kill.
        """
        if not self.path.exists():
            return 0
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line torn by a kill
            if isinstance(row, dict) and isinstance(row.get("epoch"), int) and row["epoch"] < first_epoch_to_drop:
                kept.append(line)
        atomic_write_text(self.path, "".join(k + "\n" for k in kept))
        self._write_csv()
        return len(kept)
