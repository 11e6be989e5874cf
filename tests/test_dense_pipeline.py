"""Dense (per-patch) FUNGI through `fungi featurize`: the Ray job against the in-process engine.

One job featurizes a train and a test file of synthetic scenes (masks kept) with timm's
random ``test_vit`` at 96 px (6 x 6 patches), its support drawn from a third file through
``--support-from``; the module's tests then check its features, its quarantine, the
segmentation evaluation of its output and an incremental night on top of it.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from fungi_ops import FeaturizerSpec
from fungi_ops.dense import DenseFeaturizer
from fungi_ops.dense_table import DenseReader, dense_table, write_dense_parquet
from fungi_ops.synthetic_scenes import make_scene, png, scene_table
from pipelines.cli import main as cli_main

OBJECTIVES = "dense:image_size=96;support_size=144;support_patches_per_image=18"  # the support: 8 images
MODEL = ["--modality", "image", "--model", "timm:test_vit", "--weights", "random", "--precision", "fp32"]
ATOL = 1e-5


pytestmark = pytest.mark.usefixtures("local_ray")  # conftest: one local Ray for the session


def featurize(source: Path, output: Path, *extra: str) -> int:
    return cli_main([
        "featurize", "--input", str(source), "--output", str(output), *MODEL, "--objectives", OBJECTIVES,
        "--keep-columns", "mask", "--actors", "1", "--batch-size", "4", "--max-error-fraction", "0.2", *extra,
    ])


@pytest.fixture(scope="module")
def lake(tmp_path_factory) -> dict[str, Path]:
    """Scenes: train (10 and a broken image), test (5), support (8); then one job over train and test."""
    root = tmp_path_factory.mktemp("dense_lake")
    (root / "in").mkdir()
    train = scene_table(10, ignore_border=1)
    broken = pa.table({"id": ["broken"], "image": pa.array([b"not an image"], pa.binary()), "mask": train.column("mask")[:1]})
    pq.write_table(pa.concat_tables([train, broken]), root / "in" / "train.parquet")
    pq.write_table(scene_table(5, first=1000, ignore_border=1), root / "in" / "test.parquet")
    pq.write_table(scene_table(8, first=100), root / "support.parquet")
    assert featurize(root / "in", root / "out", "--support-from", str(root / "support.parquet")) == 0
    return {"root": root, "input": root / "in", "output": root / "out"}


def output_file(output: Path, split: str) -> Path:
    (path,) = output.glob(f"{split}-*.parquet")  # one data file per input file
    return path


def in_process(output: Path) -> DenseFeaturizer:
    """The engine with the job's spec and support (its setup artifact), in this process."""
    manifest = json.loads((output / "_fungi_manifest.json").read_text())
    featurizer = DenseFeaturizer(FeaturizerSpec.from_dict(manifest["spec"]), device="cpu")
    featurizer.load_setup(output / manifest["setup_artifact"])
    return featurizer


def patches(table: pa.Table, name: str) -> np.ndarray:
    """``[rows, patches, dim]`` of a dense feature column."""
    column = table.column(name).combine_chunks()
    dim = column.type.value_type.list_size
    return column.flatten().flatten().to_numpy().reshape(table.num_rows, -1, dim)


def test_job_writes_the_engine_features_as_a_dense_table(lake) -> None:
    output = lake["output"]
    manifest = json.loads((output / "_fungi_manifest.json").read_text())
    assert manifest["setup_artifact"].startswith(f"_fungi_setup/{manifest['spec_hash']}-r")
    assert (manifest["rows"], manifest["errors"]) == (15, 1)
    featurizer = in_process(output)
    assert featurizer.spec.hash == manifest["spec_hash"] and featurizer.support.size == 144
    for split, source in (("train", "train.parquet"), ("test", "test.parquet")):
        table = pq.read_table(output_file(output, split))
        assert table.schema.field("grid_rows").type == pa.int32()
        assert table.schema.field("embedding").type == pa.list_(pa.list_(pa.float32(), 64))
        assert table.schema.field("grad_dense").type == pa.list_(pa.list_(pa.float32(), 64))
        assert table.schema.metadata[b"fungi.spec_hash"].decode() == manifest["spec_hash"]
        assert set(table.column("grid_rows").to_pylist() + table.column("grid_cols").to_pylist()) == {6}
        table, rows = table.sort_by("id"), pq.read_table(lake["input"] / source).sort_by("id")
        rows = rows.filter(pc.is_in(rows.column("id"), value_set=table.column("id")))
        assert rows.column("id").equals(table.column("id")) and rows.column("mask").equals(table.column("mask"))
        expected = featurizer.featurize_payloads(rows.column("image").to_pylist(), rows.column("id").to_pylist())
        for name in ("embedding", "grad_dense"):
            np.testing.assert_allclose(patches(table, name), expected.features[name], atol=ATOL, rtol=0)
    reader = DenseReader(output)  # the whole output: both data files, _errors/ and _fungi_setup/ left out
    assert reader.n_rows == 15 and reader.dims == {"embedding": 64, "grad_dense": 64}


def test_a_bad_image_is_quarantined(lake) -> None:
    errors = pq.read_table(lake["output"] / "_errors").to_pylist()
    assert [(e["id"], e["stage"]) for e in errors] == [("broken", "decode")]
    assert errors[0]["error"].startswith("cannot decode image")


def test_segmentation_of_the_job_output_equals_that_of_in_process_tables(lake, tmp_path, capsys) -> None:
    output = lake["output"]
    featurizer = in_process(output)
    local = tmp_path / "local"
    local.mkdir()
    for split in ("train", "test"):
        job = pq.read_table(output_file(output, split), columns=["id", "mask"])  # the same rows in the same order
        source = pq.read_table(lake["input"] / f"{split}.parquet")
        images = dict(zip(source.column("id").to_pylist(), source.column("image").to_pylist()))
        ids = job.column("id").to_pylist()
        batch = featurizer.featurize_payloads([images[i] for i in ids], ids)
        write_dense_parquet(
            dense_table(batch.keys, batch.grid, batch.features, columns={"mask": job.column("mask")}, spec=featurizer.spec),
            local / f"{split}.parquet",
        )
    reports = {}
    for name, train, test in (
        ("job", output_file(output, "train"), output_file(output, "test")),
        ("local", local / "train.parquet", local / "test.parquet"),
    ):
        code = cli_main(["eval", "--task", "segmentation", "--train", str(train), "--test", str(test),
                         "--k", "10", "--out", str(tmp_path / name)])
        assert code == 0, capsys.readouterr().err
        reports[name] = json.loads((tmp_path / name / "report.json").read_text())["results"]
    assert [r["name"] for r in reports["job"]] == ["embedding", "grad_dense", "embedding+grad_dense"]
    for job, local_result in zip(reports["job"], reports["local"]):
        assert job["metrics"]["mIoU"]["mean"] == pytest.approx(local_result["metrics"]["mIoU"]["mean"], abs=1e-9)
        assert job["details"]["class_iou"] == local_result["details"]["class_iou"]
    assert reports["job"][0]["metrics"]["mIoU"]["mean"] > 0.3  # the scenes are segmented, not guessed


def test_incremental_night_featurizes_only_the_changed_image(lake, tmp_path) -> None:
    source, output = tmp_path / "in", tmp_path / "out"
    shutil.copytree(lake["input"], source)
    shutil.copytree(lake["output"], output)
    before = pq.read_table(output_file(output, "train"))
    setup = next((output / "_fungi_setup").iterdir())
    setup_bytes = setup.read_bytes()
    train = pq.read_table(source / "train.parquet")
    changed_image = png(make_scene(500, size=64)[0])
    images = train.column("image").to_pylist()
    images[3] = changed_image
    pq.write_table(train.set_column(1, "image", pa.array(images, pa.binary())), source / "train.parquet")

    assert featurize(source, output, "--incremental") == 0
    run = json.loads((output / "_fungi_manifest.json").read_text())["runs"][-1]
    assert (run["rows_written"], run["rows_replaced"], run["rows_skipped"]) == (1, 1, 15)
    assert (run["files_read"], run["files_unchanged"]) == (1, 1)
    assert setup.read_bytes() == setup_bytes  # the support is the setup artifact, not rebuilt
    after = pq.read_table(output_file(output, "train"))
    changed = train.column("id")[3].as_py()
    assert sorted(after.column("id").to_pylist()) == sorted(before.column("id").to_pylist())
    assert pq.ParquetFile(output_file(output, "train")).schema_arrow.equals(before.schema)
    for name in ("embedding", "grad_dense"):
        old, new = (patches(t.sort_by("id"), name) for t in (before, after))
        same = np.array(sorted(before.column("id").to_pylist())) != changed
        np.testing.assert_array_equal(new[same], old[same])  # unchanged rows carried over as they were
    expected = in_process(output).featurize_payloads([changed_image], [changed])
    row = after.filter(pc.equal(after.column("id"), changed))
    for name in ("embedding", "grad_dense"):
        np.testing.assert_allclose(patches(row, name)[0], expected.features[name][0], atol=ATOL, rtol=0)
    assert len(list(output.glob("_errors/*.pqt"))) == 1


def test_support_from_is_refused_without_the_dense_objective(lake, tmp_path, capsys) -> None:
    code = cli_main(["featurize", "--input", str(lake["input"]), "--output", str(tmp_path / "o"), *MODEL,
                     "--objectives", "kl", "--support-from", str(lake["root"] / "support.parquet")])
    assert code == 2
    assert "--support-from is the dense objective's support index" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
