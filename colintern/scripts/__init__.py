"""The command-line scripts (train, mine, eval, search, the two plots): what `python train.py ...` at the repository
root and the installed console scripts (`colintern-train ...`, pyproject.toml) both run. Each module has `main(argv)`
(returns the exit status, for tests and notebooks) and `console()` (the entry point: one-line errors, exit status)."""
