"""Listing a Delta table with deletion vectors at 10^5 files: fungi's descriptor reading against
deltalake's ``DeltaTable.deletion_vectors()``.

A night lists its Delta input on the driver. For a table with deletion vectors, fungi reads each
live file's ``deletionVector`` descriptor from the log (``pipelines.formats.input_tables.
delta_deletion_vectors``: O(files), no vector decoded; a worker decodes a file's vector when it
reads that file). deltalake's ``deletion_vectors()`` instead returns every file's keep mask, one
bool per row, built on the caller's process. This script builds a synthetic table fast, without a
Delta writer: a data file of ``--rows-per-file`` rows hard-linked ``--files`` times, and one log
commit (protocol reader 3 / writer 7 with ``deletionVectors``, the metadata, and an ``add`` per
file with its ``numRecords`` and an inline deletion vector of ``--deleted`` positions spread over
the file, the last one its last row), written with the tests' deletion-vector writer
(``tests/delta_dv.py``). Then each reader runs in a fresh process of its own, which reports its
wall time (imports apart) and peak RSS (``ru_maxrss``, imports included), and the script prints both and their
ratios. The two must agree on the files that have a vector and their deleted rows (checked on
the first 100 files).

    python benchmarks/bench_delta_dv.py                          # 100,000 files of 10,000 rows
    python benchmarks/bench_delta_dv.py --files 20000 --rows-per-file 50000 --keep /tmp/dv
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

LINKS_PER_FILE = 50_000
SCHEMA = {"type": "struct", "fields": [
    {"name": "id", "type": "string", "nullable": True, "metadata": {}},
    {"name": "text", "type": "string", "nullable": True, "metadata": {}},
]}


def deleted_positions(index: int, rows: int, deleted: int) -> list[int]:
    """``deleted`` positions spread over a file of ``rows`` rows, shifted by file, the last row always among them."""
    step = max(1, rows // deleted)
    positions = {(index + k * step) % rows for k in range(deleted - 1)} | {rows - 1}
    return sorted(positions)


def build_table(root: Path, files: int, rows: int, deleted: int) -> float:
    """The synthetic table at ``root``; seconds to build it."""
    from delta_dv import serialize, z85_encode

    started = time.perf_counter()
    (root / "_delta_log").mkdir(parents=True)
    ids = [f"{i:012d}" for i in range(rows)]
    data_file = pa.table({"id": ids, "text": [f"row {i}" for i in ids]})
    templates = [root / f"template-{block}.parquet" for block in range(-(-files // LINKS_PER_FILE))]
    for template in templates:  # a file takes at most 65,000 hard links (ext4)
        pq.write_table(data_file, template)
    size, now = templates[0].stat().st_size, int(time.time() * 1000)
    actions = [
        {"commitInfo": {"timestamp": now, "operation": "WRITE", "operationParameters": {}, "engineInfo": "bench_delta_dv"}},
        {"protocol": {"minReaderVersion": 3, "minWriterVersion": 7, "readerFeatures": ["deletionVectors"],
                      "writerFeatures": ["deletionVectors"]}},
        {"metaData": {"id": "00000000-0000-0000-0000-000000000000", "format": {"provider": "parquet", "options": {}},
                      "schemaString": json.dumps(SCHEMA), "partitionColumns": [],
                      "configuration": {"delta.enableDeletionVectors": "true"}, "createdTime": now}},
    ]
    lines = [json.dumps(action) for action in actions]
    for index in range(files):
        name = f"part-{index:06d}.parquet"
        os.link(templates[index // LINKS_PER_FILE], root / name)
        positions = deleted_positions(index, rows, deleted)
        data = serialize(positions)
        vector = {"storageType": "i", "pathOrInlineDv": z85_encode(data), "sizeInBytes": len(data),
                  "cardinality": len(positions)}
        lines.append(json.dumps({"add": {"path": name, "partitionValues": {}, "size": size, "modificationTime": now,
                                         "dataChange": True, "stats": json.dumps({"numRecords": rows}),
                                         "deletionVector": vector}}))
    for template in templates:
        template.unlink()
    (root / "_delta_log" / f"{0:020d}.json").write_text("\n".join(lines) + "\n")
    return time.perf_counter() - started


def measure(reader: str, root: str) -> dict:
    """In this (fresh) process: list ``root`` with ``reader``; its seconds, peak RSS and a sample to compare."""
    started = time.perf_counter()
    import deltalake  # noqa: F401 - both readers import deltalake and pandas (its add actions): not timed
    import pandas  # noqa: F401
    if reader == "fungi":
        from pipelines.formats.input_tables import deletion_vector_positions, list_sources

        imported = time.perf_counter()
        listing = list_sources(f"delta:{root}", {}, None)
        seconds = time.perf_counter() - imported
        with_vector = sum(1 for f in listing.files if f.read is not None)
        fs = listing.location.filesystem()
        sample = {f.relpath: deletion_vector_positions(fs, f.read).tolist() for f in listing.files[:100]}
    else:
        from deltalake import DeltaTable

        imported = time.perf_counter()
        masks = pa.RecordBatchReader.from_stream(DeltaTable(root).deletion_vectors()).read_all()
        seconds = time.perf_counter() - imported
        with_vector = masks.num_rows
        paths = [p.rsplit("/", 1)[1] for p in masks.column("filepath").to_pylist()]
        order = sorted(range(len(paths)), key=paths.__getitem__)[:100]
        sample = {paths[i]: np.flatnonzero(~np.asarray(masks.column("selection_vector")[i].as_py())).tolist()
                  for i in order}
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {"seconds": seconds, "import_s": imported - started, "peak_mib": peak, "files_with_vector": with_vector,
            "sample": sample}


def run_measure(reader: str, root: Path) -> dict:
    """:func:`measure` in a process of its own (its peak RSS is its own)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, __file__, "--measure", reader, str(root)], env=env, cwd=str(REPO),
                         capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"{reader} failed ({out.returncode}):\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=100_000)
    parser.add_argument("--rows-per-file", type=int, default=10_000)
    parser.add_argument("--deleted", type=int, default=10, help="deleted rows per file")
    parser.add_argument("--keep", help="build the table in this (new) folder and keep it")
    parser.add_argument("--measure", nargs=2, metavar=("READER", "TABLE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(*args.measure)))
        return
    base = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="fungi-bench-delta-dv-"))
    root = base / "table"
    built = build_table(root, args.files, args.rows_per_file, args.deleted)
    print(f"# Delta deletion vectors: {args.files:,} files of {args.rows_per_file:,} rows, {args.deleted} deleted "
          f"rows each (inline vectors, one commit); built in {built:.1f} s; {os.cpu_count()} CPUs")
    results = {reader: run_measure(reader, root) for reader in ("fungi", "deltalake")}
    fungi, delta = results["fungi"], results["deltalake"]
    agree = fungi["files_with_vector"] == delta["files_with_vector"] == args.files and fungi["sample"] == delta["sample"]
    print("| reader | wall s | imports s | peak RSS MiB | files with a vector |")
    print("|---|---:|---:|---:|---:|")
    print(f"| fungi `list_sources` (descriptors from the log) | {fungi['seconds']:.1f} | {fungi['import_s']:.1f} | "
          f"{fungi['peak_mib']:.0f} | {fungi['files_with_vector']:,} |")
    print(f"| deltalake `DeltaTable(...).deletion_vectors()` (keep masks) | {delta['seconds']:.1f} | "
          f"{delta['import_s']:.1f} | {delta['peak_mib']:.0f} | {delta['files_with_vector']:,} |")
    print(f"deltalake / fungi: wall {delta['seconds'] / fungi['seconds']:.1f}x, peak RSS "
          f"{delta['peak_mib'] / fungi['peak_mib']:.1f}x; deleted rows of the first 100 files "
          f"{'agree' if agree else 'DIFFER'}")
    if not args.keep:
        shutil.rmtree(base)
    if not agree:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
