"""Delta and Iceberg tables as the job's input: the live rows of one version, nights by data file.

Real tables in temporary folders (``deltalake``; pyiceberg with its SQL catalog on SQLite),
featurized by the 1-layer random BERT of ``tiny_text_dir``, so these tests measure the
bookkeeping: which data files a night reads, and that deleted rows reach ``--prune``.
"""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fungi_ops.errors import ConfigError
from lakes import config, features, ids_of, last_run, sql_catalog
from pipelines.formats.address import parse_address
from pipelines.formats.input_tables import IcebergRead, iceberg_source, list_sources, read_columns
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


Z85 = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.-:+=^!/*?&<>()[]{}@%$#"


def inline_deletion_vector(positions: list[int]) -> dict:
    """A Delta deletion vector stored inline (deltalake does not write them): a RoaringBitmapArray
    of one 32-bit bitmap with one array container, Z85-encoded, as the Delta protocol spells it."""
    import struct

    values = sorted(positions)
    bitmap = (struct.pack("<II", 12346, 1) + struct.pack("<HH", 0, len(values) - 1) + struct.pack("<I", 16)
              + b"".join(struct.pack("<H", v) for v in values))
    data = struct.pack("<iqI", 1681511377, 1, 0) + bitmap
    assert len(data) % 4 == 0  # Z85 encodes 4-byte groups
    text = []
    for start in range(0, len(data), 4):
        value, group = int.from_bytes(data[start:start + 4], "big"), []
        for _ in range(5):
            value, digit = divmod(value, 85)
            group.append(Z85[digit])
        text.extend(reversed(group))
    return {"storageType": "i", "pathOrInlineDv": "".join(text), "sizeInBytes": len(data), "cardinality": len(values)}


def test_a_delta_input_with_deletion_vectors_is_refused(tmp_path):
    from deltalake import DeltaTable, write_deltalake

    lake = tmp_path / "lake"
    write_deltalake(str(lake), rows("a", 10), configuration={"delta.enableDeletionVectors": "true"})
    assert len(list_sources(f"delta:{lake}", {}, None).files) == 1  # enabled but unused: read as it is
    log = [json.loads(line) for line in (lake / "_delta_log" / f"{0:020d}.json").read_text().splitlines()]
    add = next(entry["add"] for entry in log if "add" in entry)
    commit = [
        {"commitInfo": {"timestamp": 1, "operation": "DELETE", "operationParameters": {}}},
        {"remove": {"path": add["path"], "dataChange": True, "deletionTimestamp": 1, "size": add["size"]}},
        {"add": {**add, "deletionVector": inline_deletion_vector([2, 5])}},
    ]
    (lake / "_delta_log" / f"{1:020d}.json").write_text("\n".join(json.dumps(entry) for entry in commit) + "\n")
    assert len(pa.RecordBatchReader.from_stream(DeltaTable(str(lake)).scan()).read_all()) == 8  # a real vector
    with pytest.raises(ConfigError, match="has deletion vectors.*PURGE"):
        list_sources(f"delta:{lake}", {}, None)


def test_setup_rows_are_drawn_from_a_tables_live_rows(tiny_text_dir, tmp_path):
    """--setup-from delta:PATH: the draw (the job's task, run as a plain function) sees no deleted row."""
    from deltalake import DeltaTable, write_deltalake

    from pipelines.setup_rows import select_setup_rows
    from pipelines.spec_resolution import resolve_spec_here

    write_deltalake(str(tmp_path / "train"), rows("t", 6))
    DeltaTable(str(tmp_path / "train")).delete("id = 't-003'")
    settings = config(tiny_text_dir, tmp_path / "unused", tmp_path / "out", objectives="kl,simclr:num_negatives=8;text_views=2")
    spec = resolve_spec_here(settings)
    listing = list_sources(f"delta:{tmp_path / 'train'}", {}, None, what="setup data", flag="--setup-from")
    order, skipped, (keys, samples) = select_setup_rows(spec.json, spec.decoder, listing.location, listing.files, "id",
                                                        "text", spec.setup_rows, 1, 2)
    assert sorted(keys) == [f"t-{i:03d}" for i in range(6) if i != 3] and not skipped and len(samples) == 5
