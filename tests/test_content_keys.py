"""A row's features depend on its content only, in the job as in the library, and an output of
the older spec format (views seeded by the row id) is refused by a night but still read by eval.

A 1-layer random BERT (``tiny_text_dir``) with SimCLR's random word deletions keeps the job cheap;
the library's own tests (tests/test_engine.py, tests/test_dense.py) cover every modality.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

import fungi_ops.spec as spec_module
from fungi_ops import ConfigError, Featurizer, FeaturizerSpec
from lakes import config, features, write_part
from pipelines.cli import main as cli_main
from pipelines.job import run_featurize

OBJECTIVES = "kl,simclr:num_negatives=4;text_views=3"
TEXT, OTHER = "one payload under several ids", "a different line of text"


def vectors(table: pa.Table, row_id: str, column: str) -> np.ndarray:
    row = table.filter(pa.compute.equal(table["id"], row_id))
    return np.asarray(row[column][0].as_py(), dtype=np.float32)


def test_copies_of_a_payload_under_other_ids_get_its_features(tiny_text_dir, tmp_path: Path) -> None:
    """The job (in process: its actor is the one Ray runs) in batches of 2: the copy in the same batch, the copies in other batches, and
    the library on the payload under an id no row has (a query) give the same vectors."""
    source, output = tmp_path / "in", tmp_path / "out"
    write_part(source, "part-0.parquet", ["a", "b", "c", "d"], [TEXT, OTHER, TEXT, OTHER])  # batches (a, b), (c, d)
    write_part(source, "part-1.parquet", ["e", "f"], [TEXT, TEXT])  # one batch
    run_featurize(config(tiny_text_dir, source, output, objectives=OBJECTIVES, batch_size=2))
    table = features(output)
    manifest = json.loads((output / "_fungi_manifest.json").read_text())
    featurizer = Featurizer(FeaturizerSpec.from_dict(manifest["spec"]), device="cpu")
    featurizer.load_setup(output / manifest["setup_artifact"])
    query = featurizer.featurize_payloads([TEXT, OTHER], ["query", "other query"]).features
    for column in ("embedding", "grad_kl", "grad_simclr"):
        first = vectors(table, "a", column)
        np.testing.assert_array_equal(vectors(table, "c", column), first, err_msg=column)  # across batches
        np.testing.assert_array_equal(vectors(table, "f", column), vectors(table, "e", column), err_msg=column)  # one batch
        np.testing.assert_allclose(vectors(table, "e", column), first, atol=1e-5, rtol=0, err_msg=column)
        np.testing.assert_array_equal(query[column][0], first, err_msg=column)  # no row id at all
    assert not np.allclose(vectors(table, "a", "grad_simclr"), vectors(table, "b", "grad_simclr"), atol=1e-3)


def test_an_output_of_the_older_spec_format_is_refused_by_a_night_and_read_by_eval(
    tiny_text_dir, tmp_path: Path, monkeypatch, capsys
) -> None:
    source, output = tmp_path / "in", tmp_path / "out"
    labels = {"label": [0, 1, 0, 1, 0, 1]}
    write_part(source, "part-0.parquet", [f"r{i}" for i in range(6)], [f"line {i} of text" for i in range(6)], **labels)
    with monkeypatch.context() as patch:
        patch.setattr(spec_module, "SPEC_FORMAT", 1)  # the fungi whose views followed the row ids
        run_featurize(config(tiny_text_dir, source, output, objectives="kl", keep_columns=("label",)))
    manifest_before = (output / "_fungi_manifest.json").read_text()
    assert json.loads(manifest_before)["spec"]["format"] == 1
    data_before = {path.name: path.read_bytes() for path in output.glob("*.parquet")}

    write_part(source, "part-1.parquet", ["n0", "n1"], ["a new row", "another new row"], label=[0, 1])
    code = cli_main(["featurize", "--input", str(source), "--output", str(output), "--modality", "text",
                     "--model", f"hf:{tiny_text_dir}", "--objectives", "kl", "--keep-columns", "label", "--incremental"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2
    assert err.startswith("error: output ") and "(spec format 1, whose features this fungi's format 2" in err, err
    assert err.endswith("Use another output, or --overwrite to replace it"), err
    assert (output / "_fungi_manifest.json").read_text() == manifest_before  # nothing mixed, nothing committed
    assert {path.name: path.read_bytes() for path in output.glob("*.parquet")} == data_before

    assert cli_main(["eval", "--train", str(output), "--test", str(output), "--k", "3", "--device", "cpu"]) == 0
    assert "embedding" in capsys.readouterr().out


def test_a_spec_of_the_older_format_is_not_computed_again() -> None:
    """A featurizer built from a format-1 spec (a serving replica of an old output) would
    compute other features than the output holds: refused, with the fix."""
    data = json.loads(FeaturizerSpec(model="hf:any", modality="text").to_json())
    assert data["format"] == spec_module.SPEC_FORMAT == 2
    data["format"] = 1
    with pytest.raises(ConfigError, match=r"^spec format 1 .*seeded each row's views by its id.*--overwrite$"):
        FeaturizerSpec.from_dict(data)
