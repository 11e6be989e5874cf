"""FUNGI tables served through the real Feast: offline, online, vector search (no mocks).

A synthetic output written as `fungi featurize` lays it out (``fungi_outputs.py``) goes
through ``fungi feast`` and Feast's own ``feast apply`` (the CLI, once), then Feast's Python
API: materialization into the SQLite online store, online lookups, point-in-time joins and
sqlite-vec vector search, compared with the Parquet vectors. One test runs the real
``fungi featurize`` first.
"""
from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fungi_outputs import SyntheticOutput, make_spec, spec_hash
from fungi_ops.errors import ConfigError
from pipelines.cli import main as cli_main
from pipelines.feast.definitions import load_definitions
from pipelines.feast.repo import describe, materialize_repo, write_feast_repo
from pipelines.feast.vectors import fungi_vectors

pytest.importorskip("feast")
pytest.importorskip("sqlite_vec")
# Feast's file offline store (dask) on object columns; not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore:Downcasting object dtype arrays:FutureWarning")

REPO_ROOT = Path(__file__).resolve().parents[1]
NOW = datetime.now(timezone.utc).replace(microsecond=0)
NIGHT_1 = NOW - timedelta(days=2)
NIGHT_2 = NOW - timedelta(days=1)
IDS = [f"r{i:03d}" for i in range(240)]
CHANGED = IDS[5:17]  # 12 rows featurized again on night 2
NEW = [f"n{i:03d}" for i in range(15)]


def feast_cli(repo: Path, *args: str) -> str:
    """Feast's own command line, as a user runs it."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    done = subprocess.run(
        [sys.executable, "-m", "feast.cli.cli", "-c", str(repo), *args], env=env, capture_output=True, text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


def count_writes(store) -> collections.Counter:
    """Rows each feature view writes into the online store (a spy around the real method)."""
    online = store._get_provider().online_store
    counts: collections.Counter = collections.Counter()
    write = online.online_write_batch

    def spy(config, table, data, progress):
        counts[table.name] += len(data)
        return write(config, table, data, progress)

    online.online_write_batch = spy
    return counts


def matrix(values) -> np.ndarray:
    return np.asarray([np.asarray(v, dtype=np.float32) for v in values], dtype=np.float32)


def recall_at_10(store, feature: str, vectors: np.ndarray, ids: list[str], queries: np.ndarray) -> float:
    """Mean overlap of Feast's top 10 with brute-force cosine top 10 on the same vectors."""
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    position = {v: i for i, v in enumerate(ids)}
    hits = []
    for query in queries:
        truth = {ids[i] for i in np.argsort(-(unit @ (query / np.linalg.norm(query))))[:10]}
        found = store.retrieve_online_documents_v2(features=[feature], query=query.tolist(), top_k=10).to_dict()
        assert len(found["id"]) == len(set(found["id"])) == 10
        # each row carries its own vector and its own cosine distance to the query
        name = feature.split(":")[1]
        own = unit[[position[i] for i in found["id"]]]
        np.testing.assert_allclose(matrix(found[name]), vectors[[position[i] for i in found["id"]]])
        np.testing.assert_allclose(found["distance"], 1 - own @ (query / np.linalg.norm(query)), atol=1e-5)
        hits.append(len(truth & set(found["id"])) / 10)
    return float(np.mean(hits))


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """Night 1 featurized, repo written, `feast apply`, materialized; then night 2 and its increment."""
    from feast import FeatureStore

    root = tmp_path_factory.mktemp("feast")
    extra = {"topics": lambda n: pa.array([["news", f"t{k % 4}"] for k in range(n)], pa.list_(pa.string())),
             "row_number": lambda n: pa.array(np.arange(n, dtype=np.uint64))}  # no Feast type: left out
    output = SyntheticOutput(root / "texts", make_spec(), extra_columns=extra)
    output.night(NIGHT_1, IDS)
    repo = root / "repo"
    assert cli_main(["feast", str(output.root), "--repo", str(repo)]) == 0
    applied = feast_cli(repo, "apply")
    store = FeatureStore(repo_path=str(repo))
    view = f"texts_{output.hash[:8]}"
    counts = count_writes(store)
    started = time.perf_counter()
    store.materialize_incremental(end_date=NIGHT_1 + timedelta(hours=1))
    first = dict(counts), time.perf_counter() - started
    before = store.get_online_features(
        features=[f"{view}:embedding", f"{view}:content_hash"], entity_rows=[{"id": i} for i in CHANGED[:3]]
    ).to_dict()

    old_current = output.current
    output.night(NIGHT_2, NEW, CHANGED)
    update = write_feast_repo(str(output.root), repo)
    counts.clear()
    store.materialize_incremental(end_date=NOW)
    second = dict(counts)
    return SimpleNamespace(
        output=output, repo=repo, store=store, view=view, fungi=f"{view}_fungi", applied=applied, first=first,
        second=second, before=before, old_current=old_current, update=update,
    )


def test_feast_apply_registers_the_entity_and_typed_tagged_views(served):
    from feast.types import Array, Float32, String

    assert "Deploying infrastructure for " + served.view in served.applied
    store, spec = served.store, served.output.spec
    assert [e.name for e in store.list_entities()] == ["texts"]
    assert store.get_entity("texts").join_key == "id"
    view = store.get_feature_view(served.view)
    fields = {f.name: f for f in view.features}
    assert list(fields) == ["embedding", "grad_kl", "grad_simclr", "content_hash", "label", "split", "topics"]
    assert served.update.skipped_columns == ["row_number (uint64)"]
    assert fields["embedding"].dtype == Array(Float32) and fields["grad_kl"].dtype == Array(Float32)
    assert (fields["embedding"].vector_index, fields["embedding"].vector_length) == (True, 32)
    assert fields["embedding"].vector_search_metric == "COSINE" and not fields["grad_kl"].vector_index
    assert fields["label"].dtype == String
    assert view.batch_source.path == str(served.output.root.parent / f"{served.output.root.name}.history")
    assert view.batch_source.timestamp_field == "event_time"
    assert view.tags["fungi.spec_hash"] == spec_hash(spec) and view.tags["fungi.model"] == spec["model"]
    assert view.tags["fungi.objectives"] == "kl,simclr" and json.loads(view.tags["fungi.spec"]) == spec
    concat = store.get_feature_view(served.fungi).features
    assert [(f.name, f.vector_index, f.vector_length) for f in concat] == [("fungi", True, 32 + 24 + 24)]
    service = store.get_feature_service("texts")  # a stable name for the current spec's views
    assert [p.name for p in service.feature_view_projections] == [served.view, served.fungi]
    got = store.get_online_features(features=service, entity_rows=[{"id": IDS[100]}]).to_dict()
    assert set(got) == {"id", "embedding", "grad_kl", "grad_simclr", "content_hash", "label", "split", "topics", "fungi"}
    assert got["topics"] == [["news", f"t{100 % 4}"]]


def test_materialize_incremental_pushes_only_new_and_changed_rows(served):
    first, seconds = served.first
    assert first == {served.view: len(IDS), served.fungi: len(IDS)}
    assert served.second == {served.view: len(NEW) + len(CHANGED), served.fungi: len(NEW) + len(CHANGED)}
    assert (served.update.fungi_files_written, served.update.fungi_files_kept) == (1, 1)  # night 2's history file
    print(f"\nmaterialized {len(IDS)} rows x 2 views in {seconds:.2f} s")


def test_online_features_are_exactly_the_parquet_vectors(served):
    output, view = served.output, served.view
    ids = [*CHANGED[:5], *NEW[:5], *IDS[100:190]]  # 100 ids
    features = [f"{view}:embedding", f"{view}:grad_kl", f"{view}:grad_simclr", f"{view}:label", f"{served.fungi}:fungi"]
    rows = [{"id": i} for i in ids]
    got = served.store.get_online_features(features=features, entity_rows=rows).to_dict()
    assert got["id"] == ids
    for column in ("embedding", "grad_kl", "grad_simclr"):
        np.testing.assert_array_equal(matrix(got[column]), output.matrix(column, ids))  # float32, bit for bit
    position = {v: i for i, v in enumerate(output.current.column("id").to_pylist())}
    current = output.current.take([position[i] for i in ids])
    assert got["label"] == current.column("label").to_pylist()
    np.testing.assert_array_equal(matrix(got["fungi"]), fungi_vectors(current, ["embedding", "grad_kl", "grad_simclr"]))
    missing = served.store.get_online_features(features=features[:1], entity_rows=[{"id": "nope"}]).to_dict()
    assert missing["embedding"] == [None]

    timings = []
    for _ in range(5):
        started = time.perf_counter()
        served.store.get_online_features(features=features[:3], entity_rows=rows)
        timings.append(time.perf_counter() - started)
    print(f"\nonline lookup, 100 ids, 3 vector features: median {1000 * np.median(timings):.1f} ms")


def test_a_changed_row_is_served_in_its_old_version_before_the_night_and_new_after(served):
    output, view, changed = served.output, served.view, CHANGED[:3]
    old = output.matrix("embedding", changed, table=served.old_current)
    new = output.matrix("embedding", changed)
    assert not np.allclose(old, new)
    np.testing.assert_array_equal(matrix(served.before["embedding"]), old)  # online, before night 2
    np.testing.assert_array_equal(
        matrix(served.store.get_online_features(features=[f"{view}:embedding"], entity_rows=[{"id": i} for i in changed])
               .to_dict()["embedding"]),
        new,
    )
    unchanged, fresh = IDS[200], NEW[0]
    entity_df = pa.table({
        "id": [*changed, *changed, unchanged, fresh, fresh],
        "event_timestamp": pa.array(
            [NIGHT_1 + timedelta(hours=3)] * 3 + [NIGHT_2 + timedelta(hours=3)] * 3
            + [NOW, NIGHT_1 + timedelta(hours=3), NOW], pa.timestamp("us", tz="UTC"),
        ),
    }).to_pandas()
    frame = served.store.get_historical_features(
        entity_df=entity_df, features=[f"{view}:embedding", f"{view}:content_hash", f"{served.fungi}:fungi"]
    ).to_df()
    rows = {(r.id, r.event_timestamp): r for r in frame.itertuples()}
    got = [rows[(i, t)].embedding for i, t in zip(entity_df.id[:7], entity_df.event_timestamp[:7])]
    np.testing.assert_array_equal(matrix(got[:3]), old)
    np.testing.assert_array_equal(matrix(got[3:6]), new)
    np.testing.assert_array_equal(np.asarray(got[6], np.float32), output.matrix("embedding", [unchanged])[0])
    np.testing.assert_array_equal(np.asarray(rows[(fresh, NOW)].embedding, np.float32),
                                  output.matrix("embedding", [fresh])[0])
    # before its first night a new id has no features: Feast 0.67's file offline store drops
    # such an entity row (its _filter_ttl) where a SQL store returns nulls; never a future version
    early = rows.get((fresh, entity_df.event_timestamp[7]))
    assert early is None or not isinstance(early.embedding, (list, np.ndarray))
    concat = fungi_vectors(served.old_current.filter(pa.compute.is_in(served.old_current["id"], pa.array(changed[:1]))),
                           ["embedding", "grad_kl", "grad_simclr"])
    np.testing.assert_array_equal(np.asarray(rows[(changed[0], entity_df.event_timestamp[0])].fungi, np.float32), concat[0])


def test_vector_search_agrees_with_brute_force_cosine(served):
    output, store = served.output, served.store
    ids = output.current.column("id").to_pylist()
    rng = np.random.default_rng(1)
    columns = ["embedding", "grad_kl", "grad_simclr"]
    picks = rng.choice(len(ids), 20, replace=False)
    embedding = output.matrix("embedding")
    queries = embedding[picks] + 0.3 * rng.normal(size=(20, embedding.shape[1])).astype(np.float32)
    recall_embedding = recall_at_10(store, f"{served.view}:embedding", embedding, ids, queries)
    concat = fungi_vectors(output.current, columns)
    queries = concat[picks] + 0.1 * rng.normal(size=(20, concat.shape[1])).astype(np.float32)
    recall_fungi = recall_at_10(store, f"{served.fungi}:fungi", concat, ids, queries)
    assert recall_embedding >= 0.95 and recall_fungi >= 0.95
    print(f"\nrecall@10: embedding {recall_embedding:.3f}, FUNGI concatenation {recall_fungi:.3f}")

    query = concat[picks[0]]
    found = store.retrieve_online_documents_v2(
        features=[f"{served.fungi}:fungi"], query=query.tolist(), top_k=3
    ).to_dict()
    nearest = int(np.argmin(found["distance"]))  # Feast hands results back ordered by id
    assert found["id"][nearest] == ids[picks[0]]  # itself, at cosine distance 0
    assert found["distance"][nearest] == pytest.approx(0.0, abs=1e-5)
    np.testing.assert_array_equal(np.asarray(found["fungi"][nearest], np.float32), query)


def test_rerun_changes_nothing_and_a_second_spec_becomes_other_views(served, tmp_path):
    from feast import FeatureStore

    repo = served.repo
    definitions = (repo / "fungi_texts.py").read_text()
    again = write_feast_repo(str(served.output.root), repo)
    assert (again.fungi_files_written, again.fungi_files_kept) == (0, 2)
    assert (repo / "fungi_texts.py").read_text() == definitions and not again.config_written
    (repo / "my_service.py").write_text("# the user's own definitions\n")

    other = SyntheticOutput(tmp_path / "texts", make_spec(model="hf:test/other", seed=3), seed=5)
    other.night(NIGHT_1, IDS[:50])
    with pytest.raises(ConfigError, match="serves another output"):
        write_feast_repo(str(other.root), repo)
    second = write_feast_repo(str(other.root), repo, name="texts_other")
    assert second.feature_view == f"texts_other_{other.hash[:8]}" != served.view
    assert (repo / "my_service.py").read_text() == "# the user's own definitions\n"
    objects = load_definitions(repo)
    assert {o.name for o in objects} >= {served.view, served.fungi, second.feature_view, second.fungi_view}

    store = FeatureStore(repo_path=str(repo))
    store.apply(objects)
    store.materialize(NIGHT_1 - timedelta(hours=1), NIGHT_1 + timedelta(hours=1), feature_views=[second.feature_view])
    got = store.get_online_features(
        features=[f"{second.feature_view}:embedding", f"{served.view}:embedding"], entity_rows=[{"id": IDS[7]}],
        full_feature_names=True,
    ).to_dict()
    np.testing.assert_array_equal(matrix(got[f"{second.feature_view}__embedding"]), other.matrix("embedding", [IDS[7]]))
    np.testing.assert_array_equal(matrix(got[f"{served.view}__embedding"]), served.output.matrix("embedding", [IDS[7]]))

    old_hash = other.hash
    other.spec["seed"] = 4  # the same output featurized again with another spec (--overwrite)
    other.night(NIGHT_2, IDS[:50])
    replaced = write_feast_repo(str(other.root), repo, name="texts_other")
    assert replaced.removed_views == [second.feature_view, second.fungi_view]
    vectors = repo / "data" / "fungi" / "texts_other"
    assert [p.name for p in vectors.iterdir()] == [other.hash] != [old_hash]


def test_without_history_feast_reads_only_the_current_files(tmp_path, capsys):
    from feast import FeatureStore

    output = SyntheticOutput(tmp_path / "plain", make_spec(objectives=("kl",)), history=False)
    output.night(NIGHT_1, IDS[:30])
    output.night(NIGHT_2, NEW[:4], IDS[:2])
    repo = tmp_path / "repo"
    assert cli_main(["feast", str(output.root), "--repo", str(repo), "--no-fungi-view"]) == 0
    printed = capsys.readouterr().out
    assert "featurized without --history" in printed and "point-in-time joins are correct only" in printed
    store = FeatureStore(repo_path=str(repo))
    store.apply(load_definitions(repo))
    view = f"plain_{output.hash[:8]}"
    assert [v.name for v in store.list_feature_views()] == [view]
    assert store.get_feature_view(view).batch_source.path == str(output.root / "*.parquet")
    counts = count_writes(store)
    store.materialize(NIGHT_1 - timedelta(hours=1), NOW)
    assert counts == {view: 34}  # _errors/ and the replaced versions are not read
    got = store.get_online_features(features=[f"{view}:grad_kl"], entity_rows=[{"id": i} for i in IDS[:2]]).to_dict()
    np.testing.assert_array_equal(matrix(got["grad_kl"]), output.matrix("grad_kl", IDS[:2]))


def test_ids_deleted_from_the_output_leave_the_online_store_and_its_vector_search(tmp_path, capsys):
    """A night deletes ids (--prune): `fungi feast --materialize` materializes, then removes them from the online
    store and its search; `fungi feast` removes them again after a `feast materialize` window that pushed their
    last version back from the history."""
    from feast import FeatureStore

    output = SyntheticOutput(tmp_path / "texts", make_spec(objectives=("kl",)))
    output.night(NIGHT_1, IDS[:30])
    repo, deleted = tmp_path / "repo", IDS[3:6]
    assert cli_main(["feast", str(output.root), "--repo", str(repo)]) == 0
    store = FeatureStore(repo_path=str(repo))
    store.apply(load_definitions(repo))
    store.materialize_incremental(end_date=NIGHT_1 + timedelta(hours=1))
    view = f"texts_{output.hash[:8]}"
    old = output.matrix("embedding", deleted)

    def served(ids: list[str]) -> list:
        return store.get_online_features(features=[f"{view}:embedding"],
                                         entity_rows=[{"id": i} for i in ids]).to_dict()["embedding"]

    def found(query: np.ndarray) -> list[str]:
        return store.retrieve_online_documents_v2(features=[f"{view}:embedding"], query=query.tolist(),
                                                  top_k=30).to_dict()["id"]

    assert all(v is not None for v in served(deleted)) and set(deleted) <= set(found(old[0]))
    output.night(NIGHT_2, NEW[:2], IDS[10:12], deleted=deleted)
    assert cli_main(["feast", str(output.root), "--repo", str(repo), "--materialize"]) == 0
    printed = capsys.readouterr().out
    assert f"applied and materialized: {view}, {view}_fungi" in printed
    assert "deleted ids: 3 gone from the output since the last run, 3 removed from the online store" in printed
    assert served(deleted) == [None] * 3 and not set(deleted) & set(found(old[0]))
    assert served(IDS[10:12])[0] is not None and len(found(old[0])) == 29  # 30 - 3 + 2 new

    store.materialize(NIGHT_1 - timedelta(hours=1), NOW)  # a window that holds their last version
    assert all(v is not None for v in served(deleted))
    again = write_feast_repo(str(output.root), repo)
    assert (again.deleted_found, again.deleted_removed, again.deleted_pending) == (0, 3, 0)
    assert served(deleted) == [None] * 3 and not set(deleted) & set(found(old[0]))


def test_an_s3_output_is_served_with_its_endpoint(s3_endpoint, tmp_path):
    import s3fs
    from feast import FeatureStore

    output = SyntheticOutput(tmp_path / "local", make_spec(objectives=("kl",)))
    output.night(NIGHT_1, IDS[:40])
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint})
    fs.mkdir("lake")
    fs.put(str(output.root), "lake/fungi/texts", recursive=True)
    fs.put(f"{output.root}.history", "lake/fungi/texts.history", recursive=True)
    repo = tmp_path / "repo"
    update = write_feast_repo("s3://lake/fungi/texts", repo)
    assert update.source == "s3://lake/fungi/texts.history"
    assert f"s3_endpoint_override={s3_endpoint!r}" in update.definitions.read_text()
    assert "testing" not in update.definitions.read_text()  # credentials stay in the environment
    store = FeatureStore(repo_path=str(repo))
    store.apply(load_definitions(repo))
    store.materialize(NIGHT_1 - timedelta(hours=1), NOW)
    ids = IDS[10:13]
    got = store.get_online_features(features=[f"{update.feature_view}:embedding", f"{update.fungi_view}:fungi"],
                                    entity_rows=[{"id": i} for i in ids]).to_dict()
    np.testing.assert_array_equal(matrix(got["embedding"]), output.matrix("embedding", ids))
    frame = store.get_historical_features(
        entity_df=pa.table({"id": ids, "event_timestamp": pa.array([NOW] * 3, pa.timestamp("us", tz="UTC"))}).to_pandas(),
        features=[f"{update.feature_view}:grad_kl"],
    ).to_df().set_index("id").loc[ids]
    np.testing.assert_array_equal(matrix(frame["grad_kl"]), output.matrix("grad_kl", ids))


@pytest.mark.parametrize(
    "case, message",
    [
        ("no_manifest", "has no _fungi_manifest.json: not a fungi feature output"),
        ("missing", "does not exist"),
        ("reserved", "column 'distance' of"),
        ("dunder", "column '__x' of"),
        ("no_event_time", "has no 'event_time' column"),
        ("event_time_text", "'event_time' is string, not a timestamp"),
        ("bad_name", "--name 'My Texts' must be lower-case"),
        ("not_ours", "was not written by `fungi feast`"),
        ("unfinished_commit", "the commit of run r-killed is not finished"),
    ],
)
def test_bad_input_exits_2_with_one_error_line(tmp_path, capsys, case, message):
    extra = {
        "reserved": {"distance": lambda n: pa.array(np.zeros(n))},
        "dunder": {"__x": lambda n: pa.array(np.zeros(n))},
    }.get(case, {})
    output = SyntheticOutput(tmp_path / "texts", make_spec(objectives=("kl",)), extra_columns=extra)
    output.night(NIGHT_1, IDS[:5])
    args = ["feast", str(output.root), "--repo", str(tmp_path / "repo")]
    if case == "no_manifest":
        (output.root / "_fungi_manifest.json").unlink()
    elif case == "missing":
        args[1] = str(tmp_path / "nothing")
    elif case in ("no_event_time", "event_time_text"):
        for path in [*output.root.glob("*.parquet"), *output.root.parent.glob(f"{output.root.name}.history/*.parquet")]:
            table = pq.read_table(path)
            index = table.schema.get_field_index("event_time")
            table = table.remove_column(index) if case == "no_event_time" else table.set_column(
                index, "event_time", pa.array(["2024-01-01"] * table.num_rows))
            pq.write_table(table, path)
    elif case == "bad_name":
        args += ["--name", "My Texts"]
    elif case == "unfinished_commit":
        header = json.loads((output.root / "_fungi_manifest.json").read_text())
        header["pending"] = {"run_id": "r-killed", "previous_sources": None, "overwrite": False, "seed_history": False}
        (output.root / "_fungi_manifest.json").write_text(json.dumps(header))
    elif case == "not_ours":
        (tmp_path / "repo").mkdir()
        (tmp_path / "repo" / "fungi_texts.py").write_text("# mine\n")
    assert cli_main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


def test_feature_store_yaml_naming_the_old_module_path_still_loads_the_store(tmp_path):
    """Repositories written before the store moved to pipelines.feast.online_store name
    ``pipelines.feast_online.FungiSqliteOnlineStore`` in feature_store.yaml, as fungi feast still writes."""
    from feast.infra.online_stores.helpers import get_online_store_from_config
    from feast.repo_config import RepoConfig

    from pipelines.feast import STORE_TYPE
    from pipelines.feast.online_store import FungiSqliteOnlineStore

    assert STORE_TYPE == "pipelines.feast_online.FungiSqliteOnlineStore"
    config = RepoConfig(project="p", provider="local", registry=str(tmp_path / "registry.db"),
                        online_store={"type": STORE_TYPE, "path": str(tmp_path / "online.db"), "vector_enabled": True},
                        entity_key_serialization_version=3)
    assert config.online_store.vector_enabled
    assert isinstance(get_online_store_from_config(config.online_store), FungiSqliteOnlineStore)


def test_real_featurize_to_online_lookup_and_vector_search(tiny_text_dir, tmp_path):
    """`fungi featurize --history` (the real command, in its own process: a small job, no Ray), then the
    whole hand-off."""
    from feast import FeatureStore

    (tmp_path / "in").mkdir()
    texts = ["the cat sat on the mat", "stocks fell sharply", "a dog barked at night", "bonds rallied today"]
    pq.write_table(pa.table({"id": ["a", "b", "c", "d"], "text": texts, "label": ["x", "y", "x", "y"]}),
                   tmp_path / "in" / "part-0.parquet")
    out, repo = tmp_path / "out", tmp_path / "repo"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    done = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", "featurize", "--input", str(tmp_path / "in"), "--output", str(out),
         "--modality", "text", "--model", f"hf:{tiny_text_dir}", "--objectives", "kl", "--keep-columns", "label",
         "--batch-size", "4", "--history"],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    update = write_feast_repo(str(out), repo)
    assert update.source_kind == "history"
    store = FeatureStore(repo_path=str(repo))
    store.apply(load_definitions(repo))
    store.materialize_incremental(end_date=datetime.now(timezone.utc))
    table = pq.read_table(out).sort_by("id")
    assert pa.types.is_timestamp(table.schema.field("event_time").type)
    got = store.get_online_features(features=store.get_feature_service(update.name),
                                    entity_rows=[{"id": i} for i in table["id"].to_pylist()]).to_dict()
    for column in ("embedding", "grad_kl"):
        expected = table[column].combine_chunks().flatten().to_numpy().reshape(table.num_rows, -1)
        np.testing.assert_array_equal(matrix(got[column]), expected)
    concat = fungi_vectors(table, ["embedding", "grad_kl"])
    np.testing.assert_array_equal(matrix(got["fungi"]), concat)
    found = store.retrieve_online_documents_v2(features=[f"{update.fungi_view}:fungi"], query=concat[0].tolist(),
                                               top_k=2).to_dict()
    assert found["id"][int(np.argmin(found["distance"]))] == table["id"][0].as_py()


@pytest.mark.parametrize("kind", ["delta", "iceberg"])
def test_a_table_output_is_served_by_feasts_duckdb_store(kind, tiny_text_dir, tmp_path, monkeypatch):
    """`fungi featurize --output delta:...` / `iceberg:...` (the real job), a night that changes one
    row, then `fungi feast`: Feast's duckdb offline store reads every row version the table keeps, so
    a point-in-time join before the night finds the old row and one after it the new; materialization
    serves the current version; --current-version serves a Delta table's current version (FileSource
    with DeltaFormat); files the glob must not read (a killed run's, an old spec's) are refused."""
    from feast import FeatureStore

    from pipelines.formats import read_output
    from pipelines.job import FeaturizeConfig, run_featurize

    (tmp_path / "in").mkdir()
    texts = ["the cat sat on the mat", "stocks fell sharply", "a dog barked at night", "bonds rallied today"]
    pq.write_table(pa.table({"id": ["a", "b", "c", "d"], "text": texts}), tmp_path / "in" / "part-0.parquet")
    monkeypatch.setenv("FUNGI_WAREHOUSE", str(tmp_path / "warehouse"))
    uri = f"delta:{tmp_path / 'table'}" if kind == "delta" else "iceberg:feast.texts"
    folder = tmp_path / "table" if kind == "delta" else tmp_path / "warehouse" / "feast" / "texts"
    data = folder if kind == "delta" else folder / "data"
    repo = tmp_path / "repo"

    def featurize(**settings) -> None:
        run_featurize(FeaturizeConfig(input=str(tmp_path / "in"), output=uri, modality="text",
                                      model=f"hf:{tiny_text_dir}", objectives="kl", batch_size=4,
                                      **settings))

    featurize()
    before = read_output(uri).sort_by("id")
    between = datetime.now(timezone.utc)
    time.sleep(1.1)
    texts[0] = "an entirely different sentence about markets"
    pq.write_table(pa.table({"id": ["a", "b", "c", "d"], "text": texts}), tmp_path / "in" / "part-0.parquet")
    featurize(incremental=True)
    table = read_output(uri).sort_by("id")
    assert not np.allclose(matrix(before["embedding"].to_pylist())[0], matrix(table["embedding"].to_pylist())[0])

    plain = SyntheticOutput(tmp_path / "plain", make_spec(objectives=("kl",)))
    plain.night(NIGHT_1, IDS[:3])
    write_feast_repo(str(plain.root), tmp_path / "repo_folder")  # a repository first made for a Parquet folder
    with pytest.raises(ConfigError, match="duckdb offline store, and this repository's is file, .*another --repo"):
        write_feast_repo(uri, tmp_path / "repo_folder")
    assert "Parquet folders; `duckdb`: also the data files of Delta and Iceberg tables" in (
        tmp_path / "repo_folder" / "feature_store.yaml").read_text()

    update = write_feast_repo(uri, repo)
    assert update.source == str(data / "*.parquet") and update.source_kind == "history"
    config = (repo / "feature_store.yaml").read_text()
    assert "type: duckdb" in config and "Parquet files read by\n# the file offline store" not in config
    assert any(f"is {'a Delta' if kind == 'delta' else 'an Iceberg'} table: Feast reads every row version" in note
               for note in update.notes), update.notes
    store = FeatureStore(repo_path=str(repo))
    store.apply(load_definitions(repo))
    when = datetime.now(timezone.utc) + timedelta(minutes=1)

    def joined(at: datetime, view: str, feature: str) -> np.ndarray:
        frame = store.get_historical_features(
            entity_df=__import__("pandas").DataFrame({"id": ["a", "c"], "event_timestamp": [at, at]}),
            features=[f"{view}:{feature}"],
        ).to_df().set_index("id").loc[["a", "c"]]
        return matrix(frame[feature])

    def pick(version: pa.Table) -> pa.Table:  # rows a and c, in that order (versions are sorted by id)
        return version.filter(pa.compute.is_in(version["id"], value_set=pa.array(["a", "c"])))

    def rows(version: pa.Table, column: str) -> np.ndarray:
        return matrix(pick(version)[column].to_pylist())

    np.testing.assert_allclose(joined(between, update.feature_view, "embedding"), rows(before, "embedding"), atol=1e-6)
    np.testing.assert_allclose(joined(when, update.feature_view, "embedding"), rows(table, "embedding"), atol=1e-6)
    np.testing.assert_allclose(joined(between, update.fungi_view, "fungi"),
                               fungi_vectors(pick(before), ["embedding", "grad_kl"]), atol=1e-6)
    store.materialize_incremental(end_date=when)
    got = store.get_online_features(features=store.get_feature_service(update.name),
                                    entity_rows=[{"id": i} for i in table["id"].to_pylist()]).to_dict()
    np.testing.assert_allclose(matrix(got["embedding"]), matrix(table["embedding"].to_pylist()), atol=1e-6)
    concat = fungi_vectors(table, ["embedding", "grad_kl"])
    np.testing.assert_array_equal(matrix(got["fungi"]), concat)

    # a night deletes "d" (--prune): `fungi feast --materialize` removes it from the online store and its search
    def search(view: str, feature: str, query: np.ndarray) -> list[str]:
        return store.retrieve_online_documents_v2(features=[f"{view}:{feature}"], query=query.tolist(),
                                                  top_k=4).to_dict()["id"]

    assert search(update.fungi_view, "fungi", concat[3]) == ["a", "b", "c", "d"]
    pq.write_table(pa.table({"id": ["a", "b", "c"], "text": texts[:3]}), tmp_path / "in" / "part-0.parquet")
    featurize(incremental=True, prune=True)
    assert sorted(read_output(uri)["id"].to_pylist()) == ["a", "b", "c"]
    pruned = materialize_repo(write_feast_repo(uri, repo), end=datetime.now(timezone.utc) + timedelta(minutes=2))
    assert (pruned.deleted_found, pruned.deleted_removed, pruned.deleted_pending) == (1, 1, 0)
    assert "deleted ids: 1 gone from the output since the last run, 1 removed from the online store" in list(
        describe(pruned))
    got = store.get_online_features(features=store.get_feature_service(update.name),
                                    entity_rows=[{"id": i} for i in "abcd"]).to_dict()
    assert got["embedding"][3] is None and got["fungi"][3] is None and all(v is not None for v in got["fungi"][:3])
    assert search(update.fungi_view, "fungi", concat[3]) == ["a", "b", "c"]
    assert search(update.feature_view, "embedding", matrix(table["embedding"].to_pylist())[3]) == ["a", "b", "c"]
    assert write_feast_repo(uri, repo).deleted_found == 0  # nothing changed since: nothing read again

    if kind == "delta":
        current = write_feast_repo(uri, tmp_path / "repo_current", current_version=True)
        assert current.source == str(folder) and current.source_kind == "current"
        store = FeatureStore(repo_path=str(tmp_path / "repo_current"))
        store.apply(load_definitions(tmp_path / "repo_current"))
        np.testing.assert_allclose(joined(when, current.feature_view, "embedding"), rows(table, "embedding"), atol=1e-6)
        assert cli_main(["feast", uri, "--repo", str(tmp_path / "repo_cli"), "--current-version"]) == 0
        assert f"path={str(folder)!r}" in (tmp_path / "repo_cli" / "fungi_table.py").read_text()
    else:
        with pytest.raises(ConfigError, match="IcebergSource"):
            write_feast_repo(uri, tmp_path / "repo_current", current_version=True)
        catalog = json.dumps({"type": "sql", "uri": f"sqlite:///{tmp_path / 'warehouse'}/catalog.db",
                              "warehouse": f"file://{tmp_path / 'warehouse'}"})
        assert cli_main(["feast", uri, "--repo", str(tmp_path / "repo_cli"), "--catalog", catalog]) == 0
        assert (tmp_path / "repo_cli" / "fungi_texts.py").exists()
        assert cli_main(["feast", uri, "--repo", str(tmp_path / "repo_cli"), "--current-version"]) == 2

    # a file no kept commit added (a killed run's) would be read by the glob: refused, with the way out
    stray = data / "part-0-0000-rdeadbeef0000.parquet"
    stray.write_bytes((tmp_path / "in" / "part-0.parquet").read_bytes())
    with pytest.raises(ConfigError, match="no kept commit of fungi added it.*--current-version"):
        write_feast_repo(uri, repo)
    stray.unlink()
    # after an --overwrite to another spec, the old spec's files stay for time travel until vacuum
    featurize(overwrite=True, seed=7)
    with pytest.raises(ConfigError, match="holds rows of spec .*fungi vacuum"):
        write_feast_repo(uri, repo)
    if kind == "delta":
        assert write_feast_repo(uri, repo, current_version=True).source_kind == "current"
    assert cli_main(["vacuum", uri, "--retention-hours", "0"]) == 0
    assert write_feast_repo(uri, repo).source_kind == "history"  # the old spec's files are gone

