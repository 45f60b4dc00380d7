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
    spreadsheets and plotting scripts open), rewritten from the JSON lines after each change.

    Neither copy is ever rebuilt from a poorer other: an epoch that only ``metrics.csv`` still holds
    (``metrics.jsonl`` deleted, truncated or with a damaged line) is written back into
    ``metrics.jsonl`` from it, with one warning, before the table is rewritten. A line that is not
    UTF-8 or not a JSON object is named (file and line number) in one warning and skipped; a last
    line without its newline (torn by a kill) is left out without one."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.csv = path.with_suffix(".csv")
        self._named: set[tuple[int, bytes]] = set()  # damaged lines already warned about

    def append(self, row: dict[str, Any]) -> None:
        self._restore_from_csv(before=int(row["epoch"]))
        line = json.dumps(row, sort_keys=False) + "\n"
        with open(self.path, "a", encoding="utf-8", errors="backslashreplace") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        self._write_csv()

    def rows(self) -> list[dict[str, Any]]:
        """The complete rows (a line torn by a kill, or a damaged one, is left out)."""
        return [row for _, row in self._lines()]

    def _lines(self) -> list[tuple[str, dict[str, Any]]]:
        """(line, row) of each complete row, in file order."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return []
        out = []
        chunks = raw.split(b"\n")
        for number, chunk in enumerate(chunks, 1):
            if not chunk.strip():
                continue
            torn = number == len(chunks)  # no newline after it: the kill came mid-write
            try:
                line = chunk.decode("utf-8")
                row = json.loads(line)
                if not isinstance(row, dict) or not isinstance(row.get("epoch"), int):
                    raise ValueError("not a metrics row (a JSON object with an integer epoch)")
            except UnicodeDecodeError as exc:
                self._damaged(number, chunk, torn, f"byte {exc.start + 1} is not UTF-8")
                continue
            except ValueError as exc:  # JSONDecodeError included
                self._damaged(number, chunk, torn, str(exc).splitlines()[0][:120])
                continue
            out.append((line, row))
        return out

    def _damaged(self, number: int, chunk: bytes, torn: bool, why: str) -> None:
        if torn or (number, chunk) in self._named:
            return
        self._named.add((number, chunk))
        logging.getLogger(LOGGER).warning("%s: line %d is damaged (%s); skipped (the other rows are kept)",
                                          self.path, number, why)

    def _csv_rows(self) -> list[dict[str, Any]]:
        """The rows ``metrics.csv`` holds, with numbers as numbers and empty cells as None ([] when it
        is missing or cannot be read: it is the spare copy)."""
        try:
            text = self.csv.read_text(encoding="utf-8")
        except FileNotFoundError:
            return []
        except (OSError, UnicodeDecodeError) as exc:
            logging.getLogger(LOGGER).warning("%s: cannot be read (%s: %s); not used to restore %s", self.csv,
                                              type(exc).__name__, exc, self.path.name)
            return []
        out = []
        for row in csv.DictReader(io.StringIO(text)):
            parsed = {k: _cell(v) for k, v in row.items() if k is not None}
            if isinstance(parsed.get("epoch"), int):
                out.append(parsed)
        return out

    def _restore_from_csv(self, before: int) -> None:
        """Write back into ``metrics.jsonl`` the rows of epochs before ``before`` that only
        ``metrics.csv`` still holds (in epoch order with the ones it has)."""
        lines = self._lines()
        have = {row["epoch"] for _, row in lines}
        lost = {r["epoch"]: r for r in self._csv_rows() if r["epoch"] < before and r["epoch"] not in have}
        if not lost:
            return
        merged = sorted([(row["epoch"], line) for line, row in lines]
                        + [(epoch, json.dumps(row)) for epoch, row in lost.items()], key=lambda t: t[0])
        atomic_write_text(self.path, "".join(line + "\n" for _, line in merged))
        logging.getLogger(LOGGER).warning("%s: epoch(s) %s were missing; restored from %s", self.path,
                                          sorted(lost), self.csv.name)

    def _write_csv(self) -> None:
        rows = self.rows()
        columns = list(dict.fromkeys(k for row in rows for k in row))  # first row's order, new ones after
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(self.csv, text.getvalue())

    def cut_back(self, first_epoch_to_drop: int) -> int:
        """Keep only complete rows of epochs before ``first_epoch_to_drop`` (those only
        ``metrics.csv`` holds restored first); returns rows kept. Used on resume so that no epoch
        appears twice, no torn or damaged line survives and neither copy loses a row the other has."""
        if not self.path.exists() and not self.csv.exists():
            return 0
        self._restore_from_csv(before=first_epoch_to_drop)
        kept = [line for line, row in self._lines() if row["epoch"] < first_epoch_to_drop]
        atomic_write_text(self.path, "".join(k + "\n" for k in kept))
        self._write_csv()
        return len(kept)


def _cell(text: str | None) -> Any:
    """A metrics.csv cell as the JSON row had it: an int, a float, None (empty) or the text."""
    if text is None or text == "":
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return {"True": True, "False": False}.get(text, text)
