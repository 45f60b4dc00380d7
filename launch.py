"""Training entrypoint: ``torchrun --standalone --nproc_per_node=N launch.py [--config FILE] [key=value ...]``
or ``python launch.py ...`` for one process. Everything else lives in the ddp_trainer package."""
from ddp_trainer.cli import exit_now, train_main

if __name__ == "__main__":
    exit_now(train_main())
