"""`from mteb_model import ColInternMTEB` as before; the code is colintern/eval/mteb_model.py."""
from colintern.eval.mteb_model import ColInternMTEB, colintern_model_meta, training_datasets_of  # noqa: F401
