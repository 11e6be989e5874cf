"""End-to-end tests of the Ray Data featurization job on a shared local Ray (2 CPUs)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import png_bytes, wav_bytes
from fungi_ops import ConfigError, Featurizer, FeaturizerSpec
from pipelines.cli import main as cli_main
from pipelines.job import FeaturizeConfig, run_featurize
from pipelines.job.summary import _throughput
from pipelines.storage import Location

TEXTS = [
    "the cat sat on the mat",
    "dogs bark loudly at night",
    "quantum physics is a branch of science",
    "I love pizza with extra cheese",
    "the stock market fell sharply today",
    "how do I reset my password",
    "",
    "a quiet walk along the river at dawn",
    "neural networks learn from examples",
    "please pass the salt",
]


pytestmark = pytest.mark.usefixtures("local_ray")  # conftest: one local Ray for the session


def write_parquet(path: Path, **columns) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path)
    return path


@pytest.fixture()
def text_input(tmp_path: Path) -> Path:
    root = tmp_path / "text_in"
    ids = list(range(len(TEXTS)))
    write_parquet(root / "part-0.parquet", id=ids[:5], text=TEXTS[:5], label=[i % 3 for i in ids[:5]])
    write_parquet(root / "part-1.parquet", id=ids[5:], text=TEXTS[5:], label=[i % 3 for i in ids[5:]])
    return root


def text_config(model_dir: str, input_path: Path, output_path: Path, **overrides) -> FeaturizeConfig:
    """The text job of these tests (a tiny random BERT: the job's mechanics are the question here;
    the real MiniLM's features are checked by test_engine.py and test_parity.py)."""
    settings = dict(
        input=str(input_path),
        output=str(output_path),
        modality="text",
        model=f"hf:{model_dir}",
        objectives="kl,simclr:num_negatives=6",
        keep_columns=("label",),
        batch_size=3,
        max_error_fraction=0.2,
    )
    settings.update(overrides)
    return FeaturizeConfig(**settings)


def read_output(path: Path) -> pa.Table:
    return pq.read_table(path).sort_by("id")


def in_process_features(output: Path, payloads: list, ids: list[str]) -> dict[str, np.ndarray]:
    """Features of the same rows computed without Ray, with the run's own spec and negatives."""
    manifest = json.loads((output / "_fungi_manifest.json").read_text())
    featurizer = Featurizer(FeaturizerSpec.from_dict(manifest["spec"]), device="cpu")
    if manifest["setup_artifact"]:
        featurizer.load_setup(output / manifest["setup_artifact"])
    batch = featurizer.featurize_payloads(payloads, ids)
    assert not batch.errors
    return batch.features


def test_text_job_writes_features_errors_manifest_and_matches_in_process(tiny_text_dir, text_input, tmp_path):
    output = tmp_path / "text_out"
    summary = run_featurize(text_config(tiny_text_dir, text_input, output, history=True, actors=(2, 2)))  # on Ray
    assert (summary.rows_in, summary.rows_written, summary.rows_failed) == (10, 9, 1)

    table = read_output(output)
    assert table.num_rows == 9
    assert len(set(table.column("id").to_pylist())) == 9
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), 32)
    assert table.schema.field("grad_kl").type == pa.list_(pa.float32(), 32)
    assert table.column("label").to_pylist() == [int(i) % 3 for i in table.column("id").to_pylist()]
    metadata = pq.read_schema(next(output.glob("part-*.parquet"))).metadata
    spec = FeaturizerSpec.from_json(metadata[b"fungi.spec"])
    assert spec.hash == metadata[b"fungi.spec_hash"].decode() == summary.spec_hash

    errors = pq.read_table(output / "_errors").to_pylist()
    assert errors == [
        {"id": "6", "content_hash": errors[0]["content_hash"], "stage": "decode", "error": "text is empty"}
    ]
    manifest = json.loads((output / "_fungi_manifest.json").read_text())
    assert manifest["rows"] == 9 and manifest["errors"] == 1 and manifest["spec_hash"] == spec.hash
    assert manifest["runs"][0]["rows_written"] == 9
    assert 0 < manifest["runs"][0]["first_write_s"] == summary.first_write_s <= summary.wall_s

    ids = table.column("id").to_pylist()
    expected = in_process_features(output, [TEXTS[int(i)] for i in ids], ids)
    for name in ("embedding", "grad_kl", "grad_simclr"):
        got = np.asarray(table.column(name).to_pylist(), dtype=np.float32)
        np.testing.assert_allclose(got, expected[name], atol=1e-5)
    assert_readers_see_feature_rows_only(output, ids, table.column_names)


def assert_readers_see_feature_rows_only(output: Path, ids: list[str], columns: list[str]) -> None:
    """Every reader of the folder that installs here gets the feature rows, none of fungi's own files.

    Dask (Feast's file offline store) descends into ``_``-folders and takes ``*.parquet``;
    Polars and DuckDB read the documented glob; the history folder beside the output is
    read whole by Feast.
    """
    import dask.dataframe as dd
    import duckdb
    import polars as pl

    frames = {
        "dask": dd.read_parquet(str(output)).compute(),
        "polars": pl.read_parquet(f"{output}/*.parquet").to_pandas(),
        "duckdb": duckdb.sql(f"SELECT * FROM read_parquet('{output}/*.parquet')").df(),
        "dask history": dd.read_parquet(f"{output}.history").compute(),
    }
    for reader, frame in frames.items():
        assert sorted(frame.columns) == sorted(columns), reader
        assert sorted(frame["id"]) == sorted(ids), reader


def test_throughput_tells_start_up_from_the_steady_rate():
    """Rows of the first staged block count for start-up; the rate is over the blocks after it."""
    blocks = [
        {"written_at": 120.0, "rows": 18, "errors": 2},
        {"written_at": 110.0, "rows": 10, "errors": 0},
        {"written_at": 130.0, "rows": 20, "errors": 0},
    ]
    assert _throughput(blocks, started=100.0) == (10.0, 2.0)  # (20 + 20) rows / 20 s
    assert _throughput(blocks[1:2], started=100.0) == (10.0, None)  # one block: no rate
    assert _throughput([], started=100.0) == (None, None)


def test_incremental_rerun_skips_known_rows_and_replaces_changed_ones(tiny_text_dir, text_input, tmp_path):
    output = tmp_path / "inc_out"
    config = text_config(tiny_text_dir, text_input, output, objectives="kl")
    run_featurize(config)
    before = read_output(output)

    again = run_featurize(text_config(tiny_text_dir, text_input, output, objectives="kl", incremental=True))
    # the row that failed (empty text) failed before with the same content: not retried
    assert again.rows_written == 0 and again.rows_skipped == 10 and again.rows_failed == 0
    assert read_output(output).equals(before)

    write_parquet(text_input / "part-2.parquet", id=[10, 11], text=["brand new row", "another one"], label=[1, 2])
    write_parquet(text_input / "part-0.parquet", id=[0, 1, 2, 3, 4], text=["changed text"] + TEXTS[1:5], label=[0, 1, 2, 0, 1])
    third = run_featurize(text_config(tiny_text_dir, text_input, output, objectives="kl", incremental=True))
    assert third.rows_written == 3  # two new, one changed
    after = read_output(output)
    ids = after.column("id").to_pylist()
    assert sorted(ids, key=int) == [str(i) for i in range(12) if i != 6]
    changed = after.filter(pa.compute.equal(after.column("id"), "0"))
    old = before.filter(pa.compute.equal(before.column("id"), "0"))
    assert changed.column("content_hash")[0] != old.column("content_hash")[0]
    manifest = json.loads((output / "_fungi_manifest.json").read_text())
    assert [run["rows_written"] for run in manifest["runs"]] == [9, 0, 3]
    assert manifest["runs"][-1]["rows_replaced"] == 1


def test_spec_differences_name_the_flags_and_the_parameters_that_differ():
    from pipelines.job.spec_resolution import spec_differences

    old = {"model": "hf:m", "seed": 0, "weights": None, "weights_sha256": None, "projection_dim": 384,
           "objectives": [{"name": "kl", "params": {"temperature": 15}}, {"name": "simclr", "params": {"num_negatives": 8}}]}
    new = {**old, "weights": "w.safetensors", "weights_sha256": "ab" * 32, "projection_dim": 32,
           "objectives": [{"name": "kl", "params": {"temperature": 15}}, {"name": "simclr", "params": {"num_negatives": 4}}]}
    assert spec_differences(old, new) == [
        "objectives kl,simclr:num_negatives=8 → kl,simclr:num_negatives=4", "projection-dim 384 → 32",
        "weights none → w.safetensors", f"weights' content (sha256) none → {'ab' * 6}…"]
    assert spec_differences(old, dict(old)) == []


def test_changed_spec_is_refused_unless_overwrite(tiny_text_dir, text_input, tmp_path):
    output = tmp_path / "spec_out"
    run_featurize(text_config(tiny_text_dir, text_input, output, objectives="kl"))
    with pytest.raises(ConfigError, match="holds features of spec") as refused:
        run_featurize(text_config(tiny_text_dir, text_input, output, objectives="kl,simclr", seed=7, incremental=True))
    # the settings that differ, as the flags name them, and the ways forward
    assert ": objectives kl → kl,simclr, seed 0 → 7. Run with the output's settings, or --overwrite" in str(refused.value)
    assert str(refused.value).endswith("or write to another --output")
    replaced = run_featurize(text_config(tiny_text_dir, text_input, output, objectives="kl", seed=7, overwrite=True))
    assert replaced.rows_written == 9
    assert len(list(output.glob("part-*.parquet"))) >= 1
    assert read_output(output).num_rows == 9


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--data-column", "body"], "data column 'body' not found"),
        (["--keep-columns", "nope"], "column 'nope' not found"),
        (["--target-layer", "encoder.layer.99.attention.output.dense"], "not found"),
        (["--target-layer", "encoder.layer.0.attention"], "not an nn.Linear"),
    ],
)
def test_bad_settings_fail_fast_with_a_clear_message(tiny_text_dir, text_input, tmp_path, capsys, extra, message):
    code = cli_main(
        ["featurize", "--input", str(text_input), "--output", str(tmp_path / "o"), "--modality", "text",
         "--model", f"hf:{tiny_text_dir}", *extra]
    )
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o" / "_fungi_manifest.json").exists()


def test_the_python_api_takes_the_actor_pool_as_the_cli_does(tmp_path):
    """A notebook writes ``actors=2`` as the CLI's ``--actors 2``; a bad pool names --actors (it used to
    fail in the model's resolution child with "'int' object is not iterable")."""
    from pipelines.config import FeaturizeConfig

    def pool(**settings):
        return FeaturizeConfig(input="in", output="out", modality="text", model="hf:m", **settings)

    assert pool(actors=2).actors == (2, 2) and pool(actors="1,3").actors == (1, 3) and pool(actors=[2, 4]).actors == (2, 4)
    for bad in (0, (3, 1), "two", True, (1, 2, 3)):
        with pytest.raises(ConfigError, match="--actors: use N or MIN,MAX"):
            pool(actors=bad)
    with pytest.raises(ConfigError, match="--gpus-per-actor must be >= 0"):
        pool(gpus_per_actor=-1).validate()


def test_unknown_model_and_missing_input_fail_fast(text_input, tmp_path, capsys):
    assert cli_main(["featurize", "--input", str(text_input), "--output", str(tmp_path / "o"),
                     "--modality", "image", "--data-column", "text", "--model", "timm:not_a_model"]) == 2
    assert "unknown timm model 'not_a_model'" in capsys.readouterr().err
    assert cli_main(["featurize", "--input", str(tmp_path / "missing"), "--output", str(tmp_path / "o"),
                     "--modality", "image", "--model", "timm:test_vit", "--weights", "random"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_error_fraction_above_threshold_exits_non_zero_but_keeps_results(tiny_text_dir, text_input, tmp_path, capsys):
    output = tmp_path / "strict"
    code = cli_main(["featurize", "--input", str(text_input), "--output", str(output), "--modality", "text",
                     "--model", f"hf:{tiny_text_dir}", "--max-error-fraction", "0.05"])
    captured = capsys.readouterr()
    assert code == 1
    assert "rows in 10" in captured.out and "failed 1" in captured.out
    assert "_errors" in captured.err
    assert read_output(output).num_rows == 9


def test_image_job_all_objectives_matches_in_process(tmp_path):
    payloads = [png_bytes(48, 64, seed=1), png_bytes(70, 40, seed=2), b"not an image", png_bytes(50, 50, seed=3)]
    write_parquet(tmp_path / "img_in" / "a.parquet", id=["a", "b", "c", "d"], image=payloads)
    output = tmp_path / "img_out"
    summary = run_featurize(FeaturizeConfig(
        input=str(tmp_path / "img_in"), output=str(output), modality="image", model="timm:test_vit",
        weights="random", objectives="kl,dino:local_crops_number=2,simclr:num_negatives=2",
        batch_size=2, actors=(1, 1), max_error_fraction=0.5,
    ))
    assert (summary.rows_written, summary.rows_failed) == (3, 1)
    table = read_output(output)
    assert table.column_names[:2] == ["id", "content_hash"]
    errors = pq.read_table(output / "_errors").to_pylist()
    assert errors[0]["id"] == "c" and errors[0]["stage"] == "decode" and "cannot decode image" in errors[0]["error"]
    ids = table.column("id").to_pylist()
    expected = in_process_features(output, [payloads["abcd".index(i)] for i in ids], ids)
    for name in ("embedding", "grad_kl", "grad_dino", "grad_simclr"):
        np.testing.assert_allclose(np.asarray(table.column(name).to_pylist(), np.float32), expected[name], atol=1e-5)


def test_audio_job_reports_short_and_nan_clips(tiny_ast_dir, tmp_path):
    payloads = [wav_bytes(1.0, 16000, 440), wav_bytes(0.05), wav_bytes(0.8, 22050, 300), wav_bytes(0.7, nan=True)]
    write_parquet(tmp_path / "aud_in" / "a.parquet", id=[1, 2, 3, 4], audio=payloads)
    output = tmp_path / "aud_out"
    summary = run_featurize(FeaturizeConfig(
        input=str(tmp_path / "aud_in"), output=str(output), modality="audio", model=f"hf:{tiny_ast_dir}",
        objectives="kl,simclr:num_negatives=2", batch_size=4, max_error_fraction=0.6,
    ))  # a small job: in this process (the text and image jobs above run on Ray)
    assert (summary.rows_written, summary.rows_failed) == (2, 2)
    errors = {row["id"]: row["error"] for row in pq.read_table(output / "_errors").to_pylist()}
    assert "needs at least" in errors["2"] and "NaN" in errors["4"]
    table = read_output(output)
    expected = in_process_features(output, [payloads[0], payloads[2]], ["1", "3"])
    np.testing.assert_allclose(np.asarray(table.column("grad_simclr").to_pylist(), np.float32), expected["grad_simclr"], atol=1e-5)


def test_s3_bucket_in_bucket_out(tiny_text_dir, s3_endpoint):
    import ray
    import s3fs

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint})
    fs.mkdir("lake-in")
    fs.mkdir("lake-out")
    with fs.open("lake-in/texts/part-0.parquet", "wb") as handle:
        pq.write_table(pa.table({"id": [1, 2, 3], "text": TEXTS[:3], "label": [0, 1, 2]}), handle)
    # Ray workers were started before the endpoint existed: pass it explicitly.
    options = {"endpoint_url": s3_endpoint, "key": "testing", "secret": "testing"}
    summary = run_featurize(FeaturizeConfig(
        input="s3://lake-in/texts", output="s3://lake-out/features", modality="text", model=f"hf:{tiny_text_dir}",
        objectives="kl", keep_columns=("label",), batch_size=2, actors=(1, 1), storage_options=options,
    ))
    assert (summary.rows_in, summary.rows_written) == (3, 3)
    assert ray.is_initialized()
    assert fs.exists("lake-out/features/_fungi_manifest.json")
    parts = [p for p in fs.ls("lake-out/features") if p.endswith(".parquet")]
    table = pa.concat_tables([pq.read_table(fs.open(p, "rb")) for p in parts]).sort_by("id")
    assert table.column("id").to_pylist() == ["1", "2", "3"]
    assert json.loads(fs.cat("lake-out/features/_fungi_manifest.json"))["rows"] == 3
    assert not any(p.rstrip("/").endswith("_staging") and fs.ls(p) for p in fs.ls("lake-out/features"))


def test_features_do_not_depend_on_where_the_job_runs_its_actor_count_or_batch_size(tiny_text_dir, text_input, tmp_path):
    """The same job in the driver's process (a small job, no Ray), on one actor and on two actors with
    another batch size: the same rows, errors and features (SimCLR's negatives included)."""
    outputs = {name: tmp_path / name for name in ("in-process", "one actor", "two actors")}
    settings = {"in-process": dict(batch_size=5), "one actor": dict(actors=(1, 1), batch_size=5),
                "two actors": dict(actors=(2, 2), batch_size=2)}
    summaries = {name: run_featurize(text_config(tiny_text_dir, text_input, outputs[name], **settings[name]))
                 for name in outputs}
    assert {(s.rows_written, s.rows_failed) for s in summaries.values()} == {(summaries["in-process"].rows_written, 1)}
    tables = {name: read_output(path) for name, path in outputs.items()}
    reference = tables["in-process"]
    for name, table in tables.items():
        assert table.column("id").equals(reference.column("id")), name
        assert table.column("content_hash").equals(reference.column("content_hash")), name
        for column in ("embedding", "grad_kl", "grad_simclr"):
            np.testing.assert_allclose(np.asarray(table.column(column).to_pylist()),
                                       np.asarray(reference.column(column).to_pylist()), atol=1e-5, err_msg=name)
        assert sorted(p.name for p in (outputs[name] / "_errors").iterdir()) == sorted(
            p.name for p in (outputs["in-process"] / "_errors").iterdir()), name


def test_a_relative_path_is_where_the_user_is_not_where_a_worker_runs(tmp_path, monkeypatch):
    """A Ray worker (of a Ray the job joined) has its own working directory: a relative
    ``--output`` must mean the driver's."""
    monkeypatch.chdir(tmp_path)
    location = Location("my_features/")
    monkeypatch.chdir("/")
    assert location.path == str(tmp_path / "my_features")
    assert location.join("_staging").child_path("x") == str(tmp_path / "my_features" / "_staging" / "x")
    assert Location("s3://bucket/prefix/").path == "bucket/prefix"


@pytest.mark.parametrize("parts", [1, 2, 3])
def test_negatives_encoded_in_parts_equal_one_process(tiny_text_dir, text_input, parts):
    """The job's setup tasks (draw, decode, encode in parts, merge), run as plain functions:
    the negatives are exactly those of one in-process Featurizer.setup over the same draw."""
    from fungi_ops.seeding import setup_order
    from pipelines.job import FeaturizeConfig
    from pipelines.job.setup_rows import encode_setup_rows, merge_setup_parts, select_setup_rows
    from pipelines.job.spec_resolution import resolve_spec_here
    from pipelines.formats.sources import list_parquet

    config = FeaturizeConfig(input=str(text_input), output="unused", modality="text", model=f"hf:{tiny_text_dir}",
                             objectives="kl,simclr:num_negatives=7;text_views=3")
    spec = resolve_spec_here(config)
    files = list_parquet(Location(str(text_input)), "input")
    order, skipped, *split = select_setup_rows(spec.json, spec.decoder, Location(str(text_input)), files, "id", "text",
                                               spec.setup_rows, parts, 2)
    assert len(order) + len(skipped) == spec.setup_rows  # every drawn row: encoded, or reported to the driver
    merged = merge_setup_parts(order, *(encode_setup_rows(spec.json, part, 2, 1) for part in split))

    reference = Featurizer(FeaturizerSpec.from_json(spec.json), device="cpu")
    table = pq.read_table(text_input)
    ids, texts = [str(i) for i in table.column("id").to_pylist()], table.column("text").to_pylist()
    decoded, keys = [], []
    for row_id, text in zip(ids, texts):
        try:
            decoded.append(reference.decode(text))
            keys.append(row_id)
        except Exception:  # the empty text: skipped, as the job skips undecodable setup rows
            continue
    drawn = setup_order(reference.spec.seed, keys)[: spec.setup_rows]
    reference.setup([decoded[i] for i in drawn], [keys[i] for i in drawn], batch_size=2)
    expected = reference.setup_state()["simclr.negatives"].numpy()
    assert merged["simclr.negatives"].shape == expected.shape == (7 * 3, expected.shape[1])
    np.testing.assert_array_equal(merged["simclr.negatives"], expected)
