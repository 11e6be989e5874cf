"""Synthetic FUNGI feature outputs, written directly with pyarrow, as `fungi featurize` lays them out.

The layout is the job's output contract: current rows as ``OUT/*.parquet`` (one row per
id), every row version ever written in ``OUT.history/*.parquet`` (beside the output) (append-only, with
``--history``), ``OUT/_fungi_manifest.json``, ``fungi.spec`` / ``fungi.spec_hash`` in every
file's metadata, and bookkeeping folders (``_errors/``) that readers must skip. Vectors are
clustered like real features (a label per row, a centroid per label and block, noise),
L2-normalised, so nearest-neighbour results are meaningful.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.formats.folder import history_name
from pipelines.manifest import Manifest, RunRecord, sources_schema, write_header, write_sources_table
from pipelines.storage import Location

TIMESTAMP = pa.timestamp("us", tz="UTC")


def make_spec(model: str = "hf:test/minilm", objectives=("kl", "simclr"), seed: int = 0,
              embed_dim: int = 32, projection_dim: int = 24) -> dict:
    return {
        "format": 1, "model": model, "modality": "text", "weights": None, "weights_sha256": None,
        "target_layer": "encoder.layer.5.attention.output.dense", "pooling": "mean",
        "objectives": [{"name": name, "params": {}} for name in objectives], "seed": seed,
        "projection": "gaussian", "projection_dim": projection_dim, "embed_dim": embed_dim,
        "precision": "fp32", "version": "0.1.0",
    }


def spec_hash(spec: dict) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


@dataclass
class SyntheticOutput:
    """An output folder and the truth it holds; ``night`` appends one incremental run."""

    root: Path
    spec: dict
    history: bool = True
    labels: int = 8
    seed: int = 0
    keep: dict = field(default_factory=lambda: {"label": pa.string(), "split": pa.string()})
    extra_columns: dict = field(default_factory=dict)  # name -> pa.Array factory (n -> array), e.g. reserved names
    current: pa.Table | None = None
    versions: list[pa.Table] = field(default_factory=list)  # each night's new and changed rows
    runs: list[dict] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.rng = np.random.default_rng(self.seed)
        dims = {"embedding": self.spec["embed_dim"]}
        dims.update({f"grad_{o['name']}": self.spec["projection_dim"] for o in self.spec["objectives"]})
        self.dims = dims
        self.centroids = {name: self.rng.normal(size=(self.labels, d)) for name, d in dims.items()}

    @property
    def hash(self) -> str:
        return spec_hash(self.spec)

    def rows(self, ids: list[str], when: datetime) -> pa.Table:
        n = len(ids)
        label = self.rng.integers(0, self.labels, n)
        columns = {
            "id": pa.array(ids, pa.string()),
            "content_hash": pa.array([f"{i}-{when.timestamp():.0f}" for i in ids], pa.string()),
            "event_time": pa.array([when] * n, TIMESTAMP),
        }
        if "label" in self.keep:
            columns["label"] = pa.array([f"topic{k}" for k in label], pa.string())
        if "split" in self.keep:
            columns["split"] = pa.array(["train" if k % 3 else "test" for k in range(n)], pa.string())
        for name, make in self.extra_columns.items():
            columns[name] = make(n)
        for name, dim in self.dims.items():
            vectors = self.centroids[name][label] + 0.8 * self.rng.normal(size=(n, dim))
            vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
            columns[name] = pa.FixedSizeListArray.from_arrays(pa.array(vectors.astype(np.float32).ravel()), dim)
        return pa.table(columns)

    def night(self, when: datetime, new: list[str], changed: list[str] = (), deleted: list[str] = ()) -> pa.Table:
        """One run: featurize ``new`` ids and new versions of ``changed`` ids at ``when``; drop ``deleted``
        (as ``--prune`` does)."""
        fresh = self.rows([*changed, *new], when)
        index = len(self.runs)
        metadata = {b"fungi.spec": json.dumps(self.spec, sort_keys=True).encode(), b"fungi.spec_hash": self.hash.encode()}
        fresh = fresh.replace_schema_metadata(metadata)
        if self.history:
            history = self.root.parent / f"{self.root.name}.history"
            history.mkdir(parents=True, exist_ok=True)
            pq.write_table(fresh, history / f"run-{index:05d}.parquet")
        self.root.mkdir(parents=True, exist_ok=True)
        if self.current is None:
            self.current = fresh
            pq.write_table(fresh, self.root / f"part-{index:05d}-0.parquet")
        else:
            # the job replaces the files that held changed rows, and adds a file for the rest
            gone = pa.compute.is_in(self.current.column("id"), pa.array([*changed, *deleted], pa.string()))
            kept = self.current.filter(pa.compute.invert(gone))
            for old in self.root.glob("part-*.parquet"):
                old.unlink()
            pq.write_table(kept.replace_schema_metadata(metadata), self.root / f"part-{index:05d}-0.parquet")
            pq.write_table(fresh, self.root / f"part-{index:05d}-1.parquet")
            self.current = pa.concat_tables([kept, fresh]).replace_schema_metadata(metadata)
        self.versions.append(fresh)
        (self.root / "_errors").mkdir(exist_ok=True)
        for stale in (self.root / "_errors").glob("*.pqt"):
            stale.unlink()
        error_file = f"_errors/errors-{index:05d}.pqt"
        pq.write_table(
            pa.table({"id": ["broken"], "content_hash": ["x"], "stage": ["decode"], "error": ["text is empty"]}),
            self.root / error_file,
        )
        run_id = f"run-{index:05d}"
        self.runs.append(RunRecord(
            run_id=run_id, started=when.isoformat(), mode="incremental" if index else "full", wall_s=1.0,
            rows_in=self.current.num_rows, rows_skipped=self.current.num_rows - fresh.num_rows,
            rows_written=fresh.num_rows, rows_replaced=len(changed),
        ))
        files = sorted(self.root.glob("part-*.parquet"))
        sources = [
            {"source": f.name, "size": f.stat().st_size, "identity": "synthetic", "input_rows": pq.read_metadata(f).num_rows,
             "file": f.name, "rows": pq.read_metadata(f).num_rows, "error_file": error_file if i == 0 else None,
             "errors": 1 if i == 0 else 0, "id_min": None, "id_max": None, "orphans": 0, "present": True, "run_id": run_id}
            for i, f in enumerate(files)
        ]
        location = Location(str(self.root))
        manifest = Manifest(
            spec=self.spec, spec_hash=self.hash, input={"id_column": "id", "id_type": "string"},
            sources=pa.Table.from_pylist(sources, schema=sources_schema(pa.string())), version=index + 1,
            history=history_name(location) if self.history else None, runs=list(self.runs),
        )
        write_sources_table(location, manifest)
        write_header(location, manifest)
        return fresh

    def matrix(self, column: str, ids: list[str] | None = None, table: pa.Table | None = None) -> np.ndarray:
        table = self.current if table is None else table
        if ids is not None:
            position = {v: i for i, v in enumerate(table.column("id").to_pylist())}
            table = table.take([position[i] for i in ids])
        values = table.column(column).combine_chunks()
        return values.flatten().to_numpy().reshape(len(values), -1)


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=timezone.utc)


def save_tiny_text_model(directory: str, tokenizer_dir: str) -> str:
    """A 1-layer random-init BERT (hidden size 32) with a real WordPiece tokenizer, saved as
    a local Hugging Face directory: featurizing with it costs next to nothing."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.save_pretrained(directory)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=128,
    )
    BertModel(config, add_pooling_layer=False).save_pretrained(directory)
    return directory
