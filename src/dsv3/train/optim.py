"""The trainer's optimizer: re-exports :mod:`dsv3.optim.adamw`, where the AdamW math lives.

The math sits below both the trainer and ZeRO-1 (:mod:`dsv3.parallel.zero`), so that the
parallel runtime does not import ``dsv3.train``. Existing imports from here keep working.
"""

from dsv3.optim.adamw import *  # noqa: F401,F403
from dsv3.optim.adamw import (  # noqa: F401  (tests use them)
    __all__,  # noqa: F401
    _adamw_update_1d,
    _compiled_adamw_update,
)
