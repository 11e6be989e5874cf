"""Serve a feature output online: the same FUNGI features for new inputs, and k-NN queries against its rows.

A Ray Serve application (on a local Ray, or a cluster with --address) whose replicas each build
the batch job's featurizer from the spec and setup state OUTPUT records, and a faiss index of
its rows (exact up to --exact-rows, IVF above, with its recall@10 printed). Endpoints (JSON):

  GET  /healthz      200 once a replica answers
  GET  /spec         spec, spec hash, version served, rows, feature columns, indexes
  POST /featurize    {"items": [{"id": "q1", "text": "..."}]}  (image/audio: base64 of the file)
  POST /neighbours   {"items": [...], "k": 10, "features": "fungi"}  nearest rows by cosine
  POST /classify     {"items": [...], "k": 20}  fungi eval's weighted k-NN vote over --label-column

Every response names the one output version it used; the replicas follow new commits (polled
every --poll-s) and swap each version in whole. Binds 127.0.0.1; another --host needs
--token-file (requests then send 'Authorization: Bearer TOKEN', 401 without) or --insecure.
Exit status 2 with one `error:` line for a bad setting.

Examples:
  fungi serve fungi_demo/features
  curl -s localhost:8000/classify -d '{"items": [{"id": "q", "text": "what is your favourite food?"}]}'
  fungi serve delta:lake/feats --host 0.0.0.0 --token-file /etc/fungi/token --replicas 1,4 --gpus-per-replica 0.5
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import Any

HELP = "serve a feature output: featurize new inputs, nearest rows and k-NN labels over HTTP (Ray Serve)"

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the ``fungi serve`` options."""
    parser.add_argument("output", metavar="OUTPUT",
                        help="feature output of `fungi featurize`: a directory or s3://bucket/prefix, delta:PATH, iceberg:NS.TABLE")
    parser.add_argument("--catalog", metavar="NAME|JSON", help="an iceberg: output's pyiceberg catalog, as for `fungi featurize`")
    parser.add_argument("--storage-options", metavar="JSON", help="JSON for s3fs to read OUTPUT")
    parser.add_argument("--version", type=int, metavar="N",
                        help="serve this Delta version / Iceberg snapshot and do not follow new commits (default: the "
                        "current one, followed)")
    parser.add_argument("--label-column", metavar="NAME",
                        help="kept column whose values /classify votes on (default: 'label' when the output keeps it)")
    parser.add_argument("--features", default="fungi", metavar="COMBO[,COMBO]",
                        help="feature combinations to index for /neighbours: 'fungi' (every column, the default) or "
                        "columns joined by '+', e.g. fungi,embedding")
    parser.add_argument("--exact-rows", type=int, default=1_000_000, metavar="N",
                        help="exact inner-product index up to this many rows, IVF above (default: %(default)s)")
    parser.add_argument("--poll-s", type=float, default=60.0, metavar="S",
                        help="seconds between checks of the output's commit point (default: %(default)s; 0: never)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s)")
    parser.add_argument("--port", type=int, default=8000, help="HTTP port (default: %(default)s)")
    parser.add_argument("--token-file", metavar="PATH", help="file holding the bearer token every request must send")
    parser.add_argument("--insecure", action="store_true", help="allow a non-local --host without --token-file")
    parser.add_argument("--max-items", type=int, default=64, metavar="N", help="items per request (default: %(default)s)")
    parser.add_argument("--max-body-mb", type=float, default=32.0, metavar="MB", help="request body size (default: %(default)s)")
    parser.add_argument("--max-image-pixels", type=int, default=None, metavar="N",
                        help="as `fungi featurize --max-image-pixels` (keep them equal: JPEGs above it are reduced "
                        "while decoding); default 100,000,000")
    parser.add_argument("--max-batch-size", type=int, default=8, metavar="N",
                        help="concurrent requests coalesced into one featurize call (default: %(default)s)")
    parser.add_argument("--batch-wait-ms", type=float, default=10.0, metavar="MS",
                        help="how long a batch waits for more requests (default: %(default)s)")
    parser.add_argument("--batch-size", default="auto", metavar="N|auto",
                        help="rows per forward pass, as `fungi featurize --batch-size` (default: %(default)s)")
    parser.add_argument("--replicas", default="1", metavar="N|MIN,MAX",
                        help="replicas, or an autoscaling range (default: %(default)s)")
    parser.add_argument("--cpus-per-replica", type=float, default=1.0, metavar="C", help="(default: %(default)s)")
    parser.add_argument("--gpus-per-replica", type=float, default=0.0, metavar="G",
                        help="GPUs per replica; a fraction shares one GPU (default: %(default)s)")
    parser.add_argument("--address", help="Ray cluster to run on (default: RAY_ADDRESS, else a local Ray)")


def settings_from_args(args: argparse.Namespace) -> tuple[Any, dict[str, Any]]:
    """``(ServeSettings, build_app options)`` from the options, checked against OUTPUT (ConfigError naming the setting)."""
    from fungi_ops.adapters import DEFAULT_MAX_IMAGE_PIXELS
    from fungi_ops.errors import ConfigError
    from fungi_ops.spec import FeaturizerSpec
    from pipelines.formats import open_output
    from pipelines.serve.api import Limits
    from pipelines.serve.app import ServeSettings, token_digest
    from pipelines.serve.index import read_state, resolve_combinations
    from pipelines.storage import parse_storage_options

    for flag, value in (("--max-items", args.max_items), ("--max-batch-size", args.max_batch_size),
                        ("--exact-rows", args.exact_rows), ("--port", args.port)):
        if value < 1:
            raise ConfigError(f"{flag} must be >= 1, got {value}")
    for flag, value in (("--max-body-mb", args.max_body_mb), ("--cpus-per-replica", args.cpus_per_replica)):
        if not value > 0:
            raise ConfigError(f"{flag} must be > 0, got {value}")
    if args.batch_wait_ms < 0 or args.poll_s < 0 or args.gpus_per_replica < 0:
        raise ConfigError("--batch-wait-ms, --poll-s and --gpus-per-replica must be >= 0")
    if args.max_image_pixels is not None and args.max_image_pixels < 1:
        raise ConfigError("--max-image-pixels must be >= 1")
    replicas = _replicas(args.replicas)
    batch_size: int | str = args.batch_size
    if batch_size != "auto":
        if not str(batch_size).isdigit() or int(batch_size) < 1:
            raise ConfigError(f"--batch-size must be a positive integer or 'auto', got {batch_size!r}")
        batch_size = int(batch_size)
    token = None
    if args.token_file:
        try:
            with open(args.token_file, encoding="utf-8") as handle:
                token = handle.read().strip()
        except OSError as exc:
            raise ConfigError(f"--token-file {args.token_file}: {exc.strerror}") from None
        if not token:
            raise ConfigError(f"--token-file {args.token_file} is empty")
    elif args.host not in LOCAL_HOSTS and not args.insecure:
        raise ConfigError(f"--host {args.host} serves beyond this machine: give --token-file (bearer token), "
                          "or --insecure to serve without one")

    storage_options = parse_storage_options(args.storage_options)
    output = open_output(args.output, storage_options, catalog=args.catalog)
    _, _, manifest = read_state(output, args.version)
    FeaturizerSpec.from_dict(manifest.spec)  # an older spec format is refused here, with the fix
    if any(o["name"] == "dense" for o in manifest.spec["objectives"]):
        raise ConfigError(f"{args.output} holds dense (per-patch) features; fungi serve serves one vector per row")
    keep = list(manifest.input.get("keep_columns", []))
    label = args.label_column or ("label" if "label" in keep else None)
    if label is not None and label not in keep:
        raise ConfigError(f"--label-column {label}: {args.output} keeps no such column; it keeps "
                          f"{', '.join(keep) or 'none (featurize with --keep-columns)'}")
    dims = [f"grad_{o['name']}" for o in manifest.spec["objectives"]] + ["embedding"]
    features = tuple(name.strip() for name in args.features.split(",") if name.strip())
    resolve_combinations(features, dims)
    cpus = args.cpus_per_replica
    settings = ServeSettings(
        output=args.output, catalog=args.catalog, storage_options=storage_options, version=args.version,
        label_column=label, features=features, exact_rows=args.exact_rows,
        poll_s=0.0 if args.version is not None else args.poll_s,
        max_image_pixels=args.max_image_pixels or DEFAULT_MAX_IMAGE_PIXELS,
        limits=Limits(args.max_items, int(args.max_body_mb * 2**20)),
        token_sha256=token_digest(token) if token else None, batch_size=batch_size,
        threads=None if args.gpus_per_replica else max(1, int(round(cpus))), gpus=args.gpus_per_replica,
        max_batch_size=args.max_batch_size, batch_wait_s=args.batch_wait_ms / 1000,
    )
    return settings, {"replicas": replicas, "cpus_per_replica": cpus, "gpus_per_replica": args.gpus_per_replica}


def _replicas(text: str) -> int | tuple[int, int]:
    from fungi_ops.errors import ConfigError

    parts = text.split(",")
    if len(parts) in (1, 2) and all(p.strip().isdigit() for p in parts):
        numbers = [int(p) for p in parts]
        if len(numbers) == 1 and numbers[0] >= 1:
            return numbers[0]
        if len(numbers) == 2 and 0 <= numbers[0] <= numbers[1] and numbers[1] >= 1:
            return numbers[0], numbers[1]
    raise ConfigError(f"--replicas must be N (>= 1) or MIN,MAX (0 <= MIN <= MAX, MAX >= 1), got {text!r}")


def start(args: argparse.Namespace) -> tuple[Any, dict[str, Any]]:
    """Start the application (Ray, Serve's HTTP proxy on --host:--port, the replicas); its handle and ``/spec``."""
    from ray import serve

    from pipelines.ray_runtime import init_ray
    from pipelines.serve.app import APP_NAME, build_app

    settings, options = settings_from_args(args)
    init_ray(args.address)
    serve.start(http_options={"host": args.host, "port": args.port})
    handle = serve.run(build_app(settings, **options), name=APP_NAME, route_prefix="/")
    return handle, handle.spec_document.remote().result()


def run(args: argparse.Namespace) -> int:
    """Serve until interrupted; 2 on a bad setting."""
    from fungi_ops.errors import FungiError

    try:
        handle, spec = start(args)
    except (FungiError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for line in describe(spec, args):
        print(line, flush=True)
    from ray import serve

    from pipelines.interrupts import Interrupted

    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM (pipelines.interrupts)
        raise Interrupted.of(exc, "the server stopped; the output was only read") from None
    finally:
        serve.shutdown()


def describe(spec: dict[str, Any], args: argparse.Namespace) -> list[str]:
    """What the user needs at start: what is served, how the search is done, where."""
    lines = [f"fungi serve: {args.output} version {spec['version']} (run {spec['run_id']}), {spec['rows']} rows, "
             f"spec {spec['spec_hash']}, features " + ", ".join(f"{k}[{v}]" for k, v in spec["features"].items())]
    lines += [f"  index {name}: {text}" for name, text in spec["indexes"].items()]
    if spec["label_column"]:
        lines.append(f"  /classify votes on '{spec['label_column']}'")
    follow = f"following new commits every {args.poll_s:g} s" if spec["following"] else "pinned: not following commits"
    auth = "bearer token required" if args.token_file else "no token"
    lines.append(f"  listening on http://{args.host}:{args.port} ({auth}; {follow}); Ctrl-C stops")
    return lines


def app_from_args(options: dict[str, Any]) -> Any:
    """Application builder for a Serve config (KubeRay's RayService): ``args: {argv: [OUTPUT, --flag, ...]}``,
    the options of ``fungi serve`` checked as the command checks them; Serve's config sets host and port."""
    from pipelines.serve.app import build_app

    parser = argparse.ArgumentParser(prog="fungi serve")
    add_arguments(parser)
    args = parser.parse_args([str(a) for a in options.get("argv", [])])
    settings, build_options = settings_from_args(args)
    return build_app(settings, **build_options)
