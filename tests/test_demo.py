"""`fungi demo`: the offline dataset builder, and the whole run on a shared local Ray (2 CPUs)."""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.cli import main as cli_main
from pipelines.demo import SPLITS, build_dataset, eligible_topics, load_topics

TOPICS = ("ai", "food", "money", "sports")


def read_splits(data) -> dict[str, pa.Table]:
    return {split: pq.read_table(getattr(data, split)) for split in SPLITS}


def test_topics_are_real_deduplicated_and_filtered():
    topics = load_topics()
    eligible = eligible_topics(topics, 24)
    assert len(eligible) >= 15
    for small in ("health", "history", "tech_support"):  # tech_support: 2100 lines, 20 unique
        assert small in topics and small not in eligible
    owners: dict[str, list[str]] = {}
    for topic, lines in topics.items():
        assert len(lines) == len(set(lines)) and all(line.strip() == line and line for line in lines)
        for line in lines:
            owners.setdefault(line, []).append(topic)
    assert all(len(names) == 1 for names in owners.values()), "a line belongs to two topics"


def test_dataset_is_seeded_stratified_and_capped(tmp_path: Path):
    first = build_dataset(tmp_path / "a", per_topic=10, seed=3)
    again = build_dataset(tmp_path / "b", per_topic=10, seed=3)
    other = build_dataset(tmp_path / "c", per_topic=10, seed=4)
    tables, same, different = read_splits(first), read_splits(again), read_splits(other)
    assert all(tables[s].equals(same[s]) for s in SPLITS)
    assert not all(tables[s].equals(different[s]) for s in SPLITS)

    assert first.topics == eligible_topics(load_topics(), 24)
    assert tables["train"].schema.names == ["id", "text", "label", "split"]
    assert all(t.schema.field(c).type == pa.string() for t in tables.values() for c in t.schema.names)
    rows = pa.concat_tables(tables.values()).to_pylist()
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids)) == first.total
    for row in rows:
        assert row["id"].startswith(row["label"] + "-")
        assert row["split"] in SPLITS
        assert len(row["text"]) <= 200  # --max-chars
    for table in tables.values():  # sorted by length: batches pad less
        lengths = [len(text) for text in table.column("text").to_pylist()]
        assert lengths == sorted(lengths)
    for topic in first.topics:
        counts = {s: sum(1 for r in rows if r["label"] == topic and r["split"] == s) for s in SPLITS}
        assert counts["train"] >= 1 and counts["test"] >= 1
        assert counts["train"] + counts["test"] == first.lines_per_topic[topic] <= 10
        if first.lines_per_topic[topic] == 10:
            assert counts["test"] == 3  # 30%

    # ids are stable: a bigger draw keeps the text of every id
    bigger = pa.concat_tables(read_splits(build_dataset(tmp_path / "d", per_topic=40, seed=3)).values()).to_pylist()
    text_of = {r["id"]: r["text"] for r in bigger}
    assert all(text_of.get(r["id"], r["text"]) == r["text"] for r in rows)


def test_dataset_rejects_bad_settings(tmp_path: Path):
    with pytest.raises(ValueError, match="unknown topic"):
        build_dataset(tmp_path, topics=["ai", "no_such_topic"])
    with pytest.raises(ValueError, match="at least 2 topics"):
        build_dataset(tmp_path, topics=["ai"])
    with pytest.raises(ValueError, match="per-topic"):
        build_dataset(tmp_path, per_topic=1)
    assert cli_main(["demo", "--workdir", str(tmp_path), "--topics", "ai,nope"]) == 2
    assert cli_main(["demo", "--workdir", str(tmp_path), "--objectives", "kl,nope"]) == 2
    assert cli_main(["demo", "--workdir", str(tmp_path), "--objectives", "dino"]) == 2  # images only


def test_cli_defaults_match_the_library_and_help_stays_light():
    """`fungi demo` copies the defaults so that `fungi --help` imports neither torch nor ray."""
    import subprocess
    import sys

    from pipelines import demo
    from pipelines.commands import demo as command

    assert (command._WORKDIR, command._PER_TOPIC, command._MIN_LINES, command._MAX_CHARS,
            command._TEST_FRACTION, command._OBJECTIVES, command._K) == (
        demo.DEFAULT_WORKDIR, demo.DEFAULT_PER_TOPIC, demo.DEFAULT_MIN_LINES, demo.DEFAULT_MAX_CHARS,
        demo.DEFAULT_TEST_FRACTION, demo.DEFAULT_OBJECTIVES, demo.DEFAULT_K)
    check = (
        "import sys; from pipelines.cli import build_parser; build_parser().parse_args(['demo']); "
        "heavy = [m for m in ('torch', 'ray', 'transformers') if m in sys.modules]; assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", check], check=True, cwd=Path(__file__).resolve().parents[1])


def test_list_topics(capsys):
    assert cli_main(["demo", "--list-topics"]) == 0
    out = capsys.readouterr().out
    assert "tech_support" in out and "left out" in out and "trivia" in out


def test_features_are_reused_only_with_the_same_settings(tmp_path: Path, monkeypatch):
    """The demo's reuse decision, with the featurize job replaced by a stub (no Ray)."""
    import dataclasses

    import pipelines.job
    from pipelines import demo

    calls = []

    def fake_run_featurize(config):
        output = Path(config.output)
        calls.append((config.incremental, config.overwrite))
        output.mkdir(parents=True, exist_ok=True)
        (output / "_fungi_manifest.json").write_text("{}")
        return "summary"

    monkeypatch.setattr(pipelines.job, "run_featurize", fake_run_featurize)
    config = demo.DemoConfig(workdir=str(tmp_path), per_topic=4, topics=TOPICS)
    data = build_dataset(tmp_path / "data", per_topic=4, topics=TOPICS)
    features = tmp_path / "features"

    def run(settings):
        return demo._featurize(settings, "hf:model", data, features, lambda line: None)

    run(config)  # first run: everything is computed
    run(config)  # same settings: incremental (the job keeps the output's negatives)
    run(dataclasses.replace(config, objectives="kl,simclr:num_negatives=8"))  # changed: recomputed
    run(dataclasses.replace(config, objectives="kl,simclr:num_negatives=8", fresh=True))  # --fresh
    assert calls == [(False, True), (True, False), (False, True), (False, True)]


def test_demo_end_to_end(tmp_path: Path, local_ray, capsys):
    workdir = tmp_path / "demo"
    args = ["demo", "--workdir", str(workdir), "--per-topic", "8", "--topics", ",".join(TOPICS), "--actors", "1"]
    assert cli_main(args) == 0
    out = capsys.readouterr().out
    for step in ("[1/4]", "[2/4]", "[3/4]", "[4/4]", "Where everything is"):
        assert step in out
    for row in ("| embedding |", "| grad_kl |", "| grad_simclr |", "| embedding+grad_kl |",
                "| embedding+grad_kl+grad_simclr |"):
        assert row in out
    assert "k=20" in out and "written 32, failed 0" in out

    features = workdir / "features"
    table = pq.read_table(features)
    assert {"id", "content_hash", "label", "split", "embedding", "grad_kl", "grad_simclr"} <= set(table.column_names)
    assert table.num_rows == 4 * 8
    assert table.schema.field("grad_simclr").type == pa.list_(pa.float32(), 384)
    manifest = json.loads((features / "_fungi_manifest.json").read_text())
    assert manifest["rows"] == 32 and manifest["errors"] == 0
    assert manifest["spec"]["pooling"] == "mean"
    assert list((features / "_fungi_setup").glob("*.safetensors"))
    report = json.loads((workdir / "report" / "report.json").read_text())
    assert report["task"] == "knn" and report["settings"]["test"]["rows"] == 8
    assert [r["name"] for r in report["results"]] == [
        "embedding", "grad_kl", "grad_simclr", "embedding+grad_kl", "embedding+grad_kl+grad_simclr",
    ]
    assert (workdir / "report" / "report.png").stat().st_size > 0
    for path in (workdir / "data", features, features / "_errors", workdir / "report" / "report.md"):
        assert str(path) in out

    # the same demo again: nothing rewritten, nothing read, Ray not needed, the report reused
    stamps = {path: path.stat().st_mtime_ns for path in [*(workdir / "data").glob("*.parquet"),
                                                           *(workdir / "report").iterdir()]}
    assert cli_main(args) == 0
    out = capsys.readouterr().out
    assert "written 0, failed 0" in out and "reusing it" in out and "| embedding+grad_kl |" in out
    assert {path: path.stat().st_mtime_ns for path in stamps} == stamps
    run = json.loads((features / "_fungi_manifest.json").read_text())["runs"][-1]
    assert (run["files_read"], run["files_unchanged"]) == (0, 2)
    assert cli_main([*args, "--k", "5"]) == 0  # another evaluation setting: evaluated again
    assert "writing the report" in capsys.readouterr().out
    assert json.loads((workdir / "report" / "report.json").read_text())["settings"]["k"] == 5
