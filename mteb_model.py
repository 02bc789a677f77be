"""`from mteb_model import ColInternMTEB` as before; the code is colintern/mteb_model.py."""
from colintern.mteb_model import ColInternMTEB, colintern_model_meta, training_datasets_of  # noqa: F401
