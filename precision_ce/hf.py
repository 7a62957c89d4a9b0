"""``import precision_ce.hf``: the transformers integration, which lives in precision_ce.integrations.hf.

This module *is* that one (the same module object in ``sys.modules``), so patches and isinstance
checks see one set of names.
"""

import sys

from .integrations import hf as _hf

sys.modules[__name__] = _hf
