"""Write a ready Feast repository for a FUNGI feature output, or update it in place.

From OUTPUT's manifest and fungi.spec, writes into --repo (created if needed):
  fungi_<name>.py      entity <name> on `id`; feature view <name>_<spec hash[:8]> over the
                       output's Parquet files (timestamp `event_time`) with `embedding`
                       (Array(Float32), vector-indexed, cosine), each `grad_<objective>`,
                       `content_hash` and the kept columns, tagged with the spec hash, model
                       and objectives; feature view <name>_<spec hash[:8]>_fungi with the
                       vector-indexed FUNGI concatenation `fungi` (vectors written under
                       data/fungi/ of the repository); feature service <name> with both.
                       Rewritten on every run: keep your own definitions in other files.
  feature_store.yaml   only when missing: local provider, file offline store, SQLite online
                       store with sqlite-vec vector search (never rewritten).

Feast reads OUTPUT.history/ (every row version, beside the output) when the job ran with --history, else
the current files (then point-in-time joins are correct only for rows never changed). A Delta or
Iceberg output (delta:PATH, iceberg:NS.TABLE with --catalog) is read by Feast's duckdb offline store:
every row version the table keeps (its data files since the last `fungi vacuum`), or a Delta table's
current version with --current-version.

Every night, after `fungi featurize`: `fungi feast OUTPUT --repo DIR --materialize`. Materializing
only writes; the ids the output no longer holds (deleted with --prune, or whose row now fails) are
found from the data files that changed and removed from the online store, and so from vector
search, after the materialization (without --materialize: at once, and again by the next run for
views not yet materialized). Another spec
(model, seed, ...) lives in another output: run it for that output too (another --name if the
folder names are equal). Exit status 2 with one `error:` line for bad input.

Examples:
  fungi feast my_features --repo my_repo
  feast -c my_repo apply && feast -c my_repo materialize-incremental $(date -u +%Y-%m-%dT%H:%M:%S)
  fungi feast my_features --repo my_repo --materialize     # every night, after fungi featurize
  fungi feast delta:lake/texts_features --repo my_repo
  fungi feast s3://lake/fungi/texts --repo repo --name texts \\
      --storage-options '{"endpoint_url": "http://minio:9000"}'
"""
from __future__ import annotations

import argparse
import sys

HELP = "write or update a Feast repository (entity, sources, feature views, vector search) for a feature output"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the ``fungi feast`` options."""
    parser.add_argument(
        "output", metavar="OUTPUT",
        help="feature output of `fungi featurize`: a directory or s3://bucket/prefix, delta:PATH, iceberg:NS.TABLE",
    )
    parser.add_argument(
        "--catalog", metavar="NAME|JSON",
        help="an iceberg: output's pyiceberg catalog, as for `fungi featurize` (default: the SQL catalog on SQLite "
        "in $FUNGI_WAREHOUSE)",
    )
    parser.add_argument("--repo", required=True, metavar="DIR", help="Feast repository directory to write or update")
    parser.add_argument(
        "--name", metavar="NAME",
        help="entity and feature view prefix, lower-case letters, digits and '_' (default: OUTPUT's folder name)",
    )
    parser.add_argument(
        "--project", default="fungi", metavar="NAME",
        help="Feast project of a new feature_store.yaml (default: %(default)s)",
    )
    parser.add_argument(
        "--no-fungi-view", action="store_true",
        help="leave out the <view>_fungi feature view (and its copy of the concatenated vectors)",
    )
    parser.add_argument(
        "--current-version", action="store_true",
        help="serve the current rows only, not every row version (a Delta table's kept versions, a folder's "
        "--history): point-in-time joins are then correct only for rows never changed",
    )
    parser.add_argument(
        "--materialize", action="store_true",
        help="then apply fungi's definitions, materialize them up to now (as `feast apply` and `feast "
        "materialize-incremental`) and remove from the online store the ids the output no longer holds: the "
        "nightly step",
    )
    parser.add_argument(
        "--storage-options", metavar="JSON",
        help='JSON for s3fs to read OUTPUT, e.g. \'{"endpoint_url": "http://127.0.0.1:9000"}\'; only the endpoint '
        "goes into the repository (Feast takes credentials from the AWS environment)",
    )


def run(args: argparse.Namespace) -> int:
    """Write the repository; 0 on success, 2 on bad input."""
    from fungi_ops.errors import FungiError
    from pipelines.feast.repo import describe, materialize_repo, write_feast_repo
    from pipelines.storage import parse_storage_options

    try:
        update = write_feast_repo(
            args.output, args.repo, name=args.name, project=args.project,
            storage_options=parse_storage_options(args.storage_options), fungi_view=not args.no_fungi_view,
            current_version=args.current_version, catalog=args.catalog,
        )
        if args.materialize:
            materialize_repo(update)
    except (FungiError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for line in describe(update):
        print(line)
    return 0
