"""training: a training run, assembled from the other wings.

Owns the trainer (the loop: epochs, steps, validation, saves, stops), its assembly (``build``), the
engine (optimizer steps and exact evaluation, no file I/O), optimizers and schedules, the EMA, the
loop state and the other checkpoint components, where a run starts from (``resume``), the output
folder (``run_folder``), what the user sees of each epoch (``report``), and one run from config to
exit code (``run``).

May import: everything below it: the top-level shared modules, launch/, data/ and checkpoint/. Only
the command line (cli, commands, check) and the Python API import training/.
"""
