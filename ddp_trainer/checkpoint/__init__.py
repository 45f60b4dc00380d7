"""checkpoint: the training state on disk.

Owns the format (``format``: the keys, the version, the checksum and every rule read from a file),
crash-safe writers (``writer``: atomic, background), reading and discovery (``reader``), other
trainers' files as adapters to the format (``layouts``), model weights between files and modules
(``weights``), the state registry its components register in (``registry``), and the save policy
with the ranking of the best epochs (``policy``).

May import: the top-level shared modules and launch/ (``Dist`` for the save collectives, ``unwrap``).
Never data/ or training/: components of the training state register here; this wing does not know them.
"""
