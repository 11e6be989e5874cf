"""The ``fungi`` command line: one sub-command per module in :mod:`pipelines.commands`.

Each command module exposes ``HELP`` (one line), ``add_arguments(parser)`` and
``run(args) -> int``. Heavy imports (torch, ray) happen inside ``run`` so that
``fungi --help`` answers instantly.
"""
from __future__ import annotations

import argparse
import importlib
import signal
import sys
from typing import Sequence

COMMANDS: dict[str, str] = {
    "demo": "pipelines.commands.demo",
    "featurize": "pipelines.commands.featurize",
    "eval": "pipelines.commands.evaluate",
    "submit": "pipelines.commands.submit",
    "feast": "pipelines.commands.feast",
    "vacuum": "pipelines.commands.vacuum",
    "serve": "pipelines.commands.serve",
}


def build_parser() -> argparse.ArgumentParser:
    """Build the top-level parser with every registered sub-command."""
    parser = argparse.ArgumentParser(
        prog="fungi",
        description="FUNGI: gradient features from frozen encoders, featurized with Ray Data.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module_path in COMMANDS.items():
        module = importlib.import_module(module_path)
        sub = subparsers.add_parser(
            name,
            help=module.HELP,
            description=module.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(sub)
        sub.set_defaults(_run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fungi`` console script; returns the process exit code.

    Ctrl-C and SIGTERM (:mod:`pipelines.interrupts`), a failing store
    (:class:`~pipelines.storage.StorageFailure`) and a lease another run took over end any command
    with one line and exit 1, no traceback; bad input or settings (a ``FungiError`` or
    ``ValueError``) with one ``error:`` line and exit 2.
    """
    from fungi_ops.errors import FungiError
    from pipelines.interrupts import Interrupted, raise_on_sigterm
    from pipelines.lease import LeaseLost
    from pipelines.storage import StorageFailure, describe_storage_error, storage_cause

    parser = build_parser()
    args = parser.parse_args(argv)
    previous = raise_on_sigterm()
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt as exc:
        interrupted = exc if isinstance(exc, Interrupted) else Interrupted.of(exc)
        print(f"interrupted: {interrupted.outcome}", file=sys.stderr)
        return interrupted.exit_code
    except (StorageFailure, LeaseLost) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except (FungiError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # another command's storage error: the line without the commit state
        cause = storage_cause(exc)
        if cause is None:
            raise
        print(f"error: storage failed: {describe_storage_error(cause)}", file=sys.stderr)
        return 1
    finally:
        if previous is not None:  # None: a handler not set from Python, which cannot be put back
            signal.signal(signal.SIGTERM, previous)  # main() called in a process that goes on (tests, notebooks)


if __name__ == "__main__":
    sys.exit(main())
