"""ddp_trainer: distributed training of image classifiers on class-per-folder datasets."""

__version__ = "0.1.0"
