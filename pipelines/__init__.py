"""Ray orchestration for fungi: I/O, the ``fungi`` CLI, idempotency and job control.

The torch engine lives in :mod:`fungi_ops`; this package composes it with Ray Data.
"""
