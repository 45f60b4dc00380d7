"""Train as launch.py does, then leave through a normal interpreter shutdown (no os._exit): the way
out of the Python API, a notebook or a Ray worker. Usage: under torchrun, the training arguments."""
import sys

from ddp_trainer.cli import train_main

sys.exit(train_main(sys.argv[1:]))
