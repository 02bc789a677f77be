#!/usr/bin/env python
"""python search.py ...: the same command as the installed `colintern-search`; the code is colintern/scripts/search.py."""
from colintern.scripts.search import console, main  # noqa: F401 - main(argv) for tests and notebooks

if __name__ == "__main__":
    console()
