"""data: from class folders to the batches a step trains.

Owns the folder index (scanned once by rank 0), image decoding, per-sample augmentation with
reproducible randomness, the samplers (the exact epoch plan, exact evaluation), MixUp/CutMix, the
decoded cache, the demo data, and the datasets and loaders of a run.

May import: the top-level shared modules and launch/ (``Dist``, for collectives while preparing
data). Never checkpoint/ or training/: what a checkpoint keeps of the data (the index fingerprint) is
decided in training/.
"""
