"""User-facing warnings that point at the user's line, however deep in this package they arise.

``warnings.warn`` needs a ``stacklevel``; counting frames by hand breaks whenever a call moves
(a helper, a decorator, ``SNOpt`` building its ``SNOptPreconditioner``). :func:`warn` instead
skips every frame in this package and in torch's wrappers (``torch.no_grad``, the optimizer's
step hooks) and attributes the warning to the first frame outside them.
"""

from __future__ import annotations

import os
import sys
import warnings

import torch

_SKIPPED = (os.path.dirname(__file__) + os.sep, os.path.dirname(torch.__file__) + os.sep)


def warn(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn(message, category)`` at the first caller outside this package and torch."""
    level, frame = 2, sys._getframe(1)
    while frame.f_back is not None and frame.f_code.co_filename.startswith(_SKIPPED):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)
