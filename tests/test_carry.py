"""Nights follow rows, not files: when the lake rewrites its files (a Parquet file rewritten or
renamed, Delta ``delete``/``merge``/``optimize.compact``, Iceberg ``delete``/``upsert``/overwrite),
the rows whose id and content are unchanged are carried from the committed output, bit for
bit, and only changed and new rows are featurized (the run record's ``rows_featurized``).

Small in-process jobs on the 1-layer random BERT of ``tiny_text_dir``.
"""
from __future__ import annotations

import json
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lakes import config, features, ids_of, last_run, lake, sql_catalog, write_part
from pipelines.job import run_featurize


def by_id(table: pa.Table) -> dict[str, dict]:
    return {row["id"]: row for row in table.to_pylist()}


def assert_night(before: pa.Table, after: pa.Table, live: list[str], changed: set[str], new: set[str], output) -> dict:
    """The night featurized the changed and new rows only, carried the rest bit-identical, and pruned the deleted."""
    record = last_run(output)
    assert sorted(ids_of(after)) == sorted(live)
    old, now = by_id(before), by_id(after)
    unchanged = set(live) - changed - new
    assert unchanged and all(now[key] == old[key] for key in unchanged)  # every column as committed
    assert all(now[key]["content_hash"] != old[key]["content_hash"] for key in changed)
    assert record["rows_featurized"] == len(changed) + len(new) == record["rows_written"]
    return record


def texts(table: pa.Table) -> pa.Table:
    return table.select(["id", "text"])


def test_a_parquet_folder_whose_files_are_renamed_and_repartitioned_carries_its_unchanged_rows(tiny_text_dir, tmp_path):
    root, output = lake(tmp_path / "in", files=3, rows=6), tmp_path / "out"
    run_featurize(config(tiny_text_dir, root, output))
    before = features(output)
    (root / "part-0.parquet").rename(root / "renamed-0.parquet")
    part1 = pq.read_table(root / "part-1.parquet")
    (root / "part-1.parquet").unlink()
    ids, values = part1.column("id").to_pylist(), part1.column("text").to_pylist()
    values[2] = "changed text"
    write_part(root, "split-a.parquet", ids[:3], values[:3])
    write_part(root, "split-b.parquet", ids[3:5] + ["f1-new"], values[3:5] + ["a new row"])  # f1-005 deleted
    summary = run_featurize(config(tiny_text_dir, root, output, incremental=True, prune=True))
    live = [key for key in ids_of(before) if key != "f1-005"] + ["f1-new"]
    record = assert_night(before, features(output), live, {"f1-002"}, {"f1-new"}, output)
    assert record["rows_carried"] == summary.rows_carried == 6 + 4 and record["rows_deleted"] == 1
    assert "featurized 2, carried 10" in summary.line()


def test_a_renamed_file_without_prune_moves_its_rows_to_the_new_name(tiny_text_dir, tmp_path):
    root, output = lake(tmp_path / "in", files=2, rows=4), tmp_path / "out"
    run_featurize(config(tiny_text_dir, root, output))
    before = features(output)
    (root / "sub").mkdir()
    shutil.move(root / "part-0.parquet", root / "sub" / "part-0.parquet")
    run_featurize(config(tiny_text_dir, root, output, incremental=True))
    record = assert_night(before, features(output), ids_of(before), set(), set(), output)
    assert record["rows_carried"] == record["rows_moved"] == 4
    sources = json.loads((output / "_fungi_manifest.json").read_text())
    assert record["rows_featurized"] == 0 and sources["runs"][-1]["files_read"] == 1


def test_a_compaction_without_prune_sends_the_driver_counts_not_ids(tiny_text_dir, tmp_path, monkeypatch):
    """Without --prune the ids that moved out of the compacted files stay on scratch storage: each
    bucket task returns (file, donor, count) and at most 5 example ids a pair, whatever the rows."""
    import pipelines.job.plan as plan

    root, output = lake(tmp_path / "in", files=2, rows=12), tmp_path / "out"
    run_featurize(config(tiny_text_dir, root, output))
    before = features(output)
    table = pa.concat_tables([pq.read_table(root / f"part-{i}.parquet") for i in range(2)])
    for index in range(2):
        (root / f"part-{index}.parquet").unlink()
    pq.write_table(table, root / "compacted.parquet")
    returned, check_bucket = [], plan._check_bucket
    monkeypatch.setattr(plan, "_check_bucket", lambda *args: returned.append(check_bucket(*args)) or returned[-1])
    summary = run_featurize(config(tiny_text_dir, root, output, incremental=True))
    collisions = [pair for _, _, pairs in returned for pair in pairs]
    assert sum(count for _, _, count, _ in collisions) == 24
    assert all(isinstance(found, list) and len(found) <= 5 for _, _, _, found in collisions)
    record = assert_night(before, features(output), ids_of(before), set(), set(), output)
    assert (summary.rows_carried, record["rows_moved"]) == (24, 24)


@pytest.mark.parametrize("prune", [False, True])
def test_rows_that_failed_before_are_retried_not_carried_from_another_file(tiny_text_dir, tmp_path, prune):
    """A compaction moves two rows that failed (empty texts) into a new file: they are tried again
    there, not carried from the compacted files' output, and stay failed once, in _errors/ only."""
    root, output = tmp_path / "in", tmp_path / "out"
    write_part(root, "part-0.parquet", [f"g{i}" for i in range(6)], [f"good text {i}" for i in range(6)])
    write_part(root, "part-1.parquet", ["b0", "b1", "g6"], ["", "   ", "good text 6"])
    assert run_featurize(config(tiny_text_dir, root, output)).rows_failed_new == 2
    before = features(output)
    table = pa.concat_tables([pq.read_table(root / f"part-{i}.parquet") for i in range(2)])
    for index in range(2):
        (root / f"part-{index}.parquet").unlink()
    pq.write_table(table, root / "compacted.parquet")
    summary = run_featurize(config(tiny_text_dir, root, output, incremental=True, prune=prune))
    assert (summary.rows_carried, summary.rows_failed_new + summary.rows_failed_known) == (7, 2)
    assert features(output).equals(before)
    errors = pq.read_table(output / "_errors")
    assert sorted(errors.column("id").to_pylist()) == ["b0", "b1"]


def delta_rows(prefix: str, count: int) -> pa.Table:
    ids = [f"{prefix}-{i:03d}" for i in range(count)]
    return pa.table({"id": ids, "text": [f"text of {i}" for i in ids]})


def test_delta_delete_merge_and_compaction_featurize_only_changed_and_new_rows(tiny_text_dir, tmp_path):
    from deltalake import DeltaTable, write_deltalake

    lake_dir, output = tmp_path / "lake", tmp_path / "out"
    for prefix in "abc":
        write_deltalake(str(lake_dir), delta_rows(prefix, 6), mode="append")
    settings = dict(incremental=True, prune=True)
    run_featurize(config(tiny_text_dir, f"delta:{lake_dir}", output, **settings))
    before = features(output)

    table = DeltaTable(str(lake_dir))
    table.delete("id = 'a-001'")  # copy-on-write: a's file rewritten without the row
    table.merge(pa.table({"id": ["b-002", "n-000"], "text": ["merged", "inserted"]}), "t.id = s.id",
                source_alias="s", target_alias="t").when_matched_update_all().when_not_matched_insert_all().execute()
    run_featurize(config(tiny_text_dir, f"delta:{lake_dir}", output, **settings))
    live = sorted(DeltaTable(str(lake_dir)).to_pyarrow_table().column("id").to_pylist())
    record = assert_night(before, features(output), live, {"b-002"}, {"n-000"}, output)
    assert record["rows_carried"] >= 5 and record["rows_deleted"] == 1

    middle = features(output)
    table = DeltaTable(str(lake_dir))
    files_before = len(table.file_uris())
    table.optimize.compact()
    assert len(DeltaTable(str(lake_dir)).file_uris()) < files_before
    summary = run_featurize(config(tiny_text_dir, f"delta:{lake_dir}", output, **settings))
    record = assert_night(middle, features(output), live, set(), set(), output)
    assert record["rows_carried"] == len(live) == summary.rows_carried and record["rows_deleted"] == 0


def iceberg_table(tmp_path):
    catalog_text, catalog = sql_catalog(tmp_path / "warehouse")
    catalog.create_namespace("lake")
    table = catalog.create_table("lake.docs", schema=delta_rows("a", 1).schema)
    for prefix in "ab":
        table.append(delta_rows(prefix, 5))
    return catalog, catalog_text


def test_iceberg_delete_upsert_and_an_overwrite_with_the_same_rows_featurize_only_changed_and_new_rows(tiny_text_dir, tmp_path):
    from pyiceberg.expressions import AlwaysTrue, EqualTo

    catalog, catalog_text = iceberg_table(tmp_path)
    output = tmp_path / "out"
    settings = dict(incremental=True, prune=True, catalog=catalog_text)
    run_featurize(config(tiny_text_dir, "iceberg:lake.docs", output, **settings))
    before = features(output)

    table = catalog.load_table("lake.docs")
    table.delete(EqualTo("id", "a-001"))
    table.upsert(pa.table({"id": ["b-002", "n-000"], "text": ["upserted", "inserted"]}), join_cols=["id"])
    run_featurize(config(tiny_text_dir, "iceberg:lake.docs", output, **settings))
    live = sorted(catalog.load_table("lake.docs").scan().to_arrow().column("id").to_pylist())
    record = assert_night(before, features(output), live, {"b-002"}, {"n-000"}, output)
    assert record["rows_carried"] >= 4 and record["rows_deleted"] == 1

    middle = features(output)
    table = catalog.load_table("lake.docs")
    table.overwrite(table.scan().to_arrow(), overwrite_filter=AlwaysTrue())  # every file rewritten, same rows
    run_featurize(config(tiny_text_dir, "iceberg:lake.docs", output, **settings))
    record = assert_night(middle, features(output), live, set(), set(), output)
    assert record["rows_carried"] == len(live)


@pytest.mark.parametrize("kind", ["delta", "iceberg"])
def test_a_table_output_carries_and_records_featurized_and_carried(kind, tiny_text_dir, tmp_path, monkeypatch):
    from pipelines.formats import open_output, read_output

    monkeypatch.setenv("FUNGI_WAREHOUSE", str(tmp_path / "warehouse"))
    root = lake(tmp_path / "in", files=2, rows=4)
    uri = f"delta:{tmp_path / 'out'}" if kind == "delta" else "iceberg:carry.out"
    run_featurize(config(tiny_text_dir, root, uri))
    before = read_output(uri).sort_by("id")
    (root / "part-0.parquet").rename(root / "renamed-0.parquet")
    summary = run_featurize(config(tiny_text_dir, root, uri, incremental=True, prune=True))
    record = open_output(uri).read_manifest().runs[-1]
    assert (record.rows_featurized, record.rows_carried, record.rows_deleted) == (0, 4, 0)
    assert "featurized 0, carried 4" in summary.line()
    assert read_output(uri).sort_by("id").equals(before)


def test_a_compaction_read_gathers_its_few_changed_rows_into_full_blocks():
    """After a compaction each record batch keeps only its changed rows: they go on in blocks of the
    stream's size, not one tiny block per batch (thousands of 2-row blocks at 10M rows)."""
    from pipelines.job.read import _Blocks

    blocks = _Blocks(4)
    batches = [pa.table({"id": pa.array([f"{b}-{i}" for i in range(n)], pa.string())})
               for b, n in enumerate([2, 0, 3, 5, 1])]
    out = [block for batch in batches for block in blocks.add(batch)] + list(blocks.rest())
    assert [block.num_rows for block in out] == [4, 4, 3]
    assert pa.concat_tables(out).column("id").to_pylist() == pa.concat_tables(batches).column("id").to_pylist()


def test_the_id_check_scans_groups_of_files_not_one_task_per_file():
    """Scan tasks take about SCAN_TASK_ROWS ids each: 250 files of a 10M-row compaction night, 10 tasks."""
    from pipelines.job.plan import _groups

    assert _groups([200_000] * 50 + [50_000] * 200, 1_000_000) == [
        list(range(start, start + 5)) for start in range(0, 50, 5)
    ] + [list(range(start, start + 20)) for start in range(50, 250, 20)]
    assert _groups([0, 3_000_000, 10], 1_000_000) == [[0], [1], [2]]
    assert _groups([], 1_000_000) == []
