"""Train under Ray Train as the README shows (TorchTrainer, 2 CPU workers, one restart allowed).
Every ``ray.train.report`` that reaches Ray's controller is appended to REPORTS as a JSON line (the
list of each worker's metrics): Ray Train 2 keeps free-floating metrics out of its ``Result``.
Usage: ray_train.py CONFIG_JSON STORAGE REPORTS"""
import json
import sys

import ray
from ray.train import FailureConfig, RunConfig, ScalingConfig, UserCallback
from ray.train.torch import TorchTrainer

import ddp_trainer

config, storage, reports = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]


class WriteReports(UserCallback):
    def after_report(self, run_context, metrics, checkpoint):
        with open(reports, "a") as f:
            f.write(json.dumps(metrics) + "\n")


ray.init(num_cpus=2, include_dashboard=False, configure_logging=False)
trainer = TorchTrainer(train_loop_per_worker=lambda cfg: ddp_trainer.train(**cfg), train_loop_config=config,
                       scaling_config=ScalingConfig(num_workers=2, use_gpu=False),
                       run_config=RunConfig(storage_path=storage, name="ray", callbacks=[WriteReports()],
                                            failure_config=FailureConfig(max_failures=1)))
result = trainer.fit()
print(json.dumps({"error": repr(result.error) if result.error else None}), flush=True)
ray.shutdown()
