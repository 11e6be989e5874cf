"""Nightly runs at data-lake scale: lineage per input file, ids, --prune, known failures, setup state.

A 1-layer random BERT keeps featurizing cheap, so these tests measure the bookkeeping.
"""
from __future__ import annotations

import json
import os

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from lakes import config, features, ids_of, lake, last_run, write_part
from pipelines.job import run_featurize
from pipelines.manifest import read_manifest
from pipelines.storage import Location


pytestmark = pytest.mark.usefixtures("local_ray")  # conftest: one local Ray for the session


def test_a_night_reads_only_new_and_changed_files(tiny_text_dir, tmp_path):
    source, output = lake(tmp_path / "in"), tmp_path / "out"
    run_featurize(config(tiny_text_dir, source, output))
    first = features(output)
    assert len(first) == 18 and len(set(ids_of(first))) == 18
    assert sorted(p.name for p in output.glob("*.parquet")) == sorted(
        read_manifest(Location(str(output))).data_files()
    )  # one data file per input file, all at the root

    # part-0 unchanged but unreadable: a night that opened it would fail
    untouched = source / "part-0.parquet"
    stat = untouched.stat()
    untouched.write_bytes(b"\0" * stat.st_size)
    os.utime(untouched, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    # and its output file too: a night that opened it would fail or rewrite it
    manifest = read_manifest(Location(str(output)))
    row = next(r for r in manifest.sources.to_pylist() if r["source"] == "part-0.parquet")
    saved = (output / row["file"]).read_bytes()
    (output / row["file"]).write_bytes(b"\0" * len(saved))

    write_part(source, "part-1.parquet", [f"f1-{r:03d}" for r in range(6)],
               ["changed text"] + [f"text {i} of file 1" for i in range(1, 6)])
    write_part(source, "day2/part-new.parquet", ["n-0", "n-1"], ["new one", "new two"])
    summary = run_featurize(config(tiny_text_dir, source, output, incremental=True))
    assert (summary.rows_written, summary.rows_failed) == (3, 0)  # 1 changed + 2 new
    record = last_run(output)
    assert (record["files_read"], record["files_unchanged"]) == (2, 2)
    assert record["rows_replaced"] == 1
    assert record["output_files_opened"] == 1  # part-1's own output file, nothing else
    assert (output / row["file"]).read_bytes() == b"\0" * len(saved)  # not rewritten either
    (output / row["file"]).write_bytes(saved)
    after = features(output)
    assert ids_of(after) == sorted(ids_of(first) + ["n-0", "n-1"])
    changed = after.filter(pc.equal(after["id"], "f1-000"))
    before = first.filter(pc.equal(first["id"], "f1-000"))
    assert changed["content_hash"][0] != before["content_hash"][0]
    assert changed["event_time"][0].as_py() > before["event_time"][0].as_py()
    kept = after.filter(pc.equal(after["id"], "f1-001"))
    assert kept["event_time"][0] == first.filter(pc.equal(first["id"], "f1-001"))["event_time"][0]


def test_prune_removes_exactly_the_deleted_ids(tiny_text_dir, tmp_path):
    source, output = lake(tmp_path / "in"), tmp_path / "out"
    run_featurize(config(tiny_text_dir, source, output))
    (source / "part-2.parquet").unlink()  # a deleted file
    write_part(source, "part-1.parquet", [f"f1-{r:03d}" for r in range(3)], [f"text {i} of file 1" for i in range(3)])
    kept = run_featurize(config(tiny_text_dir, source, output, incremental=True))
    assert kept.rows_written == 0 and kept.rows_deleted == 0
    assert len(features(output)) == 18  # without --prune rows gone from the input stay
    pruned = run_featurize(config(tiny_text_dir, source, output, incremental=True, prune=True))
    assert pruned.rows_deleted == 9 and pruned.rows_written == 0
    expected = [f"f0-{r:03d}" for r in range(6)] + [f"f1-{r:03d}" for r in range(3)]
    assert ids_of(features(output)) == expected
    assert last_run(output)["rows_deleted"] == 9
    assert not [p for p in output.glob("part-2-*.parquet")]


def test_an_id_moved_to_another_file_is_written_once(tiny_text_dir, tmp_path):
    source, output = lake(tmp_path / "in", files=2, rows=4), tmp_path / "out"
    run_featurize(config(tiny_text_dir, source, output))
    # compaction: both files rewritten into one
    table = pa.concat_tables([pq.read_table(source / f"part-{i}.parquet") for i in range(2)])
    for index in range(2):
        (source / f"part-{index}.parquet").unlink()
    pq.write_table(table, source / "compacted.parquet")
    summary = run_featurize(config(tiny_text_dir, source, output, incremental=True))
    assert (summary.rows_featurized, summary.rows_carried) == (0, 8)  # unchanged rows: carried, not recomputed
    assert ids_of(features(output)) == sorted(table.column("id").to_pylist())  # once each
    assert last_run(output)["rows_moved"] == 8


@pytest.mark.parametrize("old_file", ["rewritten", "deleted"])
def test_a_moved_id_is_not_counted_as_deleted_with_prune(tiny_text_dir, tmp_path, old_file):
    """An id that moves from one input file to another is moved, not deleted: 18 ids in, 18 out
    (issue 31.10); with its old file gone (``--prune`` drops it whole), only its other ids are deleted."""
    source, output = lake(tmp_path / "in"), tmp_path / "out"
    run_featurize(config(tiny_text_dir, source, output))
    if old_file == "rewritten":  # f1-000 moves from part-1 to part-3
        write_part(source, "part-1.parquet", [f"f1-{r:03d}" for r in range(1, 6)],
                   [f"text {i} of file 1" for i in range(1, 6)])
    else:  # part-1 is gone; f1-000 goes on in part-3
        (source / "part-1.parquet").unlink()
    write_part(source, "part-3.parquet", ["f1-000"], ["text 0 of file 1"])
    summary = run_featurize(config(tiny_text_dir, source, output, incremental=True, prune=True))
    deleted = 0 if old_file == "rewritten" else 5
    assert summary.rows_deleted == deleted and (", deleted" in summary.line()) == bool(deleted)
    assert (last_run(output)["rows_deleted"], last_run(output)["rows_moved"]) == (deleted, 1)
    assert len(features(output)) == 18 - deleted and ids_of(features(output)).count("f1-000") == 1


def test_an_id_already_in_an_unchanged_file_is_refused(tiny_text_dir, tmp_path, capsys):
    from pipelines.cli import main

    source, output = lake(tmp_path / "in", files=2, rows=4), tmp_path / "out"
    run_featurize(config(tiny_text_dir, source, output))
    write_part(source, "part-9.parquet", ["f0-001", "zz"], ["dup of f0-001", "fine"])
    code = main(["featurize", "--input", str(source), "--output", str(output), "--modality", "text",
                 "--model", f"hf:{tiny_text_dir}", "--incremental"])
    assert code == 2
    assert "f0-001" in capsys.readouterr().err
    assert len(features(output)) == 8


def test_failures_are_not_retried_every_night_and_do_not_fail_the_night(tiny_text_dir, tmp_path):
    source, output = tmp_path / "in", tmp_path / "out"
    write_part(source, "part-0.parquet", [f"g{i}" for i in range(40)], [f"good text {i}" for i in range(40)])
    write_part(source, "part-1.parquet", ["b0", "b1", "g40"], ["", "   ", "good text 40"])
    first = run_featurize(config(tiny_text_dir, source, output, max_error_fraction=0.05))
    assert first.ok and first.rows_failed_new == 2
    night = run_featurize(config(tiny_text_dir, source, output, max_error_fraction=0.05, incremental=True))
    assert night.ok and night.rows_processed == 0
    retried = run_featurize(config(tiny_text_dir, source, output, max_error_fraction=0.05, incremental=True,
                                   retry_failed=True))
    assert retried.ok and (retried.rows_failed_new, retried.rows_failed_known) == (0, 2)
    errors = pq.read_table(output / "_errors")
    assert sorted(errors.column("id").to_pylist()) == ["b0", "b1"]


def test_a_row_that_now_fails_loses_its_old_features(tiny_text_dir, tmp_path):
    source, output = lake(tmp_path / "in", files=1, rows=4), tmp_path / "out"
    run_featurize(config(tiny_text_dir, source, output))
    write_part(source, "part-0.parquet", [f"f0-{r:03d}" for r in range(4)], ["", "text 1 of file 0", "text 2 of file 0", "x y"])
    summary = run_featurize(config(tiny_text_dir, source, output, incremental=True))
    assert summary.rows_failed_new == 1
    assert "f0-000" not in ids_of(features(output))
    assert pq.read_table(output / "_errors").column("id").to_pylist() == ["f0-000"]
    assert last_run(output)["rows_removed_failed"] == 1


def test_nothing_to_do_is_cheap_and_changes_nothing(tiny_text_dir, tmp_path):
    source, output = lake(tmp_path / "in"), tmp_path / "out"
    run_featurize(config(tiny_text_dir, source, output))
    files = sorted(p.name for p in output.rglob("*.parquet") if "_fungi_log" not in p.parts)
    summary = run_featurize(config(tiny_text_dir, source, output, incremental=True))
    assert (summary.rows_written, summary.rows_skipped) == (0, 18)
    assert sorted(p.name for p in output.rglob("*.parquet") if "_fungi_log" not in p.parts) == files
    assert last_run(output)["output_files_opened"] == 0


def test_nights_keep_the_outputs_negatives_and_full_runs_recompute_them(tiny_text_dir, tmp_path):
    source, output = lake(tmp_path / "in", files=2, rows=6), tmp_path / "out"
    negatives = lake(tmp_path / "train", files=1, rows=8)
    settings = dict(objectives="kl,simclr:num_negatives=4;text_views=2", setup_from=str(negatives))
    run_featurize(config(tiny_text_dir, source, output, **settings))
    first = json.loads((output / "_fungi_manifest.json").read_text())["setup_artifact"]
    write_part(negatives, "part-0.parquet", ["t0", "t1", "t2", "t3"], ["other", "training", "rows", "now"])
    write_part(source, "part-9.parquet", ["new"], ["a new row"])
    run_featurize(config(tiny_text_dir, source, output, incremental=True, **settings))
    assert json.loads((output / "_fungi_manifest.json").read_text())["setup_artifact"] == first  # same feature space
    run_featurize(config(tiny_text_dir, source, output, overwrite=True, **settings))
    rebuilt = json.loads((output / "_fungi_manifest.json").read_text())["setup_artifact"]
    assert rebuilt != first and [p.name for p in (output / "_fungi_setup").iterdir()] == [rebuilt.split("/")[1]]


def test_on_s3_nights_skip_unchanged_files_by_etag_and_old_bad_rows_do_not_fail_them(tiny_text_dir, s3_endpoint):
    """Issue 14's night on a real S3 endpoint: 160 good rows and 2 bad ones pass a 5 % threshold,
    and the nights after it exit 0 without retrying them; an unchanged object is not read."""
    import s3fs

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint})
    fs.mkdir("nightly")

    def put(name: str, ids: list, texts: list) -> None:
        with fs.open(f"nightly/in/{name}", "wb") as handle:
            pq.write_table(pa.table({"id": ids, "text": texts}), handle)

    put("part-0.parquet", [f"a{i}" for i in range(82)], [f"row {i}" for i in range(80)] + [None, None])
    put("part-1.parquet", [f"b{i}" for i in range(80)], [f"row {i}" for i in range(80)])
    # Ray workers were started before the endpoint existed: pass it explicitly
    settings = dict(max_error_fraction=0.05, storage_options={"endpoint_url": s3_endpoint, "key": "testing",
                                                               "secret": "testing"})
    first = run_featurize(config(tiny_text_dir, "s3://nightly/in", "s3://nightly/out", **settings))
    assert (first.rows_written, first.rows_failed_new, first.ok) == (160, 2, True)
    quiet = run_featurize(config(tiny_text_dir, "s3://nightly/in", "s3://nightly/out", incremental=True, **settings))
    assert (quiet.rows_written, quiet.rows_failed, quiet.rows_skipped, quiet.ok) == (0, 0, 162, True)
    put("part-1.parquet", [f"b{i}" for i in range(80)], ["changed"] + [f"row {i}" for i in range(1, 80)])
    night = run_featurize(config(tiny_text_dir, "s3://nightly/in", "s3://nightly/out", incremental=True, **settings))
    assert (night.rows_written, night.rows_failed, night.ok) == (1, 0, True)
    record = json.loads(fs.cat("nightly/out/_fungi_manifest.json"))["runs"][-1]
    assert (record["files_read"], record["files_unchanged"]) == (1, 1)
