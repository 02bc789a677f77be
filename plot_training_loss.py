#!/usr/bin/env python
"""python plot_training_loss.py ...: the same command as the installed `colintern-plot-loss`; the code is colintern/scripts/plot_training_loss.py."""
from colintern.scripts.plot_training_loss import console, main  # noqa: F401 - main(argv) for tests and notebooks

if __name__ == "__main__":
    console()
