"""ddp_trainer: distributed training of image classifiers on class-per-folder datasets.

``ddp_trainer.train(...)`` and ``ddp_trainer.evaluate(...)``: see :mod:`ddp_trainer.api`.
"""
from typing import Any

__version__ = "0.1.0"
__all__ = ["train", "evaluate", "request_stop", "TrainResult"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        # the API loads torch: not when the command line imports this package (it installs its
        # signal handling first)
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'ddp_trainer' has no attribute {name!r}")
