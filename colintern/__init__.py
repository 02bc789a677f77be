"""ColIntern: InternVL3.5 (and Qwen3-VL) as ColPali-style late-interaction page retrievers.

    import colintern
    colintern.train(colintern.TrainConfig(model_id=..., train_hub=..., lora=True))     # train.py
    colintern.mine(colintern.MineConfig(model_id=..., ckpt=..., hub_name=...))        # mine.py (yields its lines)
    colintern.evaluate(colintern.EvalConfig(ckpt=..., local_dataset=[...]))           # eval.py (returns the summary)
    index = colintern.Index.create("outputs/index", ["manuals/"], ckpt=...)          # search.py index
    index.search("where is the warranty period?", k=5)                               # search.py query

`import colintern` is cheap (no torch): the model, the index and the jobs are imported on first use (PEP 562), so
the plot scripts and `--help` texts start without paying for torch. docs/API.md has more.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from colintern.errors import UserError
from colintern.retriever.config import ColInternConfig
from colintern.settings import (DatasetConfig, EvalConfig, IndexConfig, ItrTrainConfig, MineConfig, QueryConfig,
                                TrainConfig)

if TYPE_CHECKING:
    from colintern.eval.run import evaluate
    from colintern.index.api import Index
    from colintern.mine.miner import mine
    from colintern.retriever.model import ColIntern
    from colintern.train.trainer import train

__all__ = ["ColIntern", "ColInternConfig", "DatasetConfig", "EvalConfig", "Index", "IndexConfig", "ItrTrainConfig",
           "MineConfig", "QueryConfig", "TrainConfig", "UserError", "evaluate", "mine", "train"]
__version__ = "0.5.0"

_LAZY = {"ColIntern": "colintern.retriever.model", "Index": "colintern.index.api", "train": "colintern.train.trainer",
         "mine": "colintern.mine.miner", "evaluate": "colintern.eval.run"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'colintern' has no attribute {name!r}")
