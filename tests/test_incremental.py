"""Nightly runs at data-lake scale: lineage per input file, ids, --prune, the lease, crash-safe commits.

A 1-layer random BERT keeps featurizing cheap, so these tests measure the bookkeeping.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from fungi_ops import ConfigError
from pipelines.commit import Committer, recover
from pipelines.job import FeaturizeConfig, FeaturizeJob, run_featurize
from pipelines.lease import LEASE_NAME, LeaseHeld, OutputLease
from pipelines.manifest import read_manifest
from pipelines.storage import Location

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


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
    settings = dict(
        input=str(input_path), output=str(output_path), modality="text", model=f"hf:{model_dir}",
        objectives="kl", batch_size=4, actors=(1, 1), max_error_fraction=0.5,
    )
    settings.update(overrides)
    return FeaturizeConfig(**settings)


def features(output: Path) -> pa.Table:
    return pq.read_table(output).sort_by("id")


def ids_of(table: pa.Table) -> list[str]:
    return table.column("id").to_pylist()


def last_run(output: Path) -> dict:
    return json.loads((output / "_fungi_manifest.json").read_text())["runs"][-1]


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
    assert summary.rows_written == 8
    assert ids_of(features(output)) == sorted(table.column("id").to_pylist())  # once each
    assert last_run(output)["rows_moved"] == 8


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


# -- the lease -----------------------------------------------------------------------------------------


def hold_lease(output: Path, **fields) -> dict:
    holder = {"run_id": "rother", "host": socket.gethostname(), "pid": os.getppid(),
              "process_started": __import__("psutil").Process(os.getppid()).create_time(),
              "started": "2026-12-01T00:00:00+00:00", "renewed": time.time()}
    holder.update(fields)
    output.mkdir(parents=True, exist_ok=True)
    (output / LEASE_NAME).write_text(json.dumps(holder))
    return holder


def test_a_second_run_is_refused_and_loses_nothing(tiny_text_dir, tmp_path, capsys):
    from pipelines.cli import main

    source, output = lake(tmp_path / "in"), tmp_path / "out"
    run_featurize(config(tiny_text_dir, source, output))
    before = features(output)
    staged = output / "_staging" / "rother" / "blocks" / "x.parquet"
    staged.parent.mkdir(parents=True)
    staged.write_bytes(b"the other run's staged file")
    hold_lease(output)
    write_part(source, "part-3.parquet", ["new"], ["a new row"])
    code = main(["featurize", "--input", str(source), "--output", str(output), "--modality", "text",
                 "--model", f"hf:{tiny_text_dir}", "--incremental"])
    err = capsys.readouterr().err
    assert code == 2 and "run rother" in err and f"pid {os.getppid()}" in err and "--break-lease" in err
    assert staged.read_bytes() == b"the other run's staged file"
    assert features(output).equals(before)


@pytest.mark.parametrize("how", ["dead pid", "timeout", "break"])
def test_a_dead_runs_lease_is_taken_over(tiny_text_dir, tmp_path, how):
    source, output = lake(tmp_path / "in", files=1, rows=2), tmp_path / "out"
    fields = {
        "dead pid": {"pid": 2**22 + 17},
        "timeout": {"host": "another-host", "renewed": time.time() - 30},
        "break": {"host": "another-host"},
    }[how]
    hold_lease(output, **fields)
    overrides = {"dead pid": {}, "timeout": {"lease_timeout": 10}, "break": {"break_lease": True}}[how]
    summary = run_featurize(config(tiny_text_dir, source, output, **overrides))
    assert summary.rows_written == 2
    assert not (output / LEASE_NAME).exists()  # released


def test_a_live_lease_on_another_host_is_respected_until_it_times_out(tmp_path):
    output = Location(str(tmp_path / "out"))
    hold_lease(tmp_path / "out", host="another-host")
    with pytest.raises(LeaseHeld, match="another-host"):
        OutputLease(output, "rmine", timeout_s=600).acquire()


def test_the_lease_is_renewed_and_a_stolen_lease_stops_the_commit(tmp_path):
    from pipelines.lease import LeaseLost

    output = Location(str(tmp_path / "out"))
    lease = OutputLease(output, "rmine", timeout_s=0.4)
    lease.acquire()
    first = json.loads((tmp_path / "out" / LEASE_NAME).read_text())["renewed"]
    time.sleep(0.35)
    assert json.loads((tmp_path / "out" / LEASE_NAME).read_text())["renewed"] > first
    lease.check()
    thief = OutputLease(output, "rthief", timeout_s=0.4, break_lease=True)
    thief.acquire()
    with pytest.raises(LeaseLost, match="rthief"):
        lease.check()
    lease.release()
    assert json.loads((tmp_path / "out" / LEASE_NAME).read_text())["run_id"] == "rthief"
    thief.release()


# -- crash safety ----------------------------------------------------------------------------------------


class Crash(BaseException):
    """A simulated kill: not an Exception, so nothing on the way up cleans up."""


def night_ready_to_commit(tiny_text_dir: str, tmp_path: Path):
    """An output after one run, and a second (incremental, changing and pruning) run stopped right before its commit."""
    source, output = lake(tmp_path / "in", files=3, rows=4), tmp_path / "out"
    run_featurize(config(tiny_text_dir, source, output))
    old = features(output)
    (source / "part-2.parquet").unlink()
    write_part(source, "part-0.parquet", [f"f0-{r:03d}" for r in range(4)], ["new text"] + [f"text {i} of file 0" for i in range(1, 4)])
    write_part(source, "part-5.parquet", ["n-0"], ["brand new"])
    captured = {}

    def capture(self, manifest, previous, run_id, *, overwrite):
        captured.update(manifest=manifest, previous=previous, run_id=run_id)

    job = FeaturizeJob(config(tiny_text_dir, source, output, incremental=True, prune=True))
    original = Committer.commit
    Committer.commit = capture
    try:
        job.run()
    finally:
        Committer.commit = original
    (output / LEASE_NAME).unlink(missing_ok=True)
    return source, output, old, captured


def test_a_crash_at_any_step_of_the_commit_leaves_the_old_or_the_new_state(tiny_text_dir, tmp_path):
    source, output, old, captured = night_ready_to_commit(tiny_text_dir, tmp_path)
    snapshot = tmp_path / "snapshot"
    shutil.copytree(output, snapshot)
    dry = Committer(Location(str(output)))
    dry.commit(captured["manifest"], captured["previous"], captured["run_id"], overwrite=False)
    new = features(output)
    assert ids_of(new) == sorted([f"f0-{r:03d}" for r in range(4)] + [f"f1-{r:03d}" for r in range(4)] + ["n-0"])
    steps = len(dry.operations)
    assert steps >= 8, dry.operations
    for step in range(1, steps + 1):
        shutil.rmtree(output)
        shutil.copytree(snapshot, output)
        manifest = read_manifest(Location(str(output)))  # the state before this attempt
        manifest = captured["manifest"]
        manifest.pending = None

        def crash(count, what, step=step):
            if count == step:
                raise Crash(what)

        with pytest.raises(Crash):
            Committer(Location(str(output)), fault=crash).commit(
                manifest, read_manifest(Location(str(output))), captured["run_id"], overwrite=False
            )
        state = read_manifest(Location(str(output)))
        committed = state.version == captured["previous"].version + 1
        # through the manifest: exactly the old or exactly the new rows
        names = [n for n in state.data_files()]
        if committed:
            recovered = recover(Location(str(output)), "rnext")  # what the next run does first
            assert recovered.pending is None
            assert features(output).equals(new), f"crash after step {step}: {dry.operations[step - 1]}"
        else:
            assert step <= 2
            assert all((output / name).exists() for name in names)
            recover(Location(str(output)), "rnext")
            assert features(output).equals(old), f"crash after step {step}: {dry.operations[step - 1]}"
        assert not (output / "_staging").exists() or not any((output / "_staging").iterdir())
    # and the next run after the last crash succeeds and changes nothing
    summary = run_featurize(config(tiny_text_dir, source, output, incremental=True, prune=True))
    assert summary.rows_written == 0
    assert features(output).equals(new)


def test_kill_9_of_the_driver_in_the_commit_then_a_rerun(tiny_text_dir, tmp_path):
    """The real thing: a driver process killed (os._exit(137), as SIGKILL) right after its commit
    point, then a plain rerun: every id exactly once, nothing lost."""
    source, output = lake(tmp_path / "in", files=3, rows=4), tmp_path / "out"
    run_featurize(config(tiny_text_dir, source, output))
    write_part(source, "part-1.parquet", [f"f1-{r:03d}" for r in range(4)], ["changed"] + [f"text {i} of file 1" for i in range(1, 4)])
    write_part(source, "part-7.parquet", ["n-0", "n-1"], ["one", "two"])
    command = [sys.executable, "-m", "pipelines.cli", "featurize", "--input", str(source), "--output", str(output),
               "--modality", "text", "--model", f"hf:{tiny_text_dir}", "--actors", "1", "--incremental"]
    env = {**os.environ, "FUNGI_COMMIT_CRASH_AFTER": "3", "PYTHONPATH": str(REPO)}
    killed = subprocess.run(command, env=env, cwd=str(REPO), capture_output=True, text=True, timeout=600)
    assert killed.returncode == 137, killed.stdout + killed.stderr
    assert json.loads((output / "_fungi_manifest.json").read_text())["pending"]  # died mid-apply
    env.pop("FUNGI_COMMIT_CRASH_AFTER")
    rerun = subprocess.run(command, env=env, cwd=str(REPO), capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    table = features(output)
    expected = sorted([f"f{i}-{r:03d}" for i in range(3) for r in range(4)] + ["n-0", "n-1"])
    assert ids_of(table) == expected
    assert table.filter(pc.equal(table["id"], "f1-000"))["content_hash"][0].as_py() is not None
