"""Small text lakes for the job's tests: Parquet files of ids and texts, and the run settings
of a 1-layer random BERT (``tiny_text_dir``), which keeps featurizing cheap so that the tests
measure the bookkeeping."""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.job import FeaturizeConfig


class Crash(BaseException):
    """A simulated kill: not an Exception, so nothing on the way up cleans up."""


def crash_at(step: int):
    """An output's ``fault`` hook that kills the commit at its ``step``-th step (1-based)."""
    def crash(count: int, what: str) -> None:
        if count == step:
            raise Crash(what)
    return crash


def write_part(root: Path, name: str, ids: list, texts: list, **extra) -> Path:
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"id": ids, "text": texts, **extra}), path)
    return path


def lake(root: Path, files: int = 3, rows: int = 6) -> Path:
    """``files`` Parquet files of ``rows`` rows, ids ``f{file}-{row}``."""
    for index in range(files):
        ids = [f"f{index}-{row:03d}" for row in range(rows)]
        write_part(root, f"part-{index}.parquet", ids, [f"text {i} of file {index}" for i in range(rows)])
    return root


def config(model_dir: str, input_path: Path, output_path: Path, **overrides) -> FeaturizeConfig:
    """A small job: it runs in the test's process (pipelines.tasks) unless ``actors=`` or an address asks for Ray."""
    settings = dict(
        input=str(input_path), output=str(output_path), modality="text", model=f"hf:{model_dir}",
        objectives="kl", batch_size=4, max_error_fraction=0.5,
    )
    settings.update(overrides)
    return FeaturizeConfig(**settings)


def features(output: Path) -> pa.Table:
    return pq.read_table(output).sort_by("id")


def ids_of(table: pa.Table) -> list[str]:
    return table.column("id").to_pylist()


def last_run(output: Path) -> dict:
    return json.loads((output / "_fungi_manifest.json").read_text())["runs"][-1]


def sql_catalog(folder: Path, **properties: str) -> tuple[str, object]:
    """A new SQL catalog on SQLite in ``folder`` (its warehouse too, unless ``properties`` name one), made
    with pyiceberg as a user makes one (fungi never makes a catalog behind an explicit ``--catalog``): its
    ``--catalog`` JSON and the catalog."""
    from pyiceberg.catalog import load_catalog

    folder.mkdir(parents=True, exist_ok=True)
    settings = {"type": "sql", "uri": f"sqlite:///{folder}/catalog.db", "warehouse": f"file://{folder}", **properties}
    return json.dumps(settings), load_catalog("fungi", **settings)
