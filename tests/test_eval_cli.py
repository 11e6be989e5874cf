"""End-to-end tests of ``fungi eval`` through :func:`pipelines.cli.main`."""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fungi_ops.eval import FEATURE_COLUMNS, TASKS, clustering, knn, segmentation
from fungi_ops.eval.linear import DEFAULT_C_GRID
from fungi_ops.neighbours import INDEX_KINDS
from pipelines import cli
from pipelines.commands import evaluate as eval_command

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def only_eval_command(monkeypatch):
    """Build the CLI with the eval command alone, independent of the other commands' modules."""
    monkeypatch.setattr(cli, "COMMANDS", {"eval": "pipelines.commands.evaluate"})


def write_split(path, seed: int, spec_hash: str = "h1", with_label: bool = True) -> None:
    """Three well-separated classes in an embedding and a grad_kl block, as the pipeline writes them."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(["cat", "dog", "fox"], 8)
    columns: dict[str, pa.Array] = {"id": pa.array([f"{seed}-{i}" for i in range(labels.size)])}
    if with_label:
        columns["label"] = pa.array(labels)
    for name, dim in (("embedding", 6), ("grad_kl", 4)):
        centres = np.random.default_rng(dim).normal(size=(3, dim))
        x = centres[np.repeat(np.arange(3), 8)] + 0.05 * rng.normal(size=(labels.size, dim))
        columns[name] = pa.FixedSizeListArray.from_arrays(pa.array(x.astype(np.float32).ravel()), dim)
    metadata = {b"fungi.spec_hash": spec_hash.encode(), b"fungi.spec": b'{"backbone": "toy"}'}
    path.mkdir()
    pq.write_table(pa.table(columns).replace_schema_metadata(metadata), path / "part-0.parquet")


def test_eval_prints_the_table_and_writes_the_report(tmp_path, capsys):
    write_split(tmp_path / "train", 0)
    write_split(tmp_path / "test", 1)
    out = tmp_path / "report"
    code = cli.main([
        "eval", "--train", str(tmp_path / "train"), "--test", str(tmp_path / "test"),
        "--label-column", "label", "--shots", "2", "--seeds", "2", "--k", "3", "--device", "cpu",
        "--out", str(out),
    ])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "| embedding+grad_kl | 10 | 100.00 ± 0.00 |" in captured.out
    assert (out / "report.png").read_bytes()[:8] == PNG_SIGNATURE
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["k"] == 3 and report["settings"]["n_classes"] == 3
    assert (out / "report.md").read_text() == captured.out


def test_eval_linear_with_pca_and_feature_selection(tmp_path, capsys):
    write_split(tmp_path / "train", 0)
    write_split(tmp_path / "test", 1)
    code = cli.main([
        "eval", "--train", str(tmp_path / "train"), "--test", str(tmp_path / "test"),
        "--features", "grad_kl", "--pca", "2", "--task", "linear", "--c-grid", "0.1,1", "--device", "cpu",
    ])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "| grad_kl | 2 |" in captured.out and "embedding" not in captured.out.split("|---")[-1]


def test_eval_clustering_scores_the_test_table_without_train_labels(tmp_path, capsys):
    write_split(tmp_path / "train", 0, with_label=False)
    write_split(tmp_path / "test", 1)
    out = tmp_path / "report"
    code = cli.main([
        "eval", "--task", "clustering", "--train", str(tmp_path / "train"), "--test", str(tmp_path / "test"),
        "--pca", "4", "--device", "cpu", "--out", str(out),
    ])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "| features | dim | NMI (%) | ARI (%) | accuracy (%) |" in captured.out
    assert "| embedding+grad_kl | 4 | 100.00 ± 0.00 | 100.00 ± 0.00 | 100.00 ± 0.00 |" in captured.out
    assert "k-means on the test split, k=3 (its classes); PCA 4 fitted on the train split; mean ± std over 5 seeds" in captured.out
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["seeds"] == [0, 1, 2, 3, 4] and report["settings"]["clustered_split"] == "test"
    assert len(report["results"][0]["metrics"]["ARI"]["values"]) == 5
    assert (out / "report.png").read_bytes()[:8] == PNG_SIGNATURE


@pytest.mark.parametrize(
    ("make_args", "message"),
    [
        (lambda d: ["--train", str(d / "nolabel"), "--test", str(d / "test")], "label column 'label' not found in"),
        (lambda d: ["--train", str(d / "train"), "--test", str(d / "other")], "fungi.spec_hash=h1"),
        (lambda d: ["--train", str(d / "train"), "--test", str(d / "missing")], "missing"),
        (lambda d: ["--train", str(d / "train"), "--test", str(d / "test"), "--shots", "9"], "'cat' (8)"),
        (lambda d: ["--train", str(d / "train"), "--test", str(d / "test"), "--seeds", "3"], "set shots"),
        (lambda d: ["--train", str(d / "train"), "--test", str(d / "test"), "--device", "bogus"], "unknown torch device"),
        (lambda d: ["--train", str(d / "train"), "--test", str(d / "test"), "--task", "clustering", "--shots", "2"],
         "clustering takes no --shots"),
        (lambda d: ["--train", str(d / "train"), "--test", str(d / "nolabel"), "--task", "clustering"],
         "label column 'label' not found in"),
    ],
)
def test_bad_input_exits_2_with_a_one_line_error(tmp_path, capsys, make_args, message):
    write_split(tmp_path / "train", 0)
    write_split(tmp_path / "test", 1)
    write_split(tmp_path / "other", 1, spec_hash="h2")
    write_split(tmp_path / "nolabel", 0, with_label=False)
    args = make_args(tmp_path)
    code = cli.main(["eval", *args] if "--device" in args else ["eval", *args, "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err
    assert "Traceback" not in err


def test_cli_constants_match_the_library():
    """The command duplicates these so that ``fungi --help`` does not import torch."""
    assert eval_command._FEATURES == FEATURE_COLUMNS
    assert eval_command._TASKS == TASKS
    parser = cli.build_parser()
    args = parser.parse_args(["eval", "--train", "a", "--test", "b"])
    assert tuple(args.c_grid) == DEFAULT_C_GRID
    assert (args.k, args.vote, args.temperature, args.task, args.seeds) == (None, "weighted", None, "knn", None)
    assert eval_command._CLUSTERING_SEEDS == clustering.DEFAULT_SEEDS
    assert eval_command.task_defaults("knn") == (knn.DEFAULT_K, knn.DEFAULT_TEMPERATURE) == (20, 0.07)
    assert eval_command.task_defaults("segmentation") == (segmentation.DEFAULT_K, segmentation.DEFAULT_TEMPERATURE)
    assert args.memory_size == segmentation.DEFAULT_MEMORY_SIZE
    assert eval_command._INDEXES == ("auto", *INDEX_KINDS)


def write_one_output(path) -> None:
    """Both splits in one table, told apart by a kept ``split`` column (as `fungi featurize --keep-columns split`)."""
    write_split(path / "a", 0)
    write_split(path / "b", 1)
    train, test = pq.read_table(path / "a"), pq.read_table(path / "b")
    both = pa.concat_tables([
        train.append_column("split", pa.array(["train"] * train.num_rows)),
        test.append_column("split", pa.array(["test"] * test.num_rows)),
    ])
    (path / "out").mkdir()
    pq.write_table(both.replace_schema_metadata(train.schema.metadata), path / "out" / "part-0.parquet")


def test_eval_takes_train_and_test_from_one_output_by_a_kept_column(tmp_path, capsys):
    write_one_output(tmp_path)
    out = str(tmp_path / "out")
    args = ["eval", "--train", out, "--test", out, "--k", "3", "--device", "cpu"]
    assert cli.main(args) == 0
    captured = capsys.readouterr()
    assert "warning: 48 of 48 test ids are also in train: those rows are scored against themselves" in captured.err

    assert cli.main([*args, "--train-where", "split=train", "--test-where", "split=test", "--out",
                     str(tmp_path / "report")]) == 0
    captured = capsys.readouterr()
    assert "warning" not in captured.err, captured.err
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert (report["settings"]["train"]["rows"], report["settings"]["test"]["rows"]) == (24, 24)

    assert cli.main([*args, "--train-where", "split=train"]) == 0  # the test table holds the train rows too
    assert "warning: 24 of 48 test ids are also in train" in capsys.readouterr().err


@pytest.mark.parametrize("flag, value, message", [
    ("--test-where", "fold=test", "error: filter fold=test: column 'fold' not found in"),
    ("--test-where", "split=tset", "has split=tset; its values: 'test', 'train'"),
    ("--train-where", "split", "expected COLUMN=VALUE (e.g. split=test), got 'split'"),
])
def test_eval_where_names_a_wrong_column_or_value(tmp_path, capsys, flag, value, message):
    write_one_output(tmp_path)
    out = str(tmp_path / "out")
    code = cli.main(["eval", "--train", out, "--test", out, "--device", "cpu", flag, value]) if "=" in value else None
    if code is None:
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["eval", "--train", out, "--test", out, flag, value])
        code = exit_info.value.code
    assert code == 2
    assert message in capsys.readouterr().err
