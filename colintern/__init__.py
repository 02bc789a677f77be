"""ColIntern: InternVL3.5 (and Qwen3-VL) as ColPali-style late-interaction page retrievers."""
from colintern.config import ColInternConfig
from colintern.errors import UserError
from colintern.model import ColIntern

__all__ = ["ColIntern", "ColInternConfig", "UserError"]
__version__ = "0.1.0"
