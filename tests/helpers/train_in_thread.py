"""train() in a thread of its own, as a notebook or a server runs it. Usage:
train_in_thread.py DATA OUT MODE, MODE one of:
  wait          the main thread joins the training thread (a test sends SIGINT: Ctrl-C in join())
  request_stop  the main thread calls ddp_trainer.request_stop() once training has started
  resume        train the same run to its end in the main thread
The training thread writes OUT/outcome.json: the result or the exception, and the threads alive."""
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import ddp_trainer
from ddp_trainer.errors import UserError

data, out, mode = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
kw = dict(data={"root": data, "image_size": 16, "batch_size": 4, "num_workers": 0},
          model={"name": "slow_model:build"}, output_dir=str(out / "run"), **{"train.epochs": 2})


def outcome(name: str, fn) -> None:
    try:
        report = {"epochs_run": fn().epochs_run}
    except UserError as exc:
        report = {"error": type(exc).__name__, "message": exc.message}
    report["excepthook_restored"] = sys.excepthook is sys.__excepthook__
    (out / name).write_text(json.dumps(report))


if mode == "resume":
    outcome("resumed.json", lambda: ddp_trainer.train(**kw))
    sys.exit(0)

# Ctrl-C as in a terminal, whatever this process inherited: a shell's background job (`cmd &`
# without job control, as CI may start the suite) starts with SIGINT ignored, and Python then never
# raises KeyboardInterrupt
signal.signal(signal.SIGINT, signal.default_int_handler)
thread = threading.Thread(target=outcome, args=("outcome.json", lambda: ddp_trainer.train(**kw)), name="trainer")
thread.start()
if mode == "wait":
    thread.join()
    sys.exit(0)
deadline = time.monotonic() + 120
while not (out / "run" / "train.log").exists() and time.monotonic() < deadline:
    time.sleep(0.05)
time.sleep(1.0)  # a few training steps
asked = ddp_trainer.request_stop()
thread.join()
report = json.loads((out / "outcome.json").read_text())
report.update(asked=asked, asked_after=ddp_trainer.request_stop(),
              threads_left=sorted(t.name for t in threading.enumerate() if t is not threading.main_thread()))
(out / "outcome.json").write_text(json.dumps(report))
