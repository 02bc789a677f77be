#!/usr/bin/env python
"""python plot_vidore_metrics.py ...: the same command as the installed `colintern-plot-metrics`; the code is colintern/scripts/plot_vidore_metrics.py."""
from colintern.scripts.plot_vidore_metrics import console, main  # noqa: F401 - main(argv) for tests and notebooks

if __name__ == "__main__":
    console()
