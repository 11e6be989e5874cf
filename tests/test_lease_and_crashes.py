"""One writer per output (the lease) and crash-safe writes: a second run, a dead run's lease,
a block write killed halfway, a crash after every file operation of the commit, a real kill of
the driver.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from lakes import Crash, config, crash_at, features, ids_of, lake, write_part
from fungi_ops.eval import load_feature_table
from pipelines.commands.evaluate import read_table_files
from pipelines.formats import open_output, read_output
from pipelines.formats.address import load_catalog
from pipelines.formats.folder import ParquetFolder, read_committed, recover
from pipelines.job import FeaturizeJob, run_featurize
from pipelines.layout import LEASE_NAME
from pipelines.lease import LeaseHeld, OutputLease
from pipelines.manifest import read_manifest
from pipelines.job.stage import write_batch
from pipelines.layout import CONTENT_HASH_COLUMN, ERROR_COLUMN, ID_COLUMN, SOURCE_COLUMN, STAGE_COLUMN, STAGED_SUFFIX
from pipelines.storage import Location

REPO = Path(__file__).resolve().parents[1]


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


def test_a_dead_runs_lease_is_taken_over_by_the_next_run(tiny_text_dir, tmp_path):
    source, output = lake(tmp_path / "in", files=1, rows=2), tmp_path / "out"
    hold_lease(output, pid=2**22 + 17)  # this host, a pid that is not running
    summary = run_featurize(config(tiny_text_dir, source, output))
    assert summary.rows_written == 2
    assert not (output / LEASE_NAME).exists()  # released


@pytest.mark.parametrize("how", ["timeout", "break"])
def test_a_lease_on_another_host_is_taken_over_after_its_timeout_or_when_broken(tmp_path, how):
    holder = hold_lease(tmp_path / "out", host="another-host", renewed=time.time() - 30)
    settings = {"timeout": {"timeout_s": 10}, "break": {"timeout_s": 600, "break_lease": True}}[how]
    lease = OutputLease(Location(str(tmp_path / "out")), "rmine", **settings)
    lease.acquire()
    assert json.loads((tmp_path / "out" / LEASE_NAME).read_text())["run_id"] == "rmine" != holder["run_id"]
    lease.release()
    assert not (tmp_path / "out" / LEASE_NAME).exists()


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
    deadline = time.time() + 30  # a loaded machine may delay the renewing thread, never stop it
    while json.loads((tmp_path / "out" / LEASE_NAME).read_text())["renewed"] == first and time.time() < deadline:
        time.sleep(0.05)
    assert json.loads((tmp_path / "out" / LEASE_NAME).read_text())["renewed"] > first
    lease.check()
    thief = OutputLease(output, "rthief", timeout_s=0.4, break_lease=True)
    thief.acquire()
    with pytest.raises(LeaseLost, match="rthief"):
        lease.check()
    lease.release()
    assert json.loads((tmp_path / "out" / LEASE_NAME).read_text())["run_id"] == "rthief"
    thief.release()


def test_a_live_lease_is_judged_by_its_holders_timeout_not_the_takers(tmp_path):
    """Issue 31.7: a run started with --lease-timeout 1 does not take over a lease renewed 30 s ago by a
    run on another host whose own timeout is 600 s; a lease past its holder's own timeout is taken over."""
    output = Location(str(tmp_path / "out"))
    hold_lease(tmp_path / "out", run_id="vacuum-1234", host="another-host", renewed=time.time() - 30, timeout_s=600)
    with pytest.raises(LeaseHeld, match="vacuum-1234.*its run's --lease-timeout, 600 s"):
        OutputLease(output, "rhasty", timeout_s=1).acquire()
    hold_lease(tmp_path / "out", run_id="rshort", host="another-host", renewed=time.time() - 30, timeout_s=10)
    lease = OutputLease(output, "rpatient", timeout_s=600)
    lease.acquire()
    assert lease.took_over.run_id == "rshort"
    assert json.loads((tmp_path / "out" / LEASE_NAME).read_text())["timeout_s"] == 600  # judged by it in turn
    lease.release()


def delta_output(tiny_text_dir: str, tmp_path: Path) -> str:
    """A Delta output with one committed version (a small in-process run)."""
    uri = f"delta:{tmp_path / 'table'}"
    run_featurize(config(tiny_text_dir, lake(tmp_path / "in", files=2, rows=2), uri))
    return uri


def test_a_vacuum_whose_lease_is_taken_over_stops_before_its_commit(tiny_text_dir, tmp_path, monkeypatch, capsys):
    """Issue 31.7: the vacuum re-checks its lease right before the table's commit; a lost lease is one
    error line (exit 1), and the table is left as it was."""
    from pipelines.cli import main
    from pipelines.formats.delta import DeltaOutput

    uri = delta_output(tiny_text_dir, tmp_path)
    table = Path(uri.removeprefix("delta:"))
    before = sorted(p.relative_to(table) for p in table.rglob("*") if p.name != LEASE_NAME)
    real_existing = DeltaOutput._existing

    def taken_over_meanwhile(self, version):  # another run breaks the lease while the vacuum reads the table
        OutputLease(self.root, "rthief", timeout_s=600, break_lease=True).acquire()
        return real_existing(self, version)

    monkeypatch.setattr(DeltaOutput, "_existing", taken_over_meanwhile)
    code = main(["vacuum", uri, "--retention-hours", "0"])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "Traceback" not in err, err
    assert "error: this run's lease on" in err and "rthief" in err and "nothing was vacuumed" in err
    assert sorted(p.relative_to(table) for p in table.rglob("*") if p.name != LEASE_NAME) == before


def test_a_stopped_holder_of_the_lease_lock_refuses_the_next_run_after_a_bounded_wait(tiny_text_dir, tmp_path,
                                                                                       monkeypatch, capsys):
    """Issue 31.8: a process stopped (SIGSTOP) while it holds the lease's flock does not hang the next run
    for ever: it is refused after LOCK_WAIT_S with a message, and --break-lease (vacuum's too) goes on."""
    import signal

    from pipelines import lease as lease_module
    from pipelines.cli import main

    uri = delta_output(tiny_text_dir, tmp_path)
    table = Path(uri.removeprefix("delta:"))
    lock = table / (LEASE_NAME + ".lock")
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, signal, sys; handle = os.open(sys.argv[1], os.O_CREAT | os.O_RDWR); "
        "fcntl.flock(handle, fcntl.LOCK_EX); print('locked', flush=True); os.kill(os.getpid(), signal.SIGSTOP)"
    ), str(lock)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        monkeypatch.setattr(lease_module, "LOCK_WAIT_S", 1.0)
        started = time.monotonic()
        code = main(["vacuum", uri, "--retention-hours", "0"])
        err = capsys.readouterr().err
        assert code == 2 and time.monotonic() - started < 30
        assert f"error: the lock {lock} of the lease of" in err and "has been held for 1 s" in err
        assert "--break-lease" in err and err.count("\n") == 1
        assert main(["vacuum", uri, "--retention-hours", "0", "--break-lease"]) == 0
        assert not lock.exists() and not (table / LEASE_NAME).exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()


def test_vacuum_names_a_flag_it_has_when_its_output_is_leased(tiny_text_dir, tmp_path, capsys):
    """Issue 31.8: vacuum's refusal tells the user to pass --break-lease, which vacuum now takes."""
    from pipelines.cli import main

    uri = delta_output(tiny_text_dir, tmp_path)
    table = Path(uri.removeprefix("delta:"))
    hold_lease(table, host="another-host")
    assert main(["vacuum", uri]) == 2
    assert "--break-lease" in capsys.readouterr().err
    assert main(["vacuum", uri, "--break-lease"]) == 0
    assert not (table / LEASE_NAME).exists()


@pytest.mark.parametrize("kind", ["folder", "delta"])
def test_a_run_leaves_no_staging_folder_or_lock_file_and_a_refused_run_writes_nothing(kind, tiny_text_dir, tmp_path,
                                                                                    capsys):
    """Issue 34.13: after a successful run no empty ``_staging/`` and no ``_fungi_lease.json.lock``; a run
    refused by the lease, or by another spec, changes no file of the output."""
    from pipelines.cli import main

    source = lake(tmp_path / "in", files=2, rows=2)
    root = tmp_path / "out"
    uri = str(root) if kind == "folder" else f"delta:{root}"
    run_featurize(config(tiny_text_dir, source, uri))
    run_featurize(config(tiny_text_dir, source, uri, incremental=True))

    def listing() -> dict[str, float]:
        return {str(p.relative_to(root)): p.stat().st_mtime for p in root.rglob("*")}

    after = listing()
    assert not any(name.startswith("_staging") or name.endswith(".lock") for name in after), sorted(after)
    args = ["featurize", "--input", str(source), "--output", uri, "--modality", "text",
            "--model", f"hf:{tiny_text_dir}"]
    assert main([*args, "--seed", "3"]) == 2 and "spec" in capsys.readouterr().err  # another spec: refused
    assert listing() == after
    hold_lease(root, host="another-host")
    after = listing()
    assert main(args) == 2 and "is being written by" in capsys.readouterr().err
    assert listing() == after


# -- crash safety ----------------------------------------------------------------------------------------


def test_a_block_write_killed_halfway_leaves_no_truncated_file(tmp_path, monkeypatch):
    """A task killed while it writes its block (a lost node): no half-written Parquet file under a
    block's name, where ``--history`` would keep it and a reader of the staging area would fail."""
    block = pa.table({SOURCE_COLUMN: ["part-0.parquet"] * 3, ID_COLUMN: ["a", "b", "c"], CONTENT_HASH_COLUMN: ["h"] * 3,
                      ERROR_COLUMN: [None, None, "text is empty"], STAGE_COLUMN: [None, None, "decode"],
                      "embedding": [[1.0, 0.0], [0.0, 1.0], None]})
    real_write = pq.write_table

    def killed_halfway(table, where, **kwargs):
        real_write(table, where, **kwargs)
        Path(where).write_bytes(Path(where).read_bytes()[:20])
        raise Crash(f"killed while writing {where}")

    staging = tmp_path / "staging"
    monkeypatch.setattr(pq, "write_table", killed_halfway)
    with pytest.raises(Crash):
        write_batch(block, staging=Location(str(staging)), spec_json="{}", spec_hash="h")
    assert not [p for p in staging.rglob("*") if p.is_file()]
    monkeypatch.setattr(pq, "write_table", real_write)  # the retry of the task
    stats = write_batch(block, staging=Location(str(staging)), spec_json="{}", spec_hash="h").to_pylist()[0]
    assert pq.read_table(stats["file"]).column(ID_COLUMN).to_pylist() == ["a", "b"]
    assert pq.read_table(stats["error_file"]).column(ID_COLUMN).to_pylist() == ["c"]
    assert sorted(p.name for p in staging.rglob("*") if p.is_file()) == [Path(stats["file"]).name] * 2


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
    original = ParquetFolder.commit
    ParquetFolder.commit = capture
    try:
        job.run()
    finally:
        ParquetFolder.commit = original
    (output / LEASE_NAME).unlink(missing_ok=True)
    return source, output, old, captured


def test_a_crash_at_any_step_of_the_commit_leaves_the_old_or_the_new_state(tiny_text_dir, tmp_path):
    source, output, old, captured = night_ready_to_commit(tiny_text_dir, tmp_path)
    snapshot = tmp_path / "snapshot"
    shutil.copytree(output, snapshot)
    dry = ParquetFolder(Location(str(output)))
    dry.commit(captured["manifest"], captured["previous"], captured["run_id"], overwrite=False)
    new = features(output)
    assert ids_of(new) == sorted([f"f0-{r:03d}" for r in range(4)] + [f"f1-{r:03d}" for r in range(4)] + ["n-0"])
    steps = len(dry.operations)
    assert steps >= 8, dry.operations
    # a read that a whole commit overlaps (it read the old files, then the commit ran) is done again
    race = tmp_path / "race"
    shutil.copytree(snapshot, race)
    reads = []

    def read_then_commit(paths):
        reads.append(pq.read_table(paths[0]) if paths else None)
        if len(reads) == 1:
            manifest = captured["manifest"]
            manifest.pending = None
            ParquetFolder(Location(str(race))).commit(manifest, read_manifest(Location(str(race))), captured["run_id"], overwrite=False)
        return pa.concat_tables(pq.read_table(p) for p in paths).sort_by("id")

    assert read_committed(Location(str(race)), read_then_commit).equals(new) and len(reads) == 2
    for step in range(1, steps + 1):
        shutil.rmtree(output)
        shutil.copytree(snapshot, output)
        manifest = captured["manifest"]
        manifest.pending = None

        crash = crash_at(step)

        with pytest.raises(Crash):
            ParquetFolder(Location(str(output)), fault=crash).commit(
                manifest, read_manifest(Location(str(output))), captured["run_id"], overwrite=False
            )
        bare = ids_of(features(output))  # what pq.read_table(OUT) shows before anything recovers
        assert len(bare) == len(set(bare)), f"an id twice after a crash at step {step}: {dry.operations[step - 1]}"
        assert set(bare) <= set(ids_of(old)) | set(ids_of(new))
        state = read_manifest(Location(str(output)))
        committed = state.version == captured["previous"].version + 1
        # through the manifest, before anything recovers: exactly the old or exactly the new rows
        assert read_output(str(output)).sort_by("id").equals(new if committed else old), dry.operations[step - 1]
        evaluated = read_table_files(str(output), lambda source, files, fs: load_feature_table(
            source, label_column=None, files=files, filesystem=fs))
        assert sorted(evaluated.ids) == ids_of(new if committed else old)
        if committed and not (tmp_path / "moving").exists():  # the commit point: a reader races apply's moves
            moving = tmp_path / "moving"
            shutil.copytree(output, moving)

            def read_while_moved(paths):
                staged = [p for p in paths if "/_staging/" in p]
                if staged and not reads:
                    reads.append("moved")
                    for path in staged:  # what apply does meanwhile, the header still pending
                        shutil.move(path, moving / Path(path).name.removesuffix(STAGED_SUFFIX))
                return pa.concat_tables(pq.read_table(p) for p in paths).sort_by("id")

            reads.clear()
            assert read_committed(Location(str(moving)), read_while_moved).equals(new) and reads == ["moved"]
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
               "--modality", "text", "--model", f"hf:{tiny_text_dir}", "--incremental"]  # a small job: no Ray
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



@pytest.mark.parametrize("kind", ["delta", "iceberg"])
def test_kill_9_of_the_driver_before_a_table_commit_then_a_reader_and_a_rerun(kind, tiny_text_dir, tmp_path,
                                                                              monkeypatch):
    """A table's night killed (os._exit(137), as SIGKILL) after its manifest and a first data file are in
    place but before the format's commit: the table's own reader sees the previous version whole, and a
    plain rerun commits the night once (every id once, the dead run's file gone)."""
    from test_formats_delta import NEW_IDS, night

    source = lake(tmp_path / "in", files=3, rows=4)
    uri = f"delta:{tmp_path / 'table'}" if kind == "delta" else "iceberg:lake.features"
    monkeypatch.setenv("FUNGI_WAREHOUSE", str(tmp_path / "warehouse"))  # the embedded catalog, for every process
    run_featurize(config(tiny_text_dir, source, uri))
    night(source)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "pipelines.cli", "featurize", "--input", str(source), "--output", uri,
               "--modality", "text", "--model", f"hf:{tiny_text_dir}", "--max-error-fraction", "0.5",
               "--incremental", "--prune", "--batch-size", "4"]  # a small job: the CLI runs it in its process, no Ray
    killed = subprocess.run(command, env={**env, "FUNGI_COMMIT_CRASH_AFTER": "2"}, cwd=str(REPO),
                            capture_output=True, text=True, timeout=600)
    assert killed.returncode == 137, killed.stdout + killed.stderr
    table = open_output(uri)
    root = Path(table.root.path)

    def on_disk() -> set[str]:
        return {str(p) for p in root.rglob("*.parquet") if not any(x.startswith("_") for x in p.relative_to(root).parts)}

    assert on_disk() - table.read_files(set)  # the dead run had moved a data file in
    before = read_output(uri)
    assert before.num_rows == 12 and len(set(ids_of(before))) == 12  # the first version, whole
    rerun = subprocess.run(command, env=env, cwd=str(REPO), capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    after = read_output(uri)
    assert sorted(ids_of(after)) == NEW_IDS
    first_version = 0 if kind == "delta" else load_catalog(None).load_table("lake.features").snapshots()[0].snapshot_id
    listed = table.read_files(set) | table.read_files(set, version=first_version)
    assert on_disk() == listed  # the dead run's moved-in file is gone; both versions' files stay until vacuum


# -- the lease on S3 (moto's server: conditional PUTs with If-None-Match and If-Match) -------------------


def s3_output(endpoint: str) -> Location:
    """An output in a new bucket (moto's buckets outlive its servers: they live in the process)."""
    import uuid

    import s3fs

    bucket = f"lake-{uuid.uuid4().hex[:12]}"
    s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint}).mkdir(bucket)
    return Location(f"s3://{bucket}/features", {"endpoint_url": endpoint})


def test_on_s3_one_of_many_racing_runs_gets_the_lease(s3_endpoint):
    from concurrent.futures import ThreadPoolExecutor

    output = s3_output(s3_endpoint)
    leases = [OutputLease(output, f"r{i}", timeout_s=600) for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        created = list(pool.map(lambda lease: lease.backend.create(lease._body()), leases))
    assert created.count(True) == 1  # the conditional create is atomic on the store


def test_on_s3_a_held_lease_is_refused_renewed_and_broken(s3_endpoint):
    from pipelines.lease import LeaseLost

    output = s3_output(s3_endpoint)
    first = OutputLease(output, "rfirst", timeout_s=600)
    first.acquire()
    with pytest.raises(LeaseHeld, match="rfirst"):
        OutputLease(output, "rsecond", timeout_s=600).acquire()
    first.check()  # still ours
    thief = OutputLease(output, "rthief", timeout_s=600, break_lease=True)
    thief.acquire()
    with pytest.raises(LeaseLost, match="rthief"):
        first.check()
    first.release()  # not ours any more: left alone
    assert thief._read()[0].run_id == "rthief"
    thief.release()
    assert thief._read()[0] is None
