"""ColIntern: InternVL3.5 (and Qwen3-VL) as ColPali-style late-interaction page retrievers.

`import colintern` is cheap (no torch): `ColIntern` is imported on first use (PEP 562), so the plot scripts and
`--help` texts start without paying for torch.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from colintern.config import ColInternConfig
from colintern.errors import UserError

if TYPE_CHECKING:
    from colintern.model import ColIntern
    from colintern.search_index import Index

__all__ = ["ColIntern", "ColInternConfig", "Index", "UserError"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name == "ColIntern":
        from colintern.model import ColIntern

        return ColIntern
    if name == "Index":
        from colintern.search_index import Index

        return Index
    raise AttributeError(f"module 'colintern' has no attribute {name!r}")
