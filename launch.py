"""Training entrypoint: ``torchrun --standalone --nproc_per_node=N launch.py [--config FILE] [key=value ...]``
or ``python launch.py ...`` for one process. Everything else lives in the ddp_trainer package."""
import sys

from ddp_trainer.cli import train_main

if __name__ == "__main__":
    sys.exit(train_main())
