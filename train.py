#!/usr/bin/env python
"""python train.py ...: the same command as the installed `colintern-train`; the code is colintern/scripts/train.py."""
from colintern.scripts.train import console, main  # noqa: F401 - main(argv) for tests and notebooks

if __name__ == "__main__":
    console()
