#!/usr/bin/env python
"""python eval.py ...: the same command as the installed `colintern-eval`; the code is colintern/scripts/eval.py."""
from colintern.scripts.eval import console, main  # noqa: F401 - main(argv) for tests and notebooks

if __name__ == "__main__":
    console()
