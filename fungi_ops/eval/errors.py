"""Error and warning types of the evaluation module.

Bad input must never turn into a silently wrong number, so every input problem the
evaluation can detect raises :class:`EvalInputError`. It subclasses ``ValueError`` so
generic callers can still catch it, while the ``fungi eval`` command catches exactly
this type to print a one-line ``error: ...`` and exit with status 2.
"""
from __future__ import annotations

import numpy as np


class EvalInputError(ValueError):
    """Input the evaluation cannot use; the message names the file, column or row."""


class EvalWarning(UserWarning):
    """Input the evaluation adjusted on purpose (e.g. ``k`` clamped); the report records the effective value."""


def quote(value: object) -> str:
    """``repr`` of a label or id for messages, without numpy 2's ``np.int64(...)`` wrapping."""
    return repr(value.item() if isinstance(value, np.generic) else value)
