"""Delta and Iceberg tables as the job's input: the live rows of one version, nights by data file.

Real tables in temporary folders (``deltalake``; pyiceberg with its SQL catalog on SQLite),
featurized by the 1-layer random BERT of ``tiny_text_dir``, so these tests measure the
bookkeeping: which data files a night reads, and that deleted rows reach ``--prune``.
"""
from __future__ import annotations

import uuid

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fungi_ops.errors import ConfigError
from delta_dv import delete_rows, live_adds
from lakes import config, features, ids_of, last_run, sql_catalog
from pipelines.formats.address import parse_address
from pipelines.formats.sources import IcebergRead, iceberg_source, list_sources, live_row_counts, read_columns
from pipelines.job import run_featurize
from pipelines.manifest import read_manifest
from pipelines.storage import InputFile, Location


def rows(prefix: str, count: int, text: str = "text") -> pa.Table:
    ids = [f"{prefix}-{i:03d}" for i in range(count)]
    return pa.table({"id": ids, "text": [f"{text} {i}" for i in ids]})


def sources_of(output) -> set[str]:
    return set(read_manifest(Location(str(output))).sources.column("source").to_pylist())


def hashes(table: pa.Table) -> dict[str, str]:
    return dict(zip(table.column("id").to_pylist(), table.column("content_hash").to_pylist()))


@pytest.mark.usefixtures("local_ray")
def test_a_delta_input_gives_its_live_rows_and_nights_read_only_the_files_a_version_added(tiny_text_dir, tmp_path):
    from deltalake import DeltaTable, write_deltalake

    lake, output = tmp_path / "lake", tmp_path / "out"
    write_deltalake(str(lake), rows("a", 5))
    write_deltalake(str(lake), rows("b", 5), mode="append")
    table = DeltaTable(str(lake))
    table.delete("id = 'a-001'")  # rewrites a's file without the row
    table.update(new_values={"text": "updated"}, predicate="id = 'b-002'")
    first = run_featurize(config(tiny_text_dir, f"delta:{lake}", output))
    table = DeltaTable(str(lake))
    live = sorted(table.to_pyarrow_table().column("id").to_pylist())
    assert ids_of(features(output)) == live and "a-001" not in live and first.rows_in == 9
    assert last_run(output)["input_version"] == table.version() == 3
    before, old_hashes = sources_of(output), hashes(features(output))

    table.delete("id = 'b-000'")
    table.merge(pa.table({"id": ["a-002", "n-000"], "text": ["merged", "inserted"]}), "t.id = s.id",
                source_alias="s", target_alias="t").when_matched_update_all().when_not_matched_insert_all().execute()
    write_deltalake(str(lake), rows("c", 2), mode="append")
    night = run_featurize(config(tiny_text_dir, f"delta:{lake}", output, incremental=True, prune=True))
    table = DeltaTable(str(lake))
    after = features(output)
    assert ids_of(after) == sorted(table.to_pyarrow_table().column("id").to_pylist())
    assert "b-000" not in ids_of(after) and {"n-000", "c-000", "c-001"} <= set(ids_of(after))
    record = last_run(output)
    added = sources_of(output) - before
    assert record["files_read"] == len(added) and record["files_unchanged"] == len(sources_of(output) & before)
    assert record["input_version"] == table.version()
    assert hashes(after)["a-002"] != old_hashes["a-002"]  # merged: new content
    assert night.rows_in == len(ids_of(after))


@pytest.mark.usefixtures("local_ray")
def test_an_iceberg_input_gives_its_live_rows_and_nights_follow_appends_deletes_and_overwrites(tiny_text_dir, tmp_path):
    from pyiceberg.expressions import EqualTo

    catalog_text, catalog = sql_catalog(tmp_path / "warehouse")
    catalog.create_namespace("lake")
    table = catalog.create_table("lake.docs", schema=rows("a", 1).schema)
    table.append(rows("a", 5))
    table.append(rows("b", 5))
    table.append(rows("d", 2))  # no later commit touches its file
    table.delete(EqualTo("id", "a-001"))
    output = tmp_path / "out"
    settings = dict(catalog=catalog_text)
    first = run_featurize(config(tiny_text_dir, "iceberg:lake.docs", output, **settings))
    table = catalog.load_table("lake.docs")
    live = sorted(table.scan().to_arrow().column("id").to_pylist())
    assert ids_of(features(output)) == live and "a-001" not in live and first.rows_in == 11
    assert last_run(output)["input_version"] == table.current_snapshot().snapshot_id
    before, old_hashes = sources_of(output), hashes(features(output))

    table.append(rows("c", 2))
    table.delete(EqualTo("id", "b-000"))
    table.overwrite(pa.table({"id": ["a-002"], "text": ["overwritten"]}), overwrite_filter=EqualTo("id", "a-002"))
    night = run_featurize(config(tiny_text_dir, "iceberg:lake.docs", output, incremental=True, prune=True, **settings))
    table = catalog.load_table("lake.docs")
    after = features(output)
    assert ids_of(after) == sorted(table.scan().to_arrow().column("id").to_pylist())
    assert "b-000" not in ids_of(after) and {"c-000", "c-001", "a-002"} <= set(ids_of(after))
    record = last_run(output)
    assert record["files_read"] == len(sources_of(output) - before)
    assert record["files_unchanged"] == len(sources_of(output) & before) >= 1
    assert record["input_version"] == table.current_snapshot().snapshot_id
    assert hashes(after)["a-002"] != old_hashes["a-002"]
    assert night.rows_in == len(ids_of(after))


def test_a_tables_own_folder_is_refused_as_a_parquet_input(tiny_text_dir, tmp_path):
    from deltalake import write_deltalake

    write_deltalake(str(tmp_path / "lake"), rows("a", 3))
    with pytest.raises(ConfigError, match="is a Delta table.s folder.*--input delta:"):
        run_featurize(config(tiny_text_dir, tmp_path / "lake", tmp_path / "out"))
    with pytest.raises(ConfigError, match="is not a Delta table"):
        run_featurize(config(tiny_text_dir, f"delta:{tmp_path / 'nowhere'}", tmp_path / "out"))


def test_a_path_inside_a_table_is_refused_as_a_parquet_input_naming_the_table(tmp_path):
    """An Iceberg table's data/ folder or one of its files, a Delta data file or partition folder: their files
    hold rows the table deleted; the refusal names the table address to read instead."""
    from deltalake import write_deltalake

    delta = tmp_path / "lake"
    write_deltalake(str(delta), pa.table({"id": ["a", "b"], "text": ["x", "y"], "part": [1, 2]}), partition_by=["part"])
    partition = delta / "part=1"
    for inside in (partition, next(partition.glob("*.parquet"))):
        with pytest.raises(ConfigError, match=rf"--input {inside} is inside a Delta table at {delta} .*"
                                              rf"read it as a table: --input delta:{delta}$"):
            list_sources(str(inside), {}, None)
    _, catalog = sql_catalog(tmp_path / "warehouse")
    catalog.create_namespace("lake")
    catalog.create_table("lake.docs", schema=rows("a", 1).schema).append(rows("a", 3))
    root = tmp_path / "warehouse" / "lake" / "docs"
    for inside in (root / "data", next((root / "data").glob("*.parquet"))):
        with pytest.raises(ConfigError, match=rf"is inside an Iceberg table at {root} .*--input iceberg:lake.docs "):
            list_sources(str(inside), {}, None)
    with pytest.raises(ConfigError, match=r"is an Iceberg table's folder .*--input iceberg:lake.docs "):
        list_sources(str(root), {}, None)
    # a Parquet folder beside the tables is read as one
    pq.write_table(rows("p", 2), tmp_path / "plain.parquet")
    assert [f.relpath for f in list_sources(str(tmp_path / "plain.parquet"), {}, None).files] == ["plain.parquet"]


def _data_file(path: str, content, **extra):
    from pyiceberg.manifest import DataFile, FileFormat
    from pyiceberg.typedef import Record

    return DataFile.from_args(content=content, file_path=path, file_format=FileFormat.PARQUET, partition=Record(),
                              record_count=1, file_size_in_bytes=1, **extra)


def test_iceberg_positional_deletes_are_applied_and_equality_deletes_refused(tmp_path):
    from pyiceberg.manifest import DataFileContent
    from pyiceberg.table import FileScanTask

    data = tmp_path / "data.parquet"
    fields = [pa.field("row_id", pa.string(), metadata={b"PARQUET:field_id": b"1"}),  # written before a rename
              pa.field("text", pa.string(), metadata={b"PARQUET:field_id": b"2"})]
    pq.write_table(pa.table([pa.array([f"r{i}" for i in range(10)]), pa.array(["t"] * 10)], schema=pa.schema(fields)),
                   data, row_group_size=4)
    deletes = tmp_path / "deletes.parquet"
    uri = f"file://{data}"
    pq.write_table(pa.table({"file_path": [uri, uri, "file:///other.parquet"], "pos": [1, 8, 2]}), deletes)
    location = Location(str(tmp_path))
    read = IcebergRead(uri, (str(deletes),), (("id", 1), ("text", 2)))
    source = InputFile(str(data), "data.parquet", data.stat().st_size, "x", read)
    ids = read_columns(location, source, ["id"]).column(0).to_pylist()
    assert ids == [f"r{i}" for i in range(10) if i not in (1, 8)]

    address = parse_address("iceberg:lake.docs", "--input")
    task = FileScanTask(_data_file(uri, DataFileContent.DATA),
                        delete_files={_data_file("file:///eq.parquet", DataFileContent.EQUALITY_DELETES, equality_ids=[1])})
    with pytest.raises(ConfigError, match="equality delete files.*compact"):
        iceberg_source(task, location, read.field_ids, address)
    task = FileScanTask(_data_file(uri, DataFileContent.DATA),
                        delete_files={_data_file(f"file://{deletes}", DataFileContent.POSITION_DELETES)})
    listed = iceberg_source(task, location, read.field_ids, address)
    assert (listed.relpath, listed.read.deletes) == ("data.parquet", (str(deletes),))
    assert listed.identity != iceberg_source(FileScanTask(_data_file(uri, DataFileContent.DATA)), location,
                                             read.field_ids, address).identity


def test_a_delta_input_lists_its_current_version(tmp_path):
    from deltalake import DeltaTable, write_deltalake

    write_deltalake(str(tmp_path / "lake"), rows("a", 3))
    write_deltalake(str(tmp_path / "lake"), rows("b", 3), mode="append")
    DeltaTable(str(tmp_path / "lake")).delete("id = 'a-000'")
    listing = list_sources(f"delta:{tmp_path / 'lake'}", {}, None)
    assert listing.version == 2 and len(listing.files) == 2
    live = sorted(v for f in listing.files for v in read_columns(listing.location, f, ["id"]).column(0).to_pylist())
    assert live == sorted(DeltaTable(str(tmp_path / "lake")).to_pyarrow_table().column("id").to_pylist())
    assert np.all([f.path.startswith(str(tmp_path / "lake")) for f in listing.files])


@pytest.mark.usefixtures("local_ray")
def test_a_delta_input_on_s3_after_a_delete(tiny_text_dir, s3_endpoint):
    """A Delta table on a real S3 endpoint (moto): listed and read through the input's S3 settings."""
    import uuid

    import s3fs
    from deltalake import DeltaTable, write_deltalake

    bucket = f"lake-{uuid.uuid4().hex[:12]}"  # moto's buckets outlive its servers: they live in the process
    s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint}).mkdir(bucket)
    options = {"AWS_ENDPOINT_URL": s3_endpoint, "AWS_ALLOW_HTTP": "true", "AWS_REGION": "us-east-1"}
    write_deltalake(f"s3://{bucket}/docs", rows("a", 4), storage_options=options)
    write_deltalake(f"s3://{bucket}/docs", rows("b", 4), mode="append", storage_options=options)
    DeltaTable(f"s3://{bucket}/docs", storage_options=options).delete("id = 'b-001'")
    settings = dict(storage_options={"endpoint_url": s3_endpoint, "key": "testing", "secret": "testing"})
    summary = run_featurize(config(tiny_text_dir, f"delta:s3://{bucket}/docs", f"s3://{bucket}/out", **settings))
    live = sorted(DeltaTable(f"s3://{bucket}/docs", storage_options=options).to_pyarrow_table().column("id").to_pylist())
    written = read_manifest(Location(f"s3://{bucket}/out", settings["storage_options"]))
    assert (summary.rows_written, summary.ok) == (7, True) and len(live) == 7 and "b-001" not in live
    assert written.input["table_version"] == 2


def dv_lake(path, files: int = 3, count: int = 6):
    """A Delta table that supports deletion vectors: ``files`` appends of ``count`` rows (``a``, ``b``, ...)."""
    from deltalake import write_deltalake

    for index in range(files):
        write_deltalake(str(path), rows("abcdefgh"[index], count), mode="append",
                        configuration={"delta.enableDeletionVectors": "true"})
    return path


def file_of(lake, prefix: str) -> str:
    """The log path of the data file holding the ids ``{prefix}-...``."""
    return next(p for p, add in live_adds(lake).items() if f'"{prefix}-000"' in add["stats"])


def deltalake_view(lake) -> tuple[list[str], dict[str, list[bool]]]:
    """What deltalake itself reads: the live ids (its DataFusion scan: ``to_pyarrow_table`` refuses deletion
    vectors) and each file's keep mask (its ``deletion_vectors()``)."""
    from deltalake import DeltaTable

    table = DeltaTable(str(lake))
    masks = pa.RecordBatchReader.from_stream(table.deletion_vectors()).read_all().to_pylist()
    scan = pa.RecordBatchReader.from_stream(table.scan(columns=["id"])).read_all()
    return (sorted(scan.column("id").to_pylist()),
            {m["filepath"].rsplit("/", 1)[1]: m["selection_vector"] for m in masks})


def test_delta_deletion_vectors_inline_and_in_files_are_applied_and_make_their_file_changed(tmp_path):
    from deltalake import DeltaTable

    from pipelines.tasks import InProcessTasks

    lake = dv_lake(tmp_path / "lake")
    a, b, c = file_of(lake, "a"), file_of(lake, "b"), file_of(lake, "c")
    before = {f.relpath: f.identity for f in list_sources(f"delta:{lake}", {}, None).files}
    delete_rows(lake, {a: [1, 3]}, storage="i")
    delete_rows(lake, {b: [0, 5], c: [2]}, storage="u", prefix="xy")  # one vector file, two offsets
    live, masks = deltalake_view(lake)  # the fixture as deltalake reads it
    assert masks == {a: [True, False, True, False, True, True], b: [False, True, True, True, True, False],
                     c: [True, True, False, True, True, True]}
    assert live == sorted({f"{p}-{i:03d}" for p in "abc" for i in range(6)} - {"a-001", "a-003", "b-000", "b-005", "c-002"})
    assert len(list((lake / "xy").glob("deletion_vector_*.bin"))) == 1

    listing = list_sources(f"delta:{lake}", {}, None)
    read = sorted(v for f in listing.files for v in read_columns(listing.location, f, ["id"]).column(0).to_pylist())
    assert read == live
    counts = live_row_counts(listing.location, listing.files, {f.relpath: 6 for f in listing.files}, InProcessTasks())
    assert counts == {a: 4, b: 4, c: 5}
    assert all(f.identity != before[f.relpath] for f in listing.files)  # each file gained a vector

    DeltaTable(str(lake)).create_checkpoint()  # the descriptors now come from the checkpoint
    delete_rows(lake, {a: [1, 3, 4]}, storage="u")  # a's vector grows (moves to a file)
    after = {f.relpath: f for f in list_sources(f"delta:{lake}", {}, None).files}
    assert {p for p, f in after.items() if f.identity != {g.relpath: g.identity for g in listing.files}[p]} == {a}
    assert read_columns(listing.location, after[a], ["id"]).column(0).to_pylist() == ["a-000", "a-002", "a-005"]
    assert deltalake_view(lake)[1][a] == [True, False, True, False, False, True]

    vector_file = next((lake / "xy").glob("deletion_vector_*.bin"))  # holds b's and c's vectors
    vector_file.write_bytes(vector_file.read_bytes()[:-1] + b"\0")  # c's CRC-32 no longer matches
    with pytest.raises(ValueError, match="deletion vector at .*deletion_vector_.*corrupt"):
        read_columns(listing.location, after[c], ["id"])


def test_delta_deletion_vectors_on_s3_and_checkpoint_names(s3_endpoint, tmp_path):
    """Vector files are found under an S3 table's root; the newest complete checkpoint is the one read."""
    import s3fs

    from pipelines.formats.sources import _newest_checkpoint

    lake = dv_lake(tmp_path / "lake", files=2, count=4)
    delete_rows(lake, {file_of(lake, "a"): [0, 3]}, storage="u", prefix="p1")
    delete_rows(lake, {file_of(lake, "b"): [1]}, storage="i")
    bucket = f"dv-{uuid.uuid4().hex[:12]}"
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint})
    fs.mkdir(bucket)
    fs.put(str(lake), f"{bucket}/docs", recursive=True)
    options = {"endpoint_url": s3_endpoint, "key": "testing", "secret": "testing"}
    listing = list_sources(f"delta:s3://{bucket}/docs", options, None)
    read = sorted(v for f in listing.files for v in read_columns(listing.location, f, ["id"]).column(0).to_pylist())
    assert read == deltalake_view(lake)[0] == ["a-001", "a-002", "b-000", "b-002", "b-003"]

    names = [f"{7:020d}.checkpoint.0000000001.0000000002.parquet",  # multi-part, a part missing
             f"{5:020d}.checkpoint.parquet", f"{9:020d}.checkpoint.parquet", f"{6:020d}.checkpoint.4a1c-e2.json",
             f"{6:020d}.json"]
    assert _newest_checkpoint(names, 8) == (6, [f"{6:020d}.checkpoint.4a1c-e2.json"])
    assert _newest_checkpoint(names + [f"{7:020d}.checkpoint.0000000002.0000000002.parquet"], 8)[0] == 7
    assert _newest_checkpoint(names, 4) == (-1, [])


def test_a_delta_input_with_deletion_vectors_is_featurized_live_and_a_night_prunes_new_deletions(tiny_text_dir, tmp_path):
    """Nights of a table whose DELETEs write deletion vectors: the deleted ids are pruned, no live row
    is featurized again (the changed file is re-read, its rows skipped by their content hashes)."""
    lake, output = dv_lake(tmp_path / "lake"), tmp_path / "out"
    a, b, c = file_of(lake, "a"), file_of(lake, "b"), file_of(lake, "c")
    delete_rows(lake, {a: [1]}, storage="i")
    delete_rows(lake, {b: [2, 3]}, storage="u", prefix="dv")
    first = run_featurize(config(tiny_text_dir, f"delta:{lake}", output))
    live = deltalake_view(lake)[0]
    assert ids_of(features(output)) == live and {"a-001", "b-002", "b-003"}.isdisjoint(live)
    assert (first.rows_in, first.rows_written) == (15, 15)
    before = features(output)

    delete_rows(lake, {a: [1, 4], c: [0]}, storage="u")  # a's vector grows, c gains one; b is untouched
    night = run_featurize(config(tiny_text_dir, f"delta:{lake}", output, incremental=True, prune=True))
    live = deltalake_view(lake)[0]
    after = features(output)
    assert ids_of(after) == live and {"a-004", "c-000"}.isdisjoint(live) and len(live) == 13
    assert (night.rows_in, night.rows_skipped, night.rows_written, night.rows_deleted) == (13, 13, 0, 2)
    record = last_run(output)
    assert (record["files_read"], record["files_unchanged"]) == (2, 1)
    kept = before.filter(pa.compute.is_in(before.column("id"), pa.array(live)))
    assert after.select(kept.column_names).equals(kept)  # every live row as committed, bit for bit


def test_setup_rows_are_drawn_from_a_tables_live_rows(tiny_text_dir, tmp_path):
    """--setup-from delta:PATH: the draw (the job's task, run as a plain function) sees no deleted row,
    whether its file was rewritten without it or its deletion vector marks it."""
    from deltalake import DeltaTable

    from pipelines.job.setup_rows import select_setup_rows
    from pipelines.job.spec_resolution import resolve_spec_here

    train = dv_lake(tmp_path / "train", files=2, count=3)
    DeltaTable(str(train)).delete("id = 'a-001'")  # copy-on-write: a's file rewritten
    delete_rows(train, {file_of(train, "b"): [2]})  # b-002 in b's deletion vector
    settings = config(tiny_text_dir, tmp_path / "unused", tmp_path / "out", objectives="kl,simclr:num_negatives=8;text_views=2")
    spec = resolve_spec_here(settings)
    listing = list_sources(f"delta:{tmp_path / 'train'}", {}, None, what="setup data", flag="--setup-from")
    order, skipped, (keys, samples) = select_setup_rows(spec.json, spec.decoder, listing.location, listing.files, "id",
                                                        "text", spec.setup_rows, 1, 2)
    assert sorted(keys) == ["a-000", "a-002", "b-000", "b-001"] == deltalake_view(train)[0]
    assert not skipped and len(samples) == 4


def test_a_renamed_column_of_files_without_field_ids_is_read_through_the_name_mapping(tiny_text_dir, tmp_path):
    """Issue 31.4: files added with add_files carry no field ids; after ``text`` -> ``body`` the older file's
    rows are read through the table's name mapping (as pyiceberg reads them), not as nulls."""
    catalog_text, catalog = sql_catalog(tmp_path / "warehouse")
    catalog.create_namespace("inp")
    table = catalog.create_table("inp.ren", schema=rows("a", 1).schema)
    pq.write_table(rows("a", 10), tmp_path / "f1.parquet")
    table.add_files([str(tmp_path / "f1.parquet")])
    with table.update_schema() as update:
        update.rename_column("text", "body")
    pq.write_table(rows("b", 5).rename_columns(["id", "body"]), tmp_path / "f2.parquet")
    table.add_files([str(tmp_path / "f2.parquet")])
    assert table.scan().to_arrow().column("body").null_count == 0  # pyiceberg's own reader

    output = tmp_path / "out"
    summary = run_featurize(config(tiny_text_dir, "iceberg:inp.ren", output, catalog=catalog_text, data_column="body"))
    assert (summary.rows_written, summary.rows_failed) == (15, 0)
    assert ids_of(features(output)) == sorted(table.scan().to_arrow().column("id").to_pylist())
