"""`fungi serve` end to end: real Ray Serve on the session's local Ray, real HTTP, real faiss.

One Serve instance for the module, with four applications (a text, an image and an audio
output written by the job with tiny random models, and a text output in an Iceberg table), so
that Serve and the replicas start once.
"""
from __future__ import annotations

import base64
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import requests

from conftest import png_bytes, wav_bytes
from lakes import config, features, sql_catalog, write_part
from pipelines.cli import main as cli_main
from pipelines.job import run_featurize

pytestmark = pytest.mark.usefixtures("local_ray")

TOKEN = "s3cret-token"
TEXT_OBJECTIVES = "kl,simclr:num_negatives=4;text_views=3"
BATCH = 4  # the job's batch size: a request of the same rows in the same order is the job's batch
ICEBERG = "iceberg:serve.texts"
TOPICS = {"cats": "the cat purrs and sleeps on the warm mat", "food": "pizza pasta and cheese for dinner tonight",
          "money": "the bank raised interest rates on loans"}


def train_texts() -> tuple[list[str], list[str]]:
    texts, labels = [], []
    for index in range(12):
        label = list(TOPICS)[index % 3]
        texts.append(f"{TOPICS[label]} {'again ' * (index % 4)}number {index}")
        labels.append(label)
    return texts, labels


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}"

    def post(self, app: str, path: str, body, token: str | None = TOKEN, **kwargs) -> requests.Response:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        data = body if isinstance(body, (bytes, str)) else json.dumps(body)
        return requests.post(f"{self.base}{app}{path}", data=data, headers=headers, timeout=60, **kwargs)

    def get(self, app: str, path: str, token: str | None = TOKEN) -> requests.Response:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return requests.get(f"{self.base}{app}{path}", headers=headers, timeout=60)


@pytest.fixture(scope="module")
def outputs(tmp_path_factory, tiny_text_dir, tiny_vit_dir, tiny_ast_dir) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("serve")
    texts, labels = train_texts()
    write_part(root / "text_in", "part-0.parquet", [f"t{i:02d}" for i in range(12)], texts, label=labels)
    run_featurize(config(tiny_text_dir, root / "text_in", root / "text", objectives=TEXT_OBJECTIVES, batch_size=BATCH,
                         keep_columns=("label",)))
    images = [png_bytes(48 + 8 * i, 64, seed=i) for i in range(4)]
    pq.write_table(pa.table({"id": [f"i{i}" for i in range(4)], "image": images}), root / "images.parquet")
    run_featurize(config(tiny_vit_dir, root / "images.parquet", root / "image", modality="image", objectives="kl,dino",
                         batch_size=BATCH))
    sounds = [wav_bytes(0.5 + 0.25 * i, freq=300 + 100 * i) for i in range(4)]
    pq.write_table(pa.table({"id": [f"a{i}" for i in range(4)], "audio": sounds}), root / "sounds.parquet")
    run_featurize(config(tiny_ast_dir, root / "sounds.parquet", root / "audio", modality="audio", objectives="kl",
                         batch_size=BATCH))
    from pipelines.formats import open_output

    catalog, _ = sql_catalog(root / "warehouse")  # explicit: the replicas do not share this process's environment
    for part, rows in (("part-0.parquet", range(3)), ("part-1.parquet", range(3, 4))):  # a first run, then a night
        write_part(root / "lake_in", part, [f"k{i}" for i in rows], [texts[i] for i in rows], label=[labels[i] for i in rows])
        run_featurize(config(tiny_text_dir, root / "lake_in", ICEBERG, catalog=catalog, objectives=TEXT_OBJECTIVES,
                             batch_size=BATCH, keep_columns=("label",), incremental=part != "part-0.parquet"))
        if part == "part-0.parquet":
            first_snapshot = open_output(ICEBERG, catalog=catalog).latest_version()
    return {"text": root / "text", "image": root / "image", "audio": root / "audio", "root": root,
            "catalog": catalog, "iceberg_first": first_snapshot}


@pytest.fixture(scope="module")
def server(outputs) -> Server:
    from ray import serve
    from ray.serve.api import RunTarget

    from pipelines.serve.api import Limits
    from pipelines.serve.app import ServeSettings, build_app, token_digest

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    common = dict(token_sha256=token_digest(TOKEN), batch_size=BATCH, threads=1, max_batch_size=8, batch_wait_s=0.02,
                  limits=Limits(max_items=16, max_body_bytes=600_000))
    apps = {
        "text": ServeSettings(output=str(outputs["text"]), label_column="label", poll_s=0.5,
                              features=("fungi", "embedding"), **common),
        "image": ServeSettings(output=str(outputs["image"]), poll_s=0, **common),
        "audio": ServeSettings(output=str(outputs["audio"]), poll_s=0, **common),
        "iceberg": ServeSettings(output=ICEBERG, catalog=outputs["catalog"], version=outputs["iceberg_first"],
                                 label_column="label", **common),
    }
    serve.run_many([RunTarget(target=build_app(settings, cpus_per_replica=0.1), name=name, route_prefix=f"/{name}")
                    for name, settings in apps.items()])  # the replicas start side by side
    server = Server(port)
    deadline = time.time() + 120
    for name in apps:
        while True:
            try:
                if server.get(f"/{name}", "/healthz", token=None).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert time.time() < deadline, f"the {name} app did not start"
            time.sleep(0.5)
    yield server
    serve.shutdown()


def stored(output: Path) -> pa.Table:
    return features(output)


def vectors(item: dict, name: str) -> np.ndarray:
    return np.asarray(item[name], dtype=np.float32)


def test_featurize_returns_the_stored_vectors_of_every_modality(server, outputs):
    """The rows' payloads POSTed in the job's batches give their stored vectors, bit-identical (CPU, fp32)."""
    texts, _ = train_texts()
    payloads = {
        "text": texts,
        "image": [base64.b64encode(png_bytes(48 + 8 * i, 64, seed=i)).decode() for i in range(4)],
        "audio": [base64.b64encode(wav_bytes(0.5 + 0.25 * i, freq=300 + 100 * i)).decode() for i in range(4)],
    }
    for modality, values in payloads.items():
        table = stored(outputs[modality])
        columns = [c for c in ("embedding", "grad_kl", "grad_dino", "grad_simclr") if c in table.column_names]
        spec = server.get(f"/{modality}", "/spec").json()
        for start in range(0, len(values), BATCH):
            items = [{"id": f"q{i}", modality: values[i]} for i in range(start, min(start + BATCH, len(values)))]
            answer = server.post(f"/{modality}", "/featurize", {"items": items}).json()
            assert "error" not in answer, answer
            assert answer["spec_hash"] == spec["spec_hash"] and answer["version"] == spec["version"]
            for item, row in zip(answer["items"], range(start, start + BATCH)):
                for column in columns:
                    np.testing.assert_array_equal(vectors(item, column), np.asarray(table[column][row].as_py(), np.float32),
                                                  err_msg=f"{modality} row {row} {column}")
                blocks = [vectors(item, c) / np.linalg.norm(vectors(item, c)) for c in columns]
                fungi = np.concatenate(blocks) / np.linalg.norm(np.concatenate(blocks))
                np.testing.assert_allclose(vectors(item, "fungi"), fungi, atol=1e-6)
        assert set(spec["features"]) == set(columns) and spec["rows"] == len(values)


def test_spec_health_and_failed_items(server, outputs):
    assert server.get("/text", "/healthz", token=None).json()["ok"] is True
    spec = server.get("/text", "/spec").json()
    manifest = json.loads((outputs["text"] / "_fungi_manifest.json").read_text())
    assert spec["spec_hash"] == manifest["spec_hash"] and spec["run_id"] == manifest["runs"][-1]["run_id"]
    assert spec["features"] == {"embedding": 32, "grad_kl": 32, "grad_simclr": 32}
    assert spec["indexes"]["fungi"].startswith("exact inner product over 12 rows x 96")
    answer = server.post("/text", "/featurize", {"items": [{"id": "empty", "text": ""}, {"id": "ok", "text": "fine"}]}).json()
    assert answer["items"][0] == {"id": "empty", "error": "text is empty", "stage": "decode"}
    assert len(answer["items"][1]["grad_kl"]) == 32
    image = server.post("/image", "/featurize", {"items": [
        {"id": "bad", "image": base64.b64encode(b"not an image").decode()},
        {"id": "good", "image": base64.b64encode(png_bytes(40, 40)).decode()}]}).json()
    assert image["items"][0]["id"] == "bad" and image["items"][0]["stage"] == "decode"
    assert "embedding" in image["items"][1]


def test_neighbours_and_classify_match_fungi_eval(server, outputs, tiny_text_dir):
    """/neighbours finds a row's own copy first; /classify on a held-out split gives fungi eval's k-NN labels."""
    from fungi_ops.eval import load_feature_table
    from fungi_ops.eval.combinations import prepare_features
    from fungi_ops.eval.knn import knn_classify

    texts, labels = train_texts()
    answer = server.post("/text", "/neighbours", {"items": [{"id": "q", "text": texts[5]}], "k": 3}).json()
    first = answer["items"][0]["neighbours"][0]
    assert (first["id"], first["label"]) == ("t05", labels[5]) and first["score"] == pytest.approx(1.0, abs=1e-5)
    assert answer["features"] == "fungi" and len(answer["items"][0]["neighbours"]) == 3
    by_embedding = server.post("/text", "/neighbours", {"items": [{"text": texts[5]}], "k": 2, "features": "embedding"}).json()
    assert by_embedding["features"] == "embedding" and by_embedding["items"][0]["neighbours"][0]["id"] == "t05"

    root = outputs["root"]
    held_out = [f"{TOPICS[t]} held out {i}" for i, t in enumerate(["cats", "food", "money", "food", "cats", "money"])]
    truth = ["cats", "food", "money", "food", "cats", "money"]
    write_part(root / "test_in", "part-0.parquet", [f"h{i}" for i in range(6)], held_out, label=truth)
    run_featurize(config(tiny_text_dir, root / "test_in", root / "test_out", objectives=TEXT_OBJECTIVES,
                         batch_size=BATCH, keep_columns=("label",), setup_from=str(root / "text_in")))
    train = load_feature_table(outputs["text"])
    test = load_feature_table(root / "test_out")
    assert test.spec_hash == train.spec_hash
    prepared = prepare_features(train, test, ("embedding", "grad_kl", "grad_simclr"))
    classes = np.unique(train.labels)
    expected = classes[knn_classify(prepared.train, np.searchsorted(classes, train.labels), prepared.test, len(classes),
                                    k=5, device="cpu")]
    order = {row_id: i for i, row_id in enumerate(test.ids)}
    answer = server.post("/text", "/classify", {"items": [{"id": f"h{i}", "text": t} for i, t in enumerate(held_out)],
                                                "k": 5}).json()
    got = {item["id"]: item["label"] for item in answer["items"]}
    assert [got[f"h{i}"] for i in range(6)] == [expected[order[f"h{i}"]] for i in range(6)]
    scores = answer["items"][0]["scores"]
    assert scores[0]["label"] == answer["items"][0]["label"] and sum(s["score"] for s in scores) == pytest.approx(1.0)


@pytest.mark.parametrize(("body", "status", "message"), [
    (b"{not json", 400, "body: not valid JSON"),
    ({"texts": []}, 422, "texts: unknown field"),
    ({}, 422, "items: missing"),
    ({"items": [{"id": "x", "image": "aGk="}]}, 422, "items[0].image: unknown key; this output's modality is text"),
    ({"items": [{"id": "x"}]}, 422, "items[0].text: missing"),
    ({"items": [{"id": "x", "text": 3}]}, 422, "items[0].text: expected a string"),
    ({"items": [{"text": "x"}] * 17}, 413, "items: 17 items, over --max-items (16)"),
    ({"items": [{"text": "x" * 700_000}]}, 413, "body: "),
    ({"items": [{"text": "x"}], "k": 0}, 422, "k: expected an integer from 1 to 1000"),
    ({"items": [{"text": "x"}], "features": "grad_kl"}, 422, "features: 'grad_kl' is not indexed"),
])
def test_bad_requests_get_a_4xx_naming_the_field(server, body, status, message):
    response = server.post("/text", "/neighbours", body)
    assert response.status_code == status, response.text
    assert response.json()["error"].startswith(message), response.json()
    assert server.post("/text", "/featurize", {"items": [{"text": "still serving"}]}).status_code == 200


def test_a_request_without_the_token_gets_401(server):
    for token in (None, "wrong"):
        response = server.post("/text", "/featurize", {"items": [{"text": "hello"}]}, token=token)
        assert response.status_code == 401 and response.json()["error"].startswith("authorization:")
        assert server.get("/text", "/spec", token=token).status_code == 401
    assert server.get("/text", "/healthz", token=None).status_code == 200


def test_64_concurrent_requests_are_batched_and_all_correct(server, outputs):
    texts, _ = train_texts()
    table = stored(outputs["text"])
    expected = {row: np.asarray(table["grad_simclr"][row].as_py(), np.float32) for row in range(12)}

    def ask(index: int) -> tuple[int, dict]:
        row = index % 12
        return row, server.post("/text", "/featurize", {"items": [{"id": f"c{index}", "text": texts[row]}]}).json()

    with ThreadPoolExecutor(64) as pool:
        answers = list(pool.map(ask, range(64)))
    for index, (row, answer) in enumerate(answers):
        item = answer["items"][0]
        assert item["id"] == f"c{index}"
        # batched with other requests' rows, padded to another length: float32 rounding moves the last
        # bits (1.01e-5 seen); a wrong vector (another row's, views seeded otherwise) differs far more
        np.testing.assert_allclose(vectors(item, "grad_simclr"), expected[row], atol=1e-4, rtol=0)


def test_a_night_committed_while_serving_is_picked_up_and_each_response_names_one_version(server, outputs, tiny_text_dir):
    before = server.get("/text", "/spec").json()
    new_text = "a brand new line about submarines and the deep sea"
    answers: list[dict] = []
    stop = threading.Event()

    def hammer() -> None:
        while not stop.is_set():
            answers.append(server.post("/text", "/neighbours", {"items": [{"text": new_text}], "k": 13}).json())

    worker = threading.Thread(target=hammer)
    worker.start()
    try:
        write_part(outputs["root"] / "text_in", "part-1.parquet", ["n0"], [new_text], label=["sea"])
        run_featurize(config(tiny_text_dir, outputs["root"] / "text_in", outputs["text"], objectives=TEXT_OBJECTIVES,
                             batch_size=BATCH, keep_columns=("label",), incremental=True))
        deadline = time.time() + 60
        while server.get("/text", "/spec").json()["version"] == before["version"]:
            assert time.time() < deadline, "the new version was not picked up"
            time.sleep(0.2)
        time.sleep(0.5)
    finally:
        stop.set()
        worker.join()
    after = server.get("/text", "/spec").json()
    assert after["rows"] == 13 and after["run_id"] != before["run_id"]
    versions = {answer["version"] for answer in answers}
    assert versions == {before["version"], after["version"]}, versions
    for answer in answers:  # the rows one version holds, never a mix
        found = {n["id"] for n in answer["items"][0]["neighbours"]}
        assert ("n0" in found) == (answer["version"] == after["version"]) and len(found) == (12 if "n0" not in found else 13)
    assert answers[-1]["items"][0]["neighbours"][0]["id"] == "n0"


def test_cli_refuses_bad_settings_before_starting(outputs, tmp_path, capsys):
    text = str(outputs["text"])
    cases = [
        (["--host", "0.0.0.0"], "error: --host 0.0.0.0 serves beyond this machine: give --token-file"),
        (["--replicas", "3,1"], "error: --replicas must be N (>= 1) or MIN,MAX"),
        (["--label-column", "topic"], "error: --label-column topic: "),
        (["--features", "embedding+grad_dino"], "error: --features 'embedding+grad_dino': the output has no column 'grad_dino'"),
        (["--token-file", str(tmp_path / "missing")], "error: --token-file "),
        (["--version", "3"], "error: --version: "),
    ]
    for flags, message in cases:
        assert cli_main(["serve", text, *flags]) == 2
        assert capsys.readouterr().err.strip().startswith(message), flags

    from ray.serve import Application

    from pipelines.commands.serve import app_from_args
    from pipelines.serve.app import token_digest

    token = tmp_path / "token"
    token.write_text(TOKEN + "\n")
    app = app_from_args({"argv": [text, "--token-file", str(token), "--replicas", "1,3", "--max-batch-size", "16"]})
    assert isinstance(app, Application)  # what cluster/rayservice.yaml's import_path gives Serve
    deployment = app._bound_deployment
    settings = deployment.init_args[0]
    assert settings.token_sha256 == token_digest(TOKEN) and settings.label_column == "label"
    assert deployment._deployment_config.max_ongoing_requests > settings.max_batch_size == 16  # Ray issue 43288
    assert (deployment._deployment_config.autoscaling_config.min_replicas,
            deployment._deployment_config.autoscaling_config.max_replicas) == (1, 3)


def test_above_exact_rows_the_index_is_ivf_with_its_recall_measured():
    from pipelines.serve.index import VectorIndex

    rng = np.random.default_rng(0)
    centres = rng.standard_normal((20, 48)).astype(np.float32)
    rows = centres[rng.integers(0, 20, 3000)] + 0.3 * rng.standard_normal((3000, 48)).astype(np.float32)
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    exact = VectorIndex(rows, exact_rows=3000)
    ivf = VectorIndex(rows, exact_rows=2999)
    assert exact.kind == "exact" and exact.recall_at_10 is None
    assert ivf.kind == "ivf54" and 0.9 <= ivf.recall_at_10 <= 1.0
    assert f"recall@10 {ivf.recall_at_10:.3f} vs exact" in ivf.describe()
    scores, found = ivf.search(rows[:5], 3)
    assert found[:, 0].tolist() == [0, 1, 2, 3, 4] and np.allclose(scores[:, 0], 1.0, atol=1e-5)


def test_an_iceberg_output_is_served_over_http_at_a_pinned_snapshot(server, outputs):
    """`fungi serve iceberg:... --catalog ... --version SNAPSHOT` with a night committed since: /spec names
    the pinned snapshot, /featurize gives its rows' stored vectors, /neighbours and /classify its rows only."""
    from pipelines.formats import read_output

    texts, labels = train_texts()
    first = outputs["iceberg_first"]
    spec = server.get("/iceberg", "/spec").json()
    assert (spec["version"], spec["rows"], spec["following"]) == (str(first), 3, False)
    table = read_output(ICEBERG, catalog=outputs["catalog"], version=first).sort_by("id")
    answer = server.post("/iceberg", "/featurize", {"items": [{"id": f"q{i}", "text": texts[i]} for i in range(3)]}).json()
    assert answer["version"] == str(first) and answer["spec_hash"] == spec["spec_hash"]
    for row, item in enumerate(answer["items"]):  # the job's batch: bit-identical
        for column in ("embedding", "grad_kl", "grad_simclr"):
            np.testing.assert_array_equal(vectors(item, column), np.asarray(table[column][row].as_py(), np.float32))
    found = server.post("/iceberg", "/neighbours", {"items": [{"text": texts[3]}], "k": 10}).json()
    assert found["version"] == str(first)
    assert sorted(n["id"] for n in found["items"][0]["neighbours"]) == ["k0", "k1", "k2"]  # not the night's k3
    voted = server.post("/iceberg", "/classify", {"items": [{"text": texts[1]}], "k": 1}).json()
    assert voted["items"][0]["label"] == labels[1]


def test_a_delta_output_is_read_at_one_table_version_and_can_be_pinned(tiny_text_dir, tmp_path):
    """The version a replica serves and polls is the Delta version; --version pins an older one."""
    from pipelines.formats import open_output
    from pipelines.serve.index import commit_point, load_version

    source, address = tmp_path / "in", f"delta:{tmp_path / 'table'}"
    write_part(source, "part-0.parquet", ["a", "b", "c"], ["one line", "two lines", "three lines"], label=["x", "y", "x"])
    run_featurize(config(tiny_text_dir, source, address, keep_columns=("label",)))
    output = open_output(address)
    first = load_version(output, version=None, label_column="label", features=("fungi",), exact_rows=10,
                         make_featurizer=None)
    assert first.point == commit_point(output) and len(first.ids) == 3 and first.classes.tolist() == ["x", "y"]
    write_part(source, "part-1.parquet", ["d"], ["four lines"], label=["y"])
    run_featurize(config(tiny_text_dir, source, address, keep_columns=("label",), incremental=True))
    assert commit_point(output) != first.point
    latest = load_version(output, version=None, label_column="label", features=("fungi",), exact_rows=10,
                          make_featurizer=None)
    pinned = load_version(output, version=int(first.version), label_column="label", features=("fungi",),
                          exact_rows=10, make_featurizer=None)
    assert int(latest.version) > int(first.version) and len(latest.ids) == 4
    assert (pinned.version, sorted(pinned.ids.tolist())) == (first.version, ["a", "b", "c"])
