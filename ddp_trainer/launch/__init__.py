"""launch: who this process is and how it runs.

Owns the launch environment (torchrun, SLURM, a single process) read once into a ``LaunchEnv``, the
execution mode (DDP / DataParallel / single device) and the model wrappers, the process group and
its collectives (``Dist``), stop signals and their agreement, the run lock, and the launch session
that ties them together.

May import: the top-level shared modules (config, errors, fsutil, compat, runlog, ...). Nothing of
data/, checkpoint/ or training/. ``signals`` and ``environment`` load without torch: the command line
imports them before torch, to handle signals during the seconds torch takes to import.
"""
