"""Long preparation steps report progress: count, rate, time left."""
import logging
import re

from ddp_trainer.data.folder_index import scan
from ddp_trainer.progress import Ticker


def test_ticker_line_has_count_rate_and_time_left(caplog):
    caplog.set_level(logging.INFO, logger="ddp_trainer")
    logging.getLogger("ddp_trainer").propagate = True
    try:
        t = Ticker("data.cache: decoding /x", total=1000, every_s=0.0, scale=2)
        t.tick(100)
        line = caplog.records[-1].getMessage()
        # this process did 100 of its half: 200 of 1000 for the node
        assert re.fullmatch(r"data\.cache: decoding /x: 200/1000 images \(20%\), \d+ images/s, about \d+s left", line), line
        quiet = Ticker("never", total=10, every_s=3600.0)
        before = len(caplog.records)
        quiet.tick(5)
        assert len(caplog.records) == before  # nothing before the interval
    finally:
        logging.getLogger("ddp_trainer").propagate = False


def test_scan_reports_files_seen(caplog, demo_small, monkeypatch):
    caplog.set_level(logging.INFO, logger="ddp_trainer")
    logging.getLogger("ddp_trainer").propagate = True
    monkeypatch.setattr("ddp_trainer.progress.PREPARATION_PROGRESS_S", 0.0)  # a line on every tick
    try:
        scan(demo_small / "train")
        lines = [r.getMessage() for r in caplog.records if "scanning" in r.getMessage()]
        assert lines and re.fullmatch(r"data: scanning .*/train: 120 files so far, \d+ files/s", lines[-1]), lines
    finally:
        logging.getLogger("ddp_trainer").propagate = False
