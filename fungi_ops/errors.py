"""Error types: a bad sample is reported per row; a bad setting fails before any heavy work."""
from __future__ import annotations


class FungiError(Exception):
    """Base class of every error fungi raises on purpose."""


class ConfigError(FungiError, ValueError):
    """A setting is wrong (unknown model, missing layer, bad objective parameter).

    Raised at construction time so that a job fails fast, before data is read.
    """


class SampleError(FungiError, ValueError):
    """One input row cannot be decoded or featurized.

    Carries the pipeline stage so that the error table can say where it happened;
    the rest of the batch is unaffected.
    """

    def __init__(self, message: str, stage: str = "decode") -> None:
        super().__init__(message)
        self.stage = stage
