"""Remove the old versions of a Delta or Iceberg feature output: the files no kept version reads.

A table output keeps every version it committed (time travel: `fungi eval --version`), so its
folder grows by one set of rewritten data files a night. `fungi vacuum` keeps the versions
committed within --retention-hours (and always the current one) and deletes what only older
versions read:

Delta's vacuum (data files removed from the log before the retention) or Iceberg's snapshot
expiry (then the data files no remaining snapshot reads), then fungi's manifests, error files
and setup states that only those versions name. Iceberg's metadata files (manifest lists and
manifests of expired snapshots) are left to the catalog's own maintenance.

It takes the output's lease, like `fungi featurize`: it never runs beside a featurizing run
of the same output, and stops before the table's commit if another run took the lease over.
After it, time travel reaches back --retention-hours only. A Parquet folder keeps no old
versions (with --history, its row versions are the point): refused. Exit status 2 with one
`error:` line for bad input or a held lease, 1 for a lost lease or a failing store.

Examples:
  fungi vacuum delta:/lake/features --retention-hours 168
  fungi vacuum iceberg:lake.features --catalog prod --retention-hours 72
"""
from __future__ import annotations

import argparse
import uuid

from pipelines.config import DEFAULT_LEASE_TIMEOUT_S

HELP = "delete the files only old versions of a table output read (keeps --retention-hours of time travel)"
DEFAULT_RETENTION_HOURS = 168.0  # a week: Delta's own default, and longer than any night's run


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the ``fungi vacuum`` options."""
    parser.add_argument("output", metavar="OUTPUT", help="a table output of `fungi featurize`: delta:PATH or iceberg:NS.TABLE")
    parser.add_argument(
        "--retention-hours", type=float, default=DEFAULT_RETENTION_HOURS, metavar="H",
        help="keep every version committed in the last H hours (default: %(default)s)",
    )
    parser.add_argument("--catalog", help="Iceberg catalog of an iceberg: output, as for fungi featurize")
    parser.add_argument("--storage-options", metavar="JSON", help="JSON for the object store (as for fungi featurize)")
    parser.add_argument(
        "--lease-timeout", type=float, default=DEFAULT_LEASE_TIMEOUT_S, metavar="S",
        help="this vacuum's lease may go S seconds unrenewed before another run takes it over, as for "
        "fungi featurize (default: %(default)s)",
    )
    parser.add_argument("--break-lease", action="store_true",
                        help="take over the output's lease now (its run must be dead), as for fungi featurize")


def run(args: argparse.Namespace) -> int:
    """Vacuum the output under its lease; 0 on success, 2 on bad input or a held lease, 1 on a lost lease."""
    from fungi_ops.errors import ConfigError, FungiError
    from pipelines.formats import open_output
    from pipelines.interrupts import Interrupted
    from pipelines.lease import LeaseLost, OutputLease
    from pipelines.storage import StorageFailure, describe_storage_error, parse_storage_options, storage_cause

    stopped = "the vacuum stopped partway (every kept version is whole); run it again"

    try:
        if args.retention_hours < 0:
            raise ConfigError(f"--retention-hours must be >= 0, got {args.retention_hours}")
        table = open_output(args.output, parse_storage_options(args.storage_options), catalog=args.catalog)
        if not table.versioned_names:
            raise ConfigError(
                f"{table.uri} is a Parquet folder: it keeps no old versions to vacuum (each night replaces a "
                "source's file in place); vacuum is for delta: and iceberg: outputs"
            )
        with OutputLease(table.root, "vacuum-" + uuid.uuid4().hex[:8], timeout_s=args.lease_timeout,
                         break_lease=args.break_lease) as lease:
            removed = table.vacuum(args.retention_hours, lease.check)
    except (FungiError, ValueError, LeaseLost):
        raise  # bad input (exit 2) and a lost lease (exit 1): pipelines.cli.main's one line
    except KeyboardInterrupt as exc:
        raise Interrupted.of(exc, stopped) from None
    except Exception as exc:
        cause = storage_cause(exc)
        if cause is None:
            raise
        failed = describe_storage_error(cause)
        raise StorageFailure(f"storage failed: {failed} (output {args.output}); {stopped}") from exc
    print(f"vacuumed {table.uri}: " + ", ".join(f"{what} {count}" for what, count in removed.items()))
    return 0
