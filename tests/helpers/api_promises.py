"""The Python API's promises (issue 28 D), as a script uses them: train once, evaluate the checkpoint
with the run's Config, a partial mapping and a model.name override, and call train() from a second
thread while one runs. Prints one JSON line. Usage: api_promises.py DATA OUT"""
import json
import sys
import threading
import time
from pathlib import Path

import ddp_trainer
from ddp_trainer.errors import UserError

data, out = sys.argv[1], Path(sys.argv[2])
kw = dict(data={"root": data, "image_size": 16, "batch_size": 8, "num_workers": 0}, model={"name": "tiny_cnn_bn"},
          output_dir=str(out / "a"), **{"train.epochs": 1})
result = ddp_trainer.train(**kw)
last = result.checkpoints["last"]
report: dict = {"stored": ddp_trainer.evaluate(last)["val_loss"]}


def attempt(name, fn):
    try:
        report[name] = fn()
    except UserError as exc:
        report[name] = f"error: {exc.message}"


attempt("with_config", lambda: ddp_trainer.evaluate(last, config=result.config)["val_loss"])
attempt("partial", lambda: ddp_trainer.evaluate(last, config={"data": {"batch_size": 4}})["val_loss"])
attempt("other_model", lambda: ddp_trainer.evaluate(last, **{"model.name": "tiny_cnn"})["val_loss"])

slow = {**kw, "output_dir": str(out / "b"), "model": {"name": "slow_model:build"}, "train.epochs": 2}
first = threading.Thread(target=lambda: attempt("first_thread", lambda: ddp_trainer.train(**slow).epochs_run))
first.start()
deadline = time.monotonic() + 60
while not (out / "b" / "train.log").exists() and time.monotonic() < deadline:
    time.sleep(0.05)
attempt("second_call", lambda: ddp_trainer.train(**{**kw, "output_dir": str(out / "c")}).epochs_run)
first.join()
print(json.dumps(report))
