#!/usr/bin/env python
"""python mine.py ...: the same command as the installed `colintern-mine`; the code is colintern/scripts/mine.py."""
from colintern.scripts.mine import console, main  # noqa: F401 - main(argv) for tests and notebooks

if __name__ == "__main__":
    console()
