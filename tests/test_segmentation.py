"""HummingBird segmentation of dense features: a hand-built case with an exact mIoU, synthetic
scenes a random ViT must segment (and must not, once the labels are shuffled), the CLI."""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest
from test_dense import dense_spec

from fungi_ops.dense import DenseFeaturizer
from fungi_ops.dense_table import dense_table, write_dense_parquet
from fungi_ops.eval import EvalWarning, evaluate_segmentation, write_report
from fungi_ops.eval.segmentation import (
    memory_patches,
    miou,
    patch_label_counts,
    predict_mask,
    update_confusion,
)
from fungi_ops.synthetic_scenes import make_scene, png, scene_table
from pipelines import cli

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# -- a case whose mIoU is known exactly ------------------------------------------------------
def write_hand_built(directory) -> None:
    """Train: one 2x2-patch image, features e0..e3, classes 0 1 / 2 0. Test: the same features.

    The test truth (4x4, one 255) against the predicted blocks 0 1 / 2 0:

        truth        prediction
        0 0 1 1      0 0 1 1
        0 1 1 1      0 0 1 1
        2 2 0 .      2 2 0 0
        2 0 0 0      2 2 0 0

    class 0: TP 6, FP 1, FN 1 -> 6/8; class 1: TP 4, FN 1 -> 4/5; class 2: TP 3, FP 1 -> 3/4.
    """
    basis = np.eye(4, dtype=np.float32)[None]  # [1 image, 4 patches, 4]
    train_mask = np.kron(np.array([[0, 1], [2, 0]], np.uint8), np.ones((16, 16), np.uint8))
    test_mask = np.array([[0, 0, 1, 1], [0, 1, 1, 1], [2, 2, 0, 255], [2, 0, 0, 0]], np.uint8)
    directory.mkdir()
    for split, mask in (("train", train_mask), ("test", test_mask)):
        table = dense_table(
            [f"{split}-0"], (2, 2), {"embedding": basis, "grad_dense": basis},
            columns={"mask": pa.array([png(mask)], pa.binary())},
        )
        write_dense_parquet(table, directory / f"{split}.parquet")


def test_hand_built_case_has_the_exact_miou(tmp_path) -> None:
    write_hand_built(tmp_path / "hand")
    with pytest.warns(EvalWarning, match="k=30 exceeds the 4 train rows"):
        report = evaluate_segmentation(tmp_path / "hand" / "train.parquet", tmp_path / "hand" / "test.parquet")
    assert [r.name for r in report.results] == ["embedding", "grad_dense", "embedding+grad_dense"]
    for result in report.results:
        assert result.metrics["mIoU"].mean == pytest.approx((6 / 8 + 4 / 5 + 3 / 4) / 3, abs=1e-12)
        assert result.details["class_iou"][0] == pytest.approx({"0": 6 / 8, "1": 4 / 5, "2": 3 / 4}, abs=1e-12)
    assert report.settings["memory_patches"] == 4 and report.settings["k"] == 4 and report.settings["index"] == "flat"
    assert report.example.id == "test-0" and report.example.image is None
    np.testing.assert_array_equal(report.example.predictions["embedding"], np.kron([[0, 1], [2, 0]], np.ones((2, 2))))


def test_label_counts_memory_sampling_and_miou_units() -> None:
    mask = np.zeros((32, 32), np.uint8)
    mask[:16, 16:] = 255  # a patch with no valid pixel
    mask[16:, :16] = 3  # a class in one patch (2) only, class 0 in two (0 and 3)
    mask[31, 31] = 255
    counts = patch_label_counts(mask, (2, 2))
    assert counts.shape == (4, 255) and counts[1].sum() == 0 and counts[2, 3] == 256 and counts[3, 0] == 255
    assert memory_patches(counts, 9, seed=0, key="k").tolist() == [0, 2, 3]  # never the unlabelled patch
    # score = (patches holding the patch's classes) x uniform: patch 2 scores 1 u, the others 2 u
    firsts = np.bincount([memory_patches(counts, 1, seed=0, key=str(k))[0] for k in range(300)], minlength=4)
    assert firsts[1] == 0 and firsts[2] > 1.5 * max(firsts[0], firsts[3]), firsts  # expected 58% / 21% / 21%
    confusion = np.zeros((256, 256), np.int64)
    update_confusion(confusion, np.array([[0, 1], [255, 1]]), np.array([[0, 0], [7, 1]]))
    value, per_class = miou(confusion)
    assert per_class == {0: 0.5, 1: 0.5} and value == 0.5
    scores = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [1.0, 0.0]])  # a 2x2 grid, 2 classes
    assert predict_mask(scores, (2, 2), (4, 6)).tolist() == [[0, 0, 0, 1, 1, 1]] * 2 + [[1, 1, 1, 0, 0, 0]] * 2


# -- synthetic scenes through a random ViT ------------------------------------------------
def permute_classes(masks: list[bytes], seed: int) -> list[bytes]:
    """Each train mask's class ids permuted at random: the labels no longer follow the textures."""
    rng = np.random.default_rng(seed)
    shuffled = []
    for payload in masks:
        table = np.arange(256, dtype=np.uint8)
        table[:4] = rng.permutation(4)
        shuffled.append(png(table[np.asarray(make_mask(payload))]))
    return shuffled


def make_mask(payload: bytes) -> np.ndarray:
    from fungi_ops.eval.segmentation import decode_mask

    return decode_mask(payload, "memory", "row")


def chance_miou(result) -> float:
    """mIoU of a prediction independent of the truth, with the same class frequencies."""
    truth, predicted = result.details["truth_pixels"][0], result.details["predicted_pixels"][0]
    total = sum(truth.values())
    values = []
    for c in truth:
        p, q = truth[c] / total, predicted[c] / total
        values.append(p * q / (p + q - p * q))
    return float(np.mean(values))


@pytest.fixture(scope="module")
def scene_features(tmp_path_factory):
    """Dense features of 60 train and 30 test scenes (4 textures), plus the train set with shuffled labels."""
    directory = tmp_path_factory.mktemp("scenes")
    featurizer = DenseFeaturizer(dense_spec("support_size=2048;support_patches_per_image=32"), device="cpu")
    train, test = scene_table(60, ignore_border=1), scene_table(30, first=1000, ignore_border=1)
    featurizer.setup([make_scene(i, size=64)[0] for i in range(60)], [f"scene-{i}" for i in range(60)])
    for name, table in (("train", train), ("test", test), ("shuffled", train)):
        batch = featurizer.featurize_payloads(table.column("image").to_pylist(), table.column("id").to_pylist())
        masks = table.column("mask").to_pylist()
        masks = permute_classes(masks, seed=0) if name == "shuffled" else masks
        columns = {"image": table.column("image"), "mask": pa.array(masks, pa.binary())}
        write_dense_parquet(
            dense_table(batch.keys, batch.grid, batch.features, columns=columns, spec=featurizer.spec),
            directory / f"{name}.parquet",
        )
    return directory


def test_random_vit_segments_synthetic_scenes(scene_features) -> None:
    report = evaluate_segmentation(scene_features / "train.parquet", scene_features / "test.parquet")
    scores = {r.name: r.metrics["mIoU"].mean for r in report.results}
    assert scores["embedding"] > 0.9, scores
    assert scores["embedding+grad_dense"] > 0.9, scores
    assert report.settings["n_classes"] == 4 and report.settings["memory_patches"] == 60 * 64


def test_shuffled_labels_are_near_chance(scene_features) -> None:
    report = evaluate_segmentation(scene_features / "shuffled.parquet", scene_features / "test.parquet")
    for result in report.results:
        value, chance = result.metrics["mIoU"].mean, chance_miou(result)
        assert value < 0.3 and abs(value - chance) < 0.08, (result.name, value, chance)


# -- the command -----------------------------------------------------------------------------
def test_cli_writes_the_segmentation_report(scene_features, tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setattr(cli, "COMMANDS", {"eval": "pipelines.commands.evaluate"})
    out = tmp_path / "report"
    code = cli.main([
        "eval", "--task", "segmentation", "--train", str(scene_features / "train.parquet"),
        "--test", str(scene_features / "test.parquet"), "--memory-size", "640", "--out", str(out),
    ])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "segmentation (HummingBird)" in captured.out and "| embedding+grad_dense | 96 |" in captured.out
    assert "(at most 10 per image)" in captured.out and "k=30, cross-attention T=0.02" in captured.out
    for name in ("report.png", "example.png"):
        assert (out / name).read_bytes()[:8] == PNG_SIGNATURE
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["memory_patches"] == 600 and "example" not in report
    assert report["results"][0]["details"]["class_iou"][0].keys() == {"0", "1", "2", "3"}


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--pca", "8"], "takes no --pca"),
        (["--mask-column", "label"], "mask column 'label' not found"),
        (["--knn-index", "ivf", "--memory-size", "0"], "expected a positive integer"),
    ],
)
def test_cli_refuses_bad_segmentation_input(scene_features, capsys, monkeypatch, extra, message) -> None:
    monkeypatch.setattr(cli, "COMMANDS", {"eval": "pipelines.commands.evaluate"})
    args = ["eval", "--task", "segmentation", "--train", str(scene_features / "train.parquet"),
            "--test", str(scene_features / "test.parquet"), *extra]
    if "expected" in message:
        with pytest.raises(SystemExit):
            cli.main(args)
    else:
        assert cli.main(args) == 2
    assert message in capsys.readouterr().err


def test_cli_tells_dense_and_global_tables_apart(scene_features, tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setattr(cli, "COMMANDS", {"eval": "pipelines.commands.evaluate"})
    dense = str(scene_features / "train.parquet")
    assert cli.main(["eval", "--train", dense, "--test", dense, "--label-column", "mask"]) == 2
    assert "per-patch features (a dense table): use --task segmentation" in capsys.readouterr().err
    glob = tmp_path / "global.parquet"
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": ["a"], "mask": [b"x"], "embedding": pa.FixedSizeListArray.from_arrays(pa.array([1.0], pa.float32()), 1)}), glob)
    assert cli.main(["eval", "--task", "segmentation", "--train", str(glob), "--test", dense]) == 2
    assert "is not a dense feature table" in capsys.readouterr().err


def test_report_files_include_the_example(scene_features, tmp_path) -> None:
    report = evaluate_segmentation(scene_features / "train.parquet", scene_features / "test.parquet", memory_size=600)
    paths = write_report(report, tmp_path / "out")
    assert set(paths) == {"markdown", "json", "png", "example"}
    assert report.example.image.shape == (64, 64, 3) and set(report.example.predictions) == {
        "embedding", "grad_dense", "embedding+grad_dense"
    }
    assert "| class | embedding IoU (%) |" in paths["markdown"].read_text()
