"""A Delta table as the job's output (``delta:PATH``): one run one version, read by every Delta reader.

The real job (tiny random text model, the session's Ray) writes the table; deltalake's
reader, Polars' ``scan_delta`` and fungi's own readers check it; a crash after every commit
step, another writer committing under our feet and a rewrite by another engine each get a
test; a first run and a night also run against a real S3 endpoint (moto's server).
"""
from __future__ import annotations

import shutil
import uuid
from pathlib import Path

import polars as pl
import pytest
from deltalake import DeltaTable

from lakes import Crash, config, crash_at, ids_of, lake, write_part
from fungi_ops.errors import ConfigError
from pipelines.cli import main as cli_main
from pipelines.formats import open_output, read_output
from pipelines.formats.delta import DeltaOutput
from pipelines.job import FeaturizeJob, run_featurize

pytestmark = pytest.mark.usefixtures("local_ray")  # conftest: one local Ray for the session


def delta_rows(path: Path, version: int | None = None) -> list[str]:
    """The ids deltalake's own reader sees (a version of the table)."""
    return sorted(DeltaTable(str(path), version=version).to_pyarrow_table(columns=["id"])["id"].to_pylist())


def polars_rows(path: Path) -> list[str]:
    return sorted(pl.scan_delta(str(path)).select("id").collect()["id"].to_list())


def night(source: Path) -> None:
    """Part 0: one row changed, one now failing (empty); part 2 deleted; part 5 new."""
    (source / "part-2.parquet").unlink()
    write_part(source, "part-0.parquet", [f"f0-{r:03d}" for r in range(4)],
               ["new text", ""] + [f"text {i} of file 0" for i in range(2, 4)])
    write_part(source, "part-5.parquet", ["n-0"], ["brand new"])


NEW_IDS = ["f0-000", "f0-002", "f0-003", "f1-000", "f1-001", "f1-002", "f1-003", "n-0"]


def test_first_run_and_a_night_are_two_versions_that_every_reader_sees(tiny_text_dir, tmp_path, capsys):
    source, table_dir = lake(tmp_path / "in", files=3, rows=4), tmp_path / "table"
    uri = f"delta:{table_dir}"
    run_featurize(config(tiny_text_dir, source, uri))
    first = read_output(uri).sort_by("id")
    assert first.num_rows == 12 and first.schema.field("embedding").type.list_size == 32
    files_v0 = {a for a in DeltaTable(str(table_dir)).file_uris()}

    night(source)
    summary = run_featurize(config(tiny_text_dir, source, uri, incremental=True, prune=True))
    assert (summary.rows_written, summary.rows_failed, summary.rows_deleted) == (2, 1, 4)
    table = DeltaTable(str(table_dir))
    assert table.version() == 1  # one version per run
    assert delta_rows(table_dir) == polars_rows(table_dir) == NEW_IDS
    assert ids_of(read_output(uri).sort_by("id")) == NEW_IDS
    files_v1 = set(table.file_uris())
    kept = files_v0 & files_v1
    assert len(kept) == 1 and "part-1" in next(iter(kept))  # the unchanged source's file is not rewritten
    assert len(files_v1 - files_v0) == 2  # part-0 rewritten, part-5 new
    commit = table.history(limit=1)[0]
    manifest = open_output(uri).read_manifest()
    assert commit["fungi.spec_hash"] == manifest.spec_hash and commit["fungi.run_id"] == manifest.runs[-1].run_id
    assert commit["fungi.rows"] == "8" and '"embedding": 32' in commit["fungi.dims"]
    assert manifest.errors == 1  # the row that now fails is in _errors/, not in the table

    # time travel: version 0 is the first run, for the table's readers and for fungi's
    assert delta_rows(table_dir, version=0) == ids_of(first)
    assert read_output(uri, version=0).sort_by("id").equals(first)
    assert cli_main(["eval", "--train", uri, "--test", uri, "--label-column", "content_hash", "--version", "0",
                     "--features", "embedding", "--k", "1"]) == 0
    assert "embedding" in capsys.readouterr().out

    # another spec is refused, as for a folder
    with pytest.raises(ConfigError, match="spec"):
        run_featurize(config(tiny_text_dir, source, uri, incremental=True, seed=1))
    # a table output keeps its versions itself: --history is for folders
    with pytest.raises(ConfigError, match="--history"):
        run_featurize(config(tiny_text_dir, source, uri, incremental=True, history=True))


def night_ready_to_commit(tiny_text_dir: str, tmp_path: Path, monkeypatch) -> tuple[Path, str, dict]:
    """A table after one run, and a night (changing, failing, pruning) stopped right before its commit."""
    source, table_dir = lake(tmp_path / "in", files=3, rows=4), tmp_path / "table"
    uri = f"delta:{table_dir}"
    run_featurize(config(tiny_text_dir, source, uri))
    night(source)
    captured: dict = {}
    monkeypatch.setattr(DeltaOutput, "commit", lambda self, manifest, previous, run_id, *, overwrite: captured.update(
        manifest=manifest, previous=previous, run_id=run_id))
    FeaturizeJob(config(tiny_text_dir, source, uri, incremental=True, prune=True)).run()
    monkeypatch.undo()
    (table_dir / "_fungi_lease.json").unlink(missing_ok=True)
    return source, uri, captured


def test_a_crash_after_any_commit_step_leaves_one_version_and_the_next_run_cleans_up(tiny_text_dir, tmp_path, monkeypatch):
    source, uri, captured = night_ready_to_commit(tiny_text_dir, tmp_path, monkeypatch)
    table_dir = Path(uri.removeprefix("delta:"))
    snapshot = tmp_path / "snapshot"
    shutil.copytree(table_dir, snapshot)
    old = delta_rows(table_dir)

    def commit(fault=None) -> DeltaOutput:
        output = DeltaOutput(str(table_dir), {}, fault=fault)
        output.commit(captured["manifest"], output.read_manifest(), captured["run_id"], overwrite=False)
        return output

    steps = len(commit().operations)
    assert delta_rows(table_dir) == NEW_IDS and steps >= 4
    for step in range(1, steps + 1):
        shutil.rmtree(table_dir)
        shutil.copytree(snapshot, table_dir)

        crash = crash_at(step)

        output = DeltaOutput(str(table_dir), {}, fault=crash)
        with pytest.raises(Crash):
            output.commit(captured["manifest"], output.read_manifest(), captured["run_id"], overwrite=False)
        committed = output.committed()
        seen = NEW_IDS if committed else old
        assert delta_rows(table_dir) == polars_rows(table_dir) == seen, output.operations
        assert ids_of(read_output(uri).sort_by("id")) == seen
        recovered = DeltaOutput(str(table_dir), {}).recover("rnext")  # what the next run does first
        assert recovered.version == (2 if committed else 1)
        assert not any((table_dir / "_staging").iterdir())
        on_disk = {p.name for p in table_dir.glob("*.parquet")}
        referenced = {Path(u).name for u in DeltaTable(str(table_dir)).file_uris()}
        if not committed:  # nothing the dead run moved in is left behind
            assert on_disk == {Path(u).name for u in DeltaTable(str(snapshot)).file_uris()}
        assert referenced <= on_disk
    summary = run_featurize(config(tiny_text_dir, source, uri, incremental=True, prune=True))
    assert summary.rows_written == 0 and delta_rows(table_dir) == NEW_IDS


def test_another_writer_committing_first_fails_ours_and_loses_nothing(tiny_text_dir, tmp_path, monkeypatch):
    source, uri, captured = night_ready_to_commit(tiny_text_dir, tmp_path, monkeypatch)
    table_dir = Path(uri.removeprefix("delta:"))

    def delete_under_our_feet(count, what):
        if count == 1:  # after this run loaded the table: another engine deletes a row of part 0
            DeltaTable(str(table_dir)).delete("id = 'f0-003'")

    output = DeltaOutput(str(table_dir), {}, fault=delete_under_our_feet)
    with pytest.raises(ConfigError, match="changed since this run read it"):
        output.commit(captured["manifest"], output.read_manifest(), captured["run_id"], overwrite=False)
    assert "f0-003" not in delta_rows(table_dir)  # theirs stands, nothing of ours is referenced
    assert not (table_dir / "_fungi_versions" / captured["run_id"]).exists()
    # fungi's lineage no longer matches the table: a night is refused, --overwrite rebuilds
    with pytest.raises(ConfigError, match="changed by another writer"):
        run_featurize(config(tiny_text_dir, source, uri, incremental=True, prune=True))
    run_featurize(config(tiny_text_dir, source, uri, overwrite=True))
    assert delta_rows(table_dir) == NEW_IDS


def test_vacuum_keeps_the_current_version_and_drops_the_old_files(tiny_text_dir, tmp_path, monkeypatch):
    source, uri, captured = night_ready_to_commit(tiny_text_dir, tmp_path, monkeypatch)
    table_dir = Path(uri.removeprefix("delta:"))
    output = DeltaOutput(str(table_dir), {})
    output.commit(captured["manifest"], output.read_manifest(), captured["run_id"], overwrite=False)
    before = len(list(table_dir.glob("*.parquet")))
    assert cli_main(["vacuum", uri, "--retention-hours", "0"]) == 0
    assert len(list(table_dir.glob("*.parquet"))) == before - 2  # part-0's and part-2's first files
    assert delta_rows(table_dir) == NEW_IDS and len(list((table_dir / "_fungi_versions").iterdir())) == 1
    assert cli_main(["vacuum", str(tmp_path / "in")]) == 2  # a folder keeps no versions


def test_a_table_on_s3_takes_a_first_run_and_a_night(tiny_text_dir, tmp_path, s3_endpoint):
    """On S3 the commit is a conditional put (no lock service) and fungi reads its commits from the log's
    own files: the job, deltalake, Polars and read_output agree on both versions."""
    import s3fs

    bucket = f"lake-{uuid.uuid4().hex[:8]}"  # moto's buckets outlive a test in this process
    s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint}).mkdir(bucket)
    options = {"endpoint_url": s3_endpoint, "key": "testing", "secret": "testing"}  # Ray's workers predate the endpoint
    source, uri = lake(tmp_path / "in", files=3, rows=4), f"delta:s3://{bucket}/features"
    run_featurize(config(tiny_text_dir, source, uri, storage_options=options))
    night(source)
    summary = run_featurize(config(tiny_text_dir, source, uri, incremental=True, prune=True, storage_options=options))
    assert (summary.rows_written, summary.rows_failed, summary.rows_deleted) == (2, 1, 4)
    output = open_output(uri, options)
    table = DeltaTable(output.table_uri, storage_options=output.delta_options)
    assert table.version() == 1
    assert ids_of(read_output(uri, storage_options=options).sort_by("id")) == NEW_IDS
    assert len(read_output(uri, storage_options=options, version=0)) == 12
    frame = pl.scan_delta(output.table_uri, storage_options=output.delta_options).select("id").collect()
    assert sorted(frame["id"].to_list()) == NEW_IDS


def two_versions(tiny_text_dir: str, tmp_path: Path) -> tuple[Path, str, list[str]]:
    """A table of version 0 (12 rows) and version 1 (one input file changed): version 0's ids."""
    source, table_dir = lake(tmp_path / "in", files=3, rows=4), tmp_path / "table"
    uri = f"delta:{table_dir}"
    run_featurize(config(tiny_text_dir, source, uri, incremental=True))
    first = delta_rows(table_dir)
    write_part(source, "part-0.parquet", [f"f0-{r:03d}" for r in range(4)], [f"changed {r}" for r in range(4)])
    run_featurize(config(tiny_text_dir, source, uri, incremental=True))
    assert DeltaTable(str(table_dir)).version() == 1
    return table_dir, uri, first


def test_a_fractional_retention_keeps_the_versions_inside_it(tiny_text_dir, tmp_path):
    """Issue 31.1: Delta counts whole hours; --retention-hours 0.9 used to become 0 and drop version 0."""
    table_dir, uri, first = two_versions(tiny_text_dir, tmp_path)
    assert cli_main(["vacuum", uri, "--retention-hours", "0.9"]) == 0
    assert delta_rows(table_dir, version=0) == first  # version 1 replaced version 0 seconds ago
    assert ids_of(read_output(uri, version=0).sort_by("id")) == first
    assert len(list(table_dir.glob("*.parquet"))) == 4  # part-0's first file kept for version 0
    assert cli_main(["vacuum", uri, "--retention-hours", "0"]) == 0
    assert len(list(table_dir.glob("*.parquet"))) == 3


def test_an_overwrite_that_keeps_a_new_column_adds_it_to_the_delta_schema(tiny_text_dir, tmp_path):
    """Issue 31.2: every Delta reader sees a column that an --overwrite added, in the same commit."""
    source, table_dir = tmp_path / "in", tmp_path / "table"
    for index in range(2):
        write_part(source, f"part-{index}.parquet", [f"f{index}-{r}" for r in range(3)],
                   [f"text {r} of {index}" for r in range(3)], label=[f"l{r}" for r in range(3)])
    uri = f"delta:{table_dir}"
    run_featurize(config(tiny_text_dir, source, uri))
    assert "label" not in DeltaTable(str(table_dir)).schema().to_arrow().names
    run_featurize(config(tiny_text_dir, source, uri, overwrite=True, keep_columns=("label",)))
    table = DeltaTable(str(table_dir))
    assert "label" in table.schema().to_arrow().names
    assert sorted(table.to_pyarrow_table(columns=["label"])["label"].to_pylist()) == ["l0", "l0", "l1", "l1", "l2", "l2"]
    assert sorted(pl.scan_delta(str(table_dir)).select("label").collect()["label"].to_list())[0] == "l0"
    assert read_output(uri).column("label").null_count == 0
    assert "label" not in read_output(uri, version=0).column_names  # version 0 keeps its own columns


def test_fungi_finds_its_table_after_many_commits_of_another_writer(tiny_text_dir, tmp_path):
    """Issue 31.6: 120 commits that change no file (table properties) once hid fungi's last commit."""
    table_dir, uri, _ = two_versions(tiny_text_dir, tmp_path)
    table = DeltaTable(str(table_dir))
    for interval in range(120):
        table.alter.set_table_properties({"delta.checkpointInterval": str(100 + interval)})
    assert DeltaTable(str(table_dir)).version() == 121
    assert read_output(uri).schema.field("embedding").type.list_size == 32  # fixed-size: fungi's dims found
    assert not open_output(uri).holds_foreign_data()
    write_part(tmp_path / "in", "part-1.parquet", ["f1-000"], ["changed again"])
    summary = run_featurize(config(tiny_text_dir, tmp_path / "in", uri, incremental=True))
    assert summary.rows_written == 1 and delta_rows(table_dir).count("f1-000") == 1


def test_a_first_run_where_every_row_fails_exits_by_the_error_fraction_and_leaves_nothing(tiny_text_dir, tmp_path,
                                                                                       capsys):
    """Issue 31.11: all rows failing on a new table is a run's failure (exit 1), not a bad setting (exit 2),
    and no errors file or manifest folder of the run is left uncommitted."""
    source, table_dir = tmp_path / "in", tmp_path / "table"
    for index in range(2):
        write_part(source, f"part-{index}.parquet", [f"f{index}-{r}" for r in range(5)], [""] * 5)
    args = ["featurize", "--input", str(source), "--output", f"delta:{table_dir}", "--modality", "text",
            "--model", f"hf:{tiny_text_dir}", "--objectives", "kl", "--batch-size", "4", "--incremental"]

    def left_behind() -> list[str]:
        return sorted(str(p.relative_to(table_dir)) for p in table_dir.rglob("*")
                      if p.is_file() and not p.name.startswith("_fungi_lease"))

    assert cli_main(args) == 1
    captured = capsys.readouterr()
    assert "failed 10" in captured.out
    errors = [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "100.0%" in errors[0]
    assert "(10 failed)" in errors[0] and "nothing was committed" in errors[0]
    assert left_behind() == [] and not (table_dir / "_delta_log").exists()

    assert cli_main([*args, "--max-error-fraction", "1"]) == 0  # every failure allowed: still nothing to commit
    assert "warning:" in capsys.readouterr().err and left_behind() == []

    write_part(source, "part-0.parquet", ["f0-0"], ["now some text"])
    assert cli_main(args) == 1  # part-1's five rows still fail (5 of 6 > 0.01)
    assert delta_rows(table_dir) == ["f0-0"]


def test_a_dead_runs_files_are_deleted_whatever_vacuum_removed(tiny_text_dir, tmp_path, monkeypatch):
    """Issue 31.5: a night killed after its manifest and a first data file (commit step 2); then (a) a vacuum
    and a night, (b) the state an older vacuum and recovery left (its staging and manifest gone, its files
    not), (c) its manifest gone, its staging kept: nothing of the dead run survives, and the row versions
    (fungi feast's glob) are readable again."""
    source, table_dir = lake(tmp_path / "in", files=3, rows=4), tmp_path / "table"
    uri = f"delta:{table_dir}"
    run_featurize(config(tiny_text_dir, source, uri))
    night(source)
    with monkeypatch.context() as patch:
        patch.setattr("pipelines.formats.base.crash_from_env", lambda: crash_at(2))
        with pytest.raises(Crash):
            run_featurize(config(tiny_text_dir, source, uri, incremental=True, prune=True))
    (table_dir / "_fungi_lease.json").unlink(missing_ok=True)
    [dead] = [p.name for p in (table_dir / "_staging").iterdir()]
    snapshot = tmp_path / "snapshot"
    shutil.copytree(table_dir, snapshot)

    def of_dead_run() -> list[str]:
        return sorted(str(p.relative_to(table_dir)) for p in table_dir.rglob(f"*{dead}*"))

    def restart(*, drop_staging: bool) -> None:
        shutil.rmtree(table_dir)
        shutil.copytree(snapshot, table_dir)
        shutil.rmtree(table_dir / "_fungi_versions" / dead)  # what an older vacuum deleted
        if drop_staging:
            shutil.rmtree(table_dir / "_staging")

    assert any(name.endswith(".parquet") and "/" not in name for name in of_dead_run())  # a data file moved in
    assert cli_main(["vacuum", uri, "--retention-hours", "0"]) == 0  # (a)
    assert of_dead_run() == []
    run_featurize(config(tiny_text_dir, source, uri, incremental=True, prune=True))
    assert delta_rows(table_dir) == NEW_IDS
    assert open_output(uri).row_version_files()

    restart(drop_staging=True)  # (b)
    with pytest.raises(ConfigError, match="fungi vacuum"):
        open_output(uri).row_version_files()
    assert cli_main(["vacuum", uri, "--retention-hours", "0"]) == 0
    assert of_dead_run() == [] and open_output(uri).row_version_files()

    restart(drop_staging=False)  # (c)
    run_featurize(config(tiny_text_dir, source, uri, incremental=True, prune=True))
    assert of_dead_run() == [] and delta_rows(table_dir) == NEW_IDS
