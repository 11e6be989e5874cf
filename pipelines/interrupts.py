"""Ctrl-C and SIGTERM: one line that says what was committed, and the shell's exit code.

A ``fungi`` command stopped by Ctrl-C (SIGINT) or by SIGTERM (what Kubernetes, Slurm and
``ray job stop`` send) prints ``interrupted: <what was committed>`` and exits 130 or 143
(128 + the signal's number, as a shell reports a process the signal killed), without a
traceback. SIGTERM is turned into the same exception as Ctrl-C (:class:`Interrupted`, a
``KeyboardInterrupt``), so that ``with`` blocks unwind on both: the lease is given back and
the next run need not wait for it. A featurizing run re-raises it with the truth about its
commit (:meth:`pipelines.job.FeaturizeJob.run`); what a run interrupted before its commit
point staged is deleted by the next run on the output.
"""
from __future__ import annotations

import signal
from types import FrameType
from typing import Any

NOTHING_COMMITTED = "nothing committed; the next run cleans up"


class Interrupted(KeyboardInterrupt):
    """A command stopped by ``signal_number``; ``outcome`` says what it had committed."""

    def __init__(self, signal_number: int, outcome: str = NOTHING_COMMITTED) -> None:
        super().__init__(signal_number, outcome)
        self.signal_number = signal_number
        self.outcome = outcome

    @property
    def exit_code(self) -> int:
        """128 + the signal's number: 130 for SIGINT, 143 for SIGTERM."""
        return 128 + self.signal_number

    @classmethod
    def of(cls, exc: KeyboardInterrupt, outcome: str = NOTHING_COMMITTED) -> "Interrupted":
        """``exc`` (a plain ``KeyboardInterrupt`` is Ctrl-C) with ``outcome``."""
        return cls(exc.signal_number if isinstance(exc, Interrupted) else signal.SIGINT, outcome)


def _raise_interrupted(signal_number: int, frame: FrameType | None) -> None:
    raise Interrupted(signal_number)


def raise_on_sigterm() -> Any:
    """Make SIGTERM raise :class:`Interrupted` in the main thread, as Ctrl-C raises ``KeyboardInterrupt``;
    returns the handler it replaces."""
    return signal.signal(signal.SIGTERM, _raise_interrupted)
