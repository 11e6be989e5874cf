"""An Iceberg table as the job's output (``iceberg:NS.TABLE``): one run one snapshot, read by every Iceberg reader.

The real job (tiny random text model, the session's Ray) writes the table into pyiceberg's SQL
catalog on SQLite in a warehouse folder of the test (``FUNGI_WAREHOUSE``, the embedded
default); pyiceberg's scans, Polars' ``scan_iceberg`` and fungi's own readers check it; a crash
after every commit step, another writer committing under our feet and vacuum each get a test.
"""
from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

import polars as pl
import pytest

from lakes import Crash, config, crash_at, ids_of, lake, sql_catalog, write_part
from test_formats_delta import NEW_IDS, night
from fungi_ops.errors import ConfigError
from pipelines.cli import main as cli_main
from pipelines.formats import open_output, read_output
from pipelines.formats.address import load_catalog
from pipelines.formats.iceberg import IcebergOutput
from pipelines.job import FeaturizeJob, run_featurize

pytestmark = pytest.mark.usefixtures("local_ray")  # conftest: one local Ray for the session
URI = "iceberg:lake.features"


@pytest.fixture
def warehouse(tmp_path, monkeypatch) -> Path:
    """The embedded default catalog (SQLite) in a warehouse of this test."""
    path = tmp_path / "warehouse"
    monkeypatch.setenv("FUNGI_WAREHOUSE", str(path))
    return path


def iceberg_table():
    return load_catalog(None).load_table("lake.features")


def iceberg_rows(snapshot_id: int | None = None) -> list[str]:
    """The ids pyiceberg's own scan sees (at a snapshot)."""
    scan = iceberg_table().scan(snapshot_id=snapshot_id, selected_fields=("id",))
    return sorted(scan.to_arrow()["id"].to_pylist())


def polars_rows() -> list[str]:
    return sorted(pl.scan_iceberg(iceberg_table()).select("id").collect()["id"].to_list())


def data_files(snapshot_id: int | None = None) -> set[str]:
    return {task.file.file_path for task in iceberg_table().scan(snapshot_id=snapshot_id).plan_files()}


def test_first_run_and_a_night_are_two_snapshots_that_every_reader_sees(tiny_text_dir, tmp_path, warehouse, capsys):
    source = lake(tmp_path / "in", files=3, rows=4)
    run_featurize(config(tiny_text_dir, source, URI))
    first = read_output(URI).sort_by("id")
    assert first.num_rows == 12 and first.schema.field("embedding").type.list_size == 32
    first_snapshot = iceberg_table().current_snapshot().snapshot_id
    files_v0 = data_files()

    night(source)
    summary = run_featurize(config(tiny_text_dir, source, URI, incremental=True, prune=True))
    assert (summary.rows_written, summary.rows_failed, summary.rows_deleted) == (2, 1, 4)
    table = iceberg_table()
    assert len(table.snapshots()) == 2  # one snapshot per run (the first one created the table)
    assert iceberg_rows() == polars_rows() == NEW_IDS
    assert ids_of(read_output(URI).sort_by("id")) == NEW_IDS
    files_v1 = data_files()
    kept = files_v0 & files_v1
    assert len(kept) == 1 and "part-1" in next(iter(kept))  # the unchanged source's file is not rewritten
    assert len(files_v1 - files_v0) == 2  # part-0 rewritten, part-5 new
    snapshot = table.current_snapshot()
    manifest = open_output(URI).read_manifest()
    assert snapshot.summary["fungi.spec_hash"] == manifest.spec_hash == table.properties["fungi.spec_hash"]
    assert snapshot.summary["fungi.run_id"] == manifest.runs[-1].run_id and snapshot.summary["fungi.rows"] == "8"
    assert '"embedding": 32' in table.properties["fungi.dims"]
    assert manifest.errors == 1  # the row that now fails is in _errors/, not in the table

    # time travel: the first snapshot is the first run, for the table's readers and for fungi's
    assert iceberg_rows(first_snapshot) == ids_of(first)
    assert read_output(URI, version=first_snapshot).sort_by("id").equals(first)
    assert cli_main(["eval", "--train", URI, "--test", URI, "--label-column", "content_hash",
                     "--version", str(first_snapshot), "--features", "embedding", "--k", "1"]) == 0
    assert "embedding" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="no snapshot 12345"):
        read_output(URI, version=12345)

    with pytest.raises(ConfigError, match="spec"):
        run_featurize(config(tiny_text_dir, source, URI, incremental=True, seed=1))
    with pytest.raises(ConfigError, match="--history"):
        run_featurize(config(tiny_text_dir, source, URI, incremental=True, history=True))
    # --overwrite with another spec (another projection dimension) replaces the columns in one snapshot
    run_featurize(config(tiny_text_dir, source, URI, overwrite=True, projection_dim=16))
    rebuilt = read_output(URI)
    assert rebuilt.schema.field("grad_kl").type.list_size == 16 and sorted(ids_of(rebuilt)) == NEW_IDS
    assert len(iceberg_table().snapshots()) == 3 and polars_rows() == NEW_IDS


def night_ready_to_commit(tiny_text_dir: str, tmp_path: Path, monkeypatch) -> tuple[Path, dict]:
    """A table after one run, and a night (changing, failing, pruning) stopped right before its commit."""
    source = lake(tmp_path / "in", files=3, rows=4)
    run_featurize(config(tiny_text_dir, source, URI))
    night(source)
    captured: dict = {}
    with monkeypatch.context() as patch:  # only this patch is undone (the warehouse variable stays)
        patch.setattr(IcebergOutput, "commit", lambda self, manifest, previous, run_id, *, overwrite: captured.update(
            manifest=manifest, previous=previous, run_id=run_id))
        FeaturizeJob(config(tiny_text_dir, source, URI, incremental=True, prune=True)).run()
    (Path(open_output(URI).root.path) / "_fungi_lease.json").unlink(missing_ok=True)
    return source, captured


def test_a_crash_after_any_commit_step_leaves_one_snapshot_and_the_next_run_cleans_up(
        tiny_text_dir, tmp_path, warehouse, monkeypatch):
    source, captured = night_ready_to_commit(tiny_text_dir, tmp_path, monkeypatch)
    table_dir = Path(open_output(URI).root.path)
    saved = tmp_path / "saved"
    shutil.copytree(warehouse, saved)  # the catalog (SQLite) and the table's folder
    old = iceberg_rows()

    def commit(fault=None) -> IcebergOutput:
        output = IcebergOutput(open_output(URI).address, None, {}, fault=fault)
        output.commit(captured["manifest"], output.read_manifest(), captured["run_id"], overwrite=False)
        return output

    steps = len(commit().operations)
    assert iceberg_rows() == NEW_IDS and steps >= 4
    for step in range(1, steps + 1):
        shutil.rmtree(warehouse)
        shutil.copytree(saved, warehouse)

        crash = crash_at(step)

        output = IcebergOutput(open_output(URI).address, None, {}, fault=crash)
        with pytest.raises(Crash):
            output.commit(captured["manifest"], output.read_manifest(), captured["run_id"], overwrite=False)
        committed = output.committed()
        seen = NEW_IDS if committed else old
        assert iceberg_rows() == polars_rows() == seen, output.operations
        assert ids_of(read_output(URI).sort_by("id")) == seen
        assert len(iceberg_table().snapshots()) == (2 if committed else 1)
        recovered = open_output(URI).recover("rnext")  # what the next run does first
        assert recovered.version == (2 if committed else 1)
        assert not any((table_dir / "_staging").iterdir())
        on_disk = {p.name for p in (table_dir / "data").glob("*.parquet")}
        referenced = {Path(f).name for f in data_files()}
        if not committed:  # nothing the dead run moved in is left behind
            assert on_disk == referenced
        assert referenced <= on_disk
    summary = run_featurize(config(tiny_text_dir, source, URI, incremental=True, prune=True))
    assert summary.rows_written == 0 and iceberg_rows() == NEW_IDS


def test_another_writer_committing_first_fails_ours_and_loses_nothing(tiny_text_dir, tmp_path, warehouse, monkeypatch):
    source, captured = night_ready_to_commit(tiny_text_dir, tmp_path, monkeypatch)

    def delete_under_our_feet(count, what):
        if count == 1:  # after this run loaded the table: another engine deletes a row of part 0
            iceberg_table().delete("id == 'f0-003'")

    output = IcebergOutput(open_output(URI).address, None, {}, fault=delete_under_our_feet)
    with pytest.raises(ConfigError, match="changed since this run read it"):
        output.commit(captured["manifest"], output.read_manifest(), captured["run_id"], overwrite=False)
    assert "f0-003" not in iceberg_rows()  # theirs stands, nothing of ours is referenced
    assert not (Path(output.root.path) / "_fungi_versions" / captured["run_id"]).exists()
    with pytest.raises(ConfigError, match="changed by another writer"):
        run_featurize(config(tiny_text_dir, source, URI, incremental=True, prune=True))
    run_featurize(config(tiny_text_dir, source, URI, overwrite=True))
    assert iceberg_rows() == NEW_IDS


def test_vacuum_expires_old_snapshots_and_drops_their_files(tiny_text_dir, tmp_path, warehouse, monkeypatch):
    source, captured = night_ready_to_commit(tiny_text_dir, tmp_path, monkeypatch)
    output = open_output(URI)
    output.commit(captured["manifest"], output.read_manifest(), captured["run_id"], overwrite=False)
    data = Path(output.root.path) / "data"
    before = len(list(data.glob("*.parquet")))
    assert cli_main(["vacuum", URI, "--retention-hours", "0"]) == 0
    assert len(list(data.glob("*.parquet"))) == before - 2  # part-0's and part-2's first files
    assert len(iceberg_table().snapshots()) == 1 and iceberg_rows() == polars_rows() == NEW_IDS
    assert len(list((Path(output.root.path) / "_fungi_versions").iterdir())) == 1


def test_a_warehouse_on_s3_takes_a_first_run_and_a_night(tiny_text_dir, tmp_path, s3_endpoint):
    """A catalog whose warehouse is on S3 (pyiceberg's FileIO and fungi's own files both through the endpoint):
    the job, pyiceberg, Polars and read_output agree on both snapshots, and every data file is in the bucket."""
    import s3fs

    bucket = f"warehouse-{uuid.uuid4().hex[:8]}"  # moto's buckets outlive a test in this process
    s3 = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint})
    s3.mkdir(bucket)
    catalog, _ = sql_catalog(tmp_path, **{
        "warehouse": f"s3://{bucket}/warehouse", "s3.endpoint": s3_endpoint, "s3.access-key-id": "testing",
        "s3.secret-access-key": "testing", "s3.region": "us-east-1",
    })
    options = {"endpoint_url": s3_endpoint, "key": "testing", "secret": "testing"}  # Ray's workers predate the endpoint
    source = lake(tmp_path / "in", files=3, rows=4)
    run_featurize(config(tiny_text_dir, source, URI, catalog=catalog, storage_options=options))
    night(source)
    summary = run_featurize(config(tiny_text_dir, source, URI, incremental=True, prune=True, catalog=catalog,
                                   storage_options=options))
    assert (summary.rows_written, summary.rows_failed, summary.rows_deleted) == (2, 1, 4)

    table = load_catalog(catalog).load_table("lake.features")
    assert table.metadata.location.startswith(f"s3://{bucket}/warehouse/")
    first, second = (snapshot.snapshot_id for snapshot in table.snapshots())
    assert sorted(table.scan(selected_fields=("id",)).to_arrow()["id"].to_pylist()) == NEW_IDS
    assert ids_of(read_output(URI, storage_options=options, catalog=catalog).sort_by("id")) == NEW_IDS
    assert len(read_output(URI, storage_options=options, catalog=catalog, version=first)) == 12
    frame = pl.scan_iceberg(table, snapshot_id=second).select("id").collect()
    assert sorted(frame["id"].to_list()) == NEW_IDS
    for task in table.scan().plan_files():
        assert task.file.file_path.startswith(f"s3://{bucket}/") and s3.exists(task.file.file_path)
    assert not s3.exists(f"{table.metadata.location}/_staging")  # the night's staging area is gone


def test_an_overwrite_that_drops_a_column_keeps_the_older_snapshots_readable(tiny_text_dir, tmp_path, warehouse):
    """Issue 31.3: --keep-columns label, then --overwrite with another spec and no label: the name mapping
    keeps label's entry, so the first snapshot's files (no field ids) are read whole (time travel)."""
    source = tmp_path / "in"
    for index in range(2):
        write_part(source, f"part-{index}.parquet", [f"f{index}-{r}" for r in range(3)],
                   [f"text {r} of {index}" for r in range(3)], label=[f"l{r}" for r in range(3)])
    run_featurize(config(tiny_text_dir, source, URI, keep_columns=("label",)))
    first = iceberg_table().current_snapshot().snapshot_id
    run_featurize(config(tiny_text_dir, source, URI, overwrite=True, projection_dim=32, seed=7))
    assert "label" not in iceberg_table().schema().column_names
    old = read_output(URI, version=first)
    assert sorted(old.column("label").to_pylist()) == ["l0", "l0", "l1", "l1", "l2", "l2"]
    assert iceberg_table().scan(snapshot_id=first).to_arrow().column("label").null_count == 0
    assert "label" not in read_output(URI).column_names and read_output(URI).num_rows == 6


def featurize_cli(tiny_text_dir: str, source: Path, *extra: str) -> int:
    return cli_main(["featurize", "--input", str(source), "--output", URI, "--modality", "text",
                     "--model", f"hf:{tiny_text_dir}", "--objectives", "kl", "--max-error-fraction", "0.5", *extra])


def error_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def test_a_catalog_typo_forks_no_table(tiny_text_dir, tmp_path, warehouse, capsys):
    """A --catalog whose uri misspells the catalog file is refused (no new catalog is made); a catalog that
    exists but does not hold the table may not create one where another table's files are; a file no run
    of the table wrote is reported with the fix."""
    source = lake(tmp_path / "in", files=2, rows=3)
    assert featurize_cli(tiny_text_dir, source) == 0
    table_dir = Path(open_output(URI).root.path)
    before = sorted(str(p.relative_to(table_dir)) for p in table_dir.rglob("*") if p.name != "_fungi_lease.json.lock")

    typo = json.dumps({"type": "sql", "uri": f"sqlite:///{warehouse}/catlog.db", "warehouse": f"file://{warehouse}"})
    assert featurize_cli(tiny_text_dir, source, "--catalog", typo, "--incremental") == 2
    assert error_lines(capsys) == [
        f"error: --catalog: the SQLite catalog file {warehouse}/catlog.db does not exist (uri sqlite:///{warehouse}/"
        "catlog.db); fungi makes no new catalog behind an explicit --catalog: check the uri, create the catalog "
        "with pyiceberg first, or leave --catalog out for the default catalog in $FUNGI_WAREHOUSE"]
    assert not (warehouse / "catlog.db").exists()

    other, _ = sql_catalog(tmp_path / "other", warehouse=f"file://{warehouse}")  # a real catalog without the table
    assert featurize_cli(tiny_text_dir, source, "--catalog", other) == 2
    (line,) = error_lines(capsys)
    assert line.startswith(f"error: {URI} is not in this Iceberg catalog, but its location {table_dir} already "
                           "holds an Iceberg table's metadata: another catalog's table (check --catalog") and \
        "register it in this one" in line
    assert sorted(str(p.relative_to(table_dir)) for p in table_dir.rglob("*")
                  if p.name != "_fungi_lease.json.lock") == before  # nothing written into the real table
    assert featurize_cli(tiny_text_dir, source, "--incremental") == 0  # the real table: nothing to do

    stray = next((table_dir / "data").glob("*.parquet"))
    shutil.copy(stray, stray.with_name("part-0-0000-rdeadbeef0000.parquet"))  # a file no run of this table wrote
    with pytest.raises(ConfigError, match="no fungi run is pending .* move it out of the folder"):
        open_output(URI).row_version_files()


def test_unknown_catalog_keys_and_names_are_refused_naming_them(tmp_path, warehouse, capsys):
    """A misspelt key ('typ') is refused, not ignored; an unknown catalog name and a catalog without a uri are
    refused without pyiceberg's `--uri` (a flag of its own CLI); other properties pass under "properties"."""
    text, _ = sql_catalog(tmp_path / "cat")
    settings = json.loads(text)
    typo = json.dumps({"typ": "sql", **{k: v for k, v in settings.items() if k != "type"}})
    with pytest.raises(ConfigError, match=r"""^--catalog: unknown catalog property 'typ' \(did you mean 'type'\?\); """
                                          r"""a property fungi does not know goes under "properties": \{"typ": ...\}$"""):
        load_catalog(typo)
    assert cli_main(["feast", URI, "--repo", str(tmp_path / "repo"), "--catalog", typo]) == 2
    (line,) = error_lines(capsys)
    assert "unknown catalog property 'typ'" in line
    with pytest.raises(ConfigError, match="'nosuchcatalog' is not a catalog of pyiceberg's configuration") as refused:
        load_catalog("nosuchcatalog")
    assert "--uri" not in str(refused.value)
    with pytest.raises(ConfigError, match="it has no 'uri'") as refused:
        load_catalog(json.dumps({"type": "rest"}))
    assert "--uri" not in str(refused.value)
    passed = load_catalog(json.dumps({**settings, "s3.endpoint": "http://x", "properties": {"my-extension": "on"}}))
    assert passed.properties["my-extension"] == "on" and passed.properties["s3.endpoint"] == "http://x"


def test_an_empty_table_of_the_same_name_is_refused_with_the_fix_and_overwrite_adopts_it(
        tiny_text_dir, tmp_path, warehouse, capsys):
    import pyarrow as pa

    catalog = load_catalog(None)
    catalog.create_namespace("lake")
    catalog.create_table("lake.features", schema=pa.schema([("name", pa.string()), ("score", pa.float64())]))
    source = lake(tmp_path / "in", files=2, rows=3)
    for _ in range(2):  # every time the same refusal, before any work
        assert featurize_cli(tiny_text_dir, source) == 2
        assert error_lines(capsys) == [
            f"error: {URI} already exists in the Iceberg catalog, empty (no snapshot) with columns of its own "
            "(name, score); fungi creates its tables: --overwrite makes it fungi's (its columns replaced), or "
            "write to another table name"]
    table_dir = Path(open_output(URI).root.path)
    assert not (table_dir / "data").exists() and not (table_dir / "_fungi_versions").exists()
    assert featurize_cli(tiny_text_dir, source, "--overwrite") == 0
    assert iceberg_rows() == polars_rows() == sorted(f"f{i}-{r:03d}" for i in range(2) for r in range(3))
    assert "name" not in iceberg_table().schema().column_names
    assert featurize_cli(tiny_text_dir, source, "--incremental") == 0  # a fungi table from now on
