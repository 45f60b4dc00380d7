"""Call ddp_trainer.train twice and ddp_trainer.evaluate once in one process, as a notebook would, and
print what the test checks as one JSON line. Usage: api_twice.py DATA OUT"""
import json
import logging
import signal
import sys
import threading
import time

import ddp_trainer
from ddp_trainer.errors import ConfigError

data, out = sys.argv[1], sys.argv[2]
signals = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)
handlers = {s: signal.getsignal(s) for s in signals}
wakeup = signal.set_wakeup_fd(-1)
kw = dict(data={"root": data, "image_size": 16, "batch_size": 8, "num_workers": 1}, model={"name": "tiny_cnn_bn"},
          output_dir=out, resume="none", overwrite=True, **{"train.epochs": 2})
first = ddp_trainer.train(**kw)
second = ddp_trainer.train(**kw)
metrics = ddp_trainer.evaluate(first.checkpoints["last"])
try:
    ddp_trainer.train(**{**kw, "train.epochs": 0})
    error = None
except ConfigError as exc:
    error = exc.message
# a loader's queues end their feeder threads a moment after the workers are shut down (torch closes
# them without joining): wait for that, so that a thread the API left running is what remains
deadline = time.monotonic() + 5
while len(threading.enumerate()) > 1 and time.monotonic() < deadline:
    time.sleep(0.05)
print(json.dumps({
    "final": [first.final, second.final], "best": first.best, "monitor": first.monitor,
    "checkpoints": {k: str(v) for k, v in first.checkpoints.items() if k != "epochs"},
    "epochs_run": first.epochs_run, "evaluated": metrics, "error": error,
    "handlers_restored": {s: signal.getsignal(s) for s in signals} == handlers,
    "wakeup_restored": signal.set_wakeup_fd(-1) == wakeup,
    "threads": [t.name for t in threading.enumerate()],
    "log_handlers": len(logging.getLogger("ddp_trainer").handlers),
}), flush=True)
