"""Tests of fungi_ops.eval on synthetic data whose right answers are known."""
from __future__ import annotations

import json
import warnings

import matplotlib.image
import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from sklearn.decomposition import PCA as SklearnPCA

from fungi_ops.eval import (
    EvalInputError,
    cluster_accuracy,
    clustering_scores,
    kmeans,
    EvalWarning,
    FeatureTable,
    evaluate,
    feature_combinations,
    few_shot_indices,
    fit_pca,
    knn_classify,
    knn_search,
    knn_vote,
    linear_probe,
    load_feature_table,
    prepare_features,
    retrieval_metrics,
    write_report,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def clustered(n_per_class: int, n_classes: int, dim: int, seed: int, spread: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """Well-separated Gaussian classes: random unit centres plus small isotropic noise."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_classes, dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    labels = np.repeat(np.arange(n_classes), n_per_class)
    x = centres[labels] + spread * rng.normal(size=(labels.size, dim))
    return x.astype(np.float32), labels


def make_split(seed: int, n_per_class: int = 20, n_classes: int = 4, spec_hash: str | None = "h1") -> FeatureTable:
    """A split with an embedding and two gradient blocks that all separate the classes."""
    rng = np.random.default_rng(1000 + seed)
    emb, labels = clustered(n_per_class, n_classes, 12, seed=0)
    kl, _ = clustered(n_per_class, n_classes, 8, seed=1)
    dino, _ = clustered(n_per_class, n_classes, 6, seed=2)
    noise = lambda x: (x + 0.05 * rng.normal(size=x.shape)).astype(np.float32)  # noqa: E731
    return FeatureTable(
        ids=np.arange(labels.size) + 100 * seed,
        features={"embedding": noise(emb), "grad_kl": noise(kl), "grad_dino": noise(dino)},
        labels=labels,
        spec_hash=spec_hash,
        source=f"split{seed}",
        label_column="label",
    )


def fixed_size_list(x: np.ndarray) -> pa.FixedSizeListArray:
    return pa.FixedSizeListArray.from_arrays(pa.array(x.astype(np.float32).ravel()), x.shape[1])


def write_features(path, features: dict[str, np.ndarray], labels, ids=None, spec_hash: str | None = "h1") -> None:
    n = len(labels)
    columns = {
        "id": pa.array(np.arange(n) if ids is None else ids),
        "label": labels if isinstance(labels, pa.Array) else pa.array(labels),
    }
    columns.update({name: fixed_size_list(x) for name, x in features.items()})
    metadata = {} if spec_hash is None else {b"fungi.spec_hash": spec_hash.encode(), b"fungi.spec": b'{"backbone": "toy"}'}
    pq.write_table(pa.table(columns).replace_schema_metadata(metadata), path)


# --- combinations -----------------------------------------------------------------------


def test_feature_combinations_follow_the_paper_order():
    every = ["grad_simclr", "grad_dino", "embedding", "grad_kl"]
    assert feature_combinations(every) == [
        ("embedding",), ("grad_kl",), ("grad_dino",), ("grad_simclr",),
        ("embedding", "grad_kl"), ("embedding", "grad_kl", "grad_dino"),
        ("embedding", "grad_kl", "grad_dino", "grad_simclr"),
    ]
    assert feature_combinations(["grad_dino", "embedding"]) == [
        ("embedding",), ("grad_dino",), ("embedding", "grad_dino"),
    ]
    assert feature_combinations(["embedding"]) == [("embedding",)]


def test_blocks_are_normalised_before_concatenation():
    table = make_split(0)
    table.features["grad_kl"][:] *= 1000.0  # a block's scale must not matter
    prepared = prepare_features(table, table, ["embedding", "grad_kl"])
    half = prepared.train[:, :12]
    np.testing.assert_allclose(np.linalg.norm(prepared.train, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(half, axis=1), np.sqrt(0.5), rtol=1e-5)


# --- k-NN -------------------------------------------------------------------------------


def test_chunked_knn_search_equals_brute_force():
    rng = np.random.default_rng(0)
    train = rng.normal(size=(301, 16)).astype(np.float32)
    queries = rng.normal(size=(53, 16)).astype(np.float32)
    sims, idx = knn_search(queries, train, 7, query_chunk=10, train_chunk=37, device="cpu")
    full = queries @ train.T
    expected_idx = np.argsort(-full, axis=1)[:, :7]
    np.testing.assert_array_equal(idx, expected_idx)
    np.testing.assert_allclose(sims, np.take_along_axis(full, expected_idx, axis=1), rtol=1e-5, atol=1e-5)


def test_weighted_vote_trusts_close_neighbours_majority_counts_them():
    # One very similar neighbour of class 1 against two clearly less similar ones of class 0.
    sims = np.array([[0.95, 0.70, 0.69]], dtype=np.float32)
    labels = np.array([[1, 0, 0]])
    assert knn_vote(sims, labels, 2, vote="weighted", temperature=0.07)[0] == 1
    assert knn_vote(sims, labels, 2, vote="majority")[0] == 0
    # Majority tie (one vote each) goes to the larger summed similarity.
    assert knn_vote(np.array([[0.5, 0.9]], dtype=np.float32), np.array([[0, 1]]), 2, vote="majority")[0] == 1


@pytest.mark.parametrize("task", ["knn", "linear", "retrieval", "clustering"])
def test_separated_classes_score_perfectly(task):
    report = evaluate(make_split(0), make_split(1), task=task, c_grid=(0.1, 1.0), device="cpu")
    assert [r.name for r in report.results] == [
        "embedding", "grad_kl", "grad_dino", "embedding+grad_kl", "embedding+grad_kl+grad_dino",
    ]
    for result in report.results:
        for metric in report.metric_names:
            assert result.metrics[metric].mean == pytest.approx(1.0), (result.name, metric)


def test_shuffled_train_labels_give_chance_accuracy():
    train, test = make_split(0, n_per_class=50), make_split(1, n_per_class=50)
    shuffled = np.random.default_rng(3).permutation(train.labels)
    train = FeatureTable(ids=train.ids, features=train.features, labels=shuffled, source="shuffled")
    report = evaluate(train, test, features=["embedding"], device="cpu")
    assert report.results[0].metrics["accuracy"].mean == pytest.approx(0.25, abs=0.1)


def test_k_larger_than_train_is_clamped_with_a_warning():
    train = make_split(0, n_per_class=2)  # 8 rows
    with pytest.warns(EvalWarning, match="k=20 exceeds the 8 train rows"):
        report = evaluate(train, make_split(1), features=["embedding"], device="cpu")
    assert report.settings["k"] == 8 and report.settings["k_requested"] == 20


def test_knn_classify_on_clusters_uses_class_indices():
    x, y = clustered(10, 3, 5, seed=4)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    np.testing.assert_array_equal(knn_classify(x, y, x, 3, k=5, device="cpu"), y)


# --- PCA --------------------------------------------------------------------------------


def test_pca_is_fitted_on_train_rows_only():
    train = make_split(0)
    test_a = make_split(1)
    test_b = FeatureTable(
        ids=test_a.ids,
        features={name: x * 3.0 + 1.0 for name, x in test_a.features.items()},
        labels=test_a.labels,
        source="changed",
    )
    a = prepare_features(train, test_a, ["embedding", "grad_kl"], pca_dim=5, device="cpu")
    b = prepare_features(train, test_b, ["embedding", "grad_kl"], pca_dim=5, device="cpu")
    np.testing.assert_array_equal(a.train, b.train)
    np.testing.assert_array_equal(a.pca.components, b.pca.components)
    assert a.dim == 5 and a.input_dim == 20


def test_pca_matches_sklearn_up_to_sign():
    x = np.random.default_rng(5).normal(size=(200, 10)).astype(np.float32) * np.arange(1, 11, dtype=np.float32)
    ours = fit_pca(x, 4, chunk_rows=33, device="cpu")
    reference = SklearnPCA(4, svd_solver="full").fit(x)
    projected = ours.transform(x, device="cpu")
    np.testing.assert_allclose(np.abs(projected), np.abs(reference.transform(x)), rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(ours.explained_variance, reference.explained_variance_, rtol=1e-4)


def test_pca_dimension_above_feature_dimension_is_clamped():
    with pytest.warns(EvalWarning, match="using 12"):
        report = evaluate(make_split(0), make_split(1), features=["embedding"], pca=64, device="cpu")
    assert report.results[0].dim == 12


# --- few-shot ---------------------------------------------------------------------------


def test_few_shot_sampling_is_stratified_and_seeded():
    labels = np.array(["a"] * 10 + ["b"] * 7 + ["c"] * 3)
    first = few_shot_indices(labels, 3, seed=0)
    assert sorted(np.unique(labels[first], return_counts=True)[1]) == [3, 3, 3]
    np.testing.assert_array_equal(first, few_shot_indices(labels, 3, seed=0))
    draws = {tuple(few_shot_indices(labels, 3, seed=s)) for s in range(5)}
    assert len(draws) > 1


def test_few_shot_with_too_few_examples_names_the_class():
    labels = np.array(["a"] * 10 + ["b"] * 2)
    with pytest.raises(EvalInputError, match=r"'b' \(2\)"):
        few_shot_indices(labels, 3, seed=0)


def test_few_shot_evaluation_reports_mean_and_spread_over_seeds():
    report = evaluate(
        make_split(0), make_split(1), task="linear", features=["embedding"], shots=2, seeds=3,
        c_grid=(1.0,), device="cpu",
    )
    summary = report.results[0].metrics["accuracy"]
    assert len(summary.values) == 3
    assert summary.mean == pytest.approx(np.mean(summary.values))
    assert summary.std == pytest.approx(np.std(summary.values))
    assert report.settings["seeds"] == [0, 1, 2] and report.settings["shots"] == 2


def test_seeds_without_shots_is_rejected():
    with pytest.raises(EvalInputError, match="shots"):
        evaluate(make_split(0), make_split(1), seeds=3)


# --- linear probe -----------------------------------------------------------------------


def test_linear_probe_selects_c_on_held_out_rows_and_falls_back_for_one_shot():
    x, y = clustered(10, 3, 6, seed=6)
    result = linear_probe(x, y, x, c_grid=(0.01, 1.0), seed=0)
    assert result.c in (0.01, 1.0) and result.validation_accuracy is not None
    np.testing.assert_array_equal(result.predictions, y)
    one_shot = np.array([0, 10, 20])
    with pytest.warns(EvalWarning, match="using C=1.0"):
        fallback = linear_probe(x[one_shot], y[one_shot], x, c_grid=(0.01, 1.0))
    assert fallback.c == 1.0 and fallback.validation_accuracy is None


# --- retrieval --------------------------------------------------------------------------


def test_retrieval_map_on_a_hand_computed_case():
    # Gallery at angles 0..40 degrees from the query: the ranking is the gallery order.
    angles = np.deg2rad([0, 10, 20, 30, 40])
    gallery = np.stack([np.cos(angles), np.sin(angles)], axis=1).astype(np.float32)
    relevance = np.array([1, 0, 1, 0, 1])  # R = 3 relevant items at ranks 1, 3, 5
    query = np.array([[1.0, 0.0]], dtype=np.float32)
    found = retrieval_metrics(query, np.array([1]), gallery, relevance, device="cpu")
    assert found.mean_average_precision == pytest.approx((1 / 1 + 2 / 3 + 3 / 5) / 3)
    assert found.map_at_r == pytest.approx((1 / 1 + 2 / 3) / 3)  # only ranks <= R = 3
    assert (found.n_queries, found.n_skipped) == (1, 0)


def test_retrieval_skips_queries_without_relevant_gallery_rows():
    gallery = np.eye(3, dtype=np.float32)
    found = retrieval_metrics(gallery[:2], np.array([0, 9]), gallery, np.array([0, 1, 2]), device="cpu")
    assert (found.mean_average_precision, found.n_queries, found.n_skipped) == (1.0, 1, 1)
    with pytest.raises(EvalInputError, match="no retrieval query"):
        retrieval_metrics(gallery[:1], np.array([9]), gallery, np.array([0, 1, 2]), device="cpu")


# --- clustering -------------------------------------------------------------------------


def test_clustering_scores_on_a_hand_computed_case():
    labels = np.array([0, 0, 0, 1, 1, 1])
    clusters = np.array([7, 7, 3, 3, 3, 3])  # contingency: class 0 -> {7: 2, 3: 1}, class 1 -> {3: 3}
    scores = clustering_scores(labels, clusters)
    # ARI: pairs within cells 1+0+3 = 4, within classes 3+3 = 6, within clusters 6+1 = 7, of 15.
    expected_pairs = 6 * 7 / 15
    assert scores.ari == pytest.approx((4 - expected_pairs) / ((6 + 7) / 2 - expected_pairs))  # = 12/37
    mutual_information = np.log(2) / 6 + np.log(1.5) / 2
    class_entropy = np.log(2)
    cluster_entropy = -(2 / 3 * np.log(2 / 3) + 1 / 3 * np.log(1 / 3))
    assert scores.nmi == pytest.approx(mutual_information / ((class_entropy + cluster_entropy) / 2))
    assert scores.accuracy == pytest.approx(5 / 6)  # cluster 7 -> class 0 (2 rows), cluster 3 -> class 1 (3)
    renamed = clustering_scores(labels, np.array([0, 0, 5, 5, 5, 5]))
    assert renamed == scores


def test_cluster_accuracy_maps_clusters_to_classes_one_to_one():
    labels = np.array(list("AAAAABBCCC"))
    # x = {A, A, A}, y = {A, A, B}, z = {B, C, C, C}: purity (each cluster's majority) would
    # credit A twice (3 + 2 + 3 = 8/10); the best one-to-one matching is x->A, y->B, z->C.
    clusters = np.array([2, 2, 2, 0, 0, 0, 1, 1, 1, 1])
    assert cluster_accuracy(labels, clusters) == pytest.approx(0.7)
    permuted = np.array([5, 9, 4])[clusters]
    assert cluster_accuracy(labels, permuted) == pytest.approx(0.7)
    assert cluster_accuracy(labels, np.searchsorted(np.unique(labels), labels)) == 1.0


def test_clustering_with_shuffled_labels_scores_chance():
    train, test = make_split(0, n_per_class=50), make_split(1, n_per_class=50)
    shuffled = np.random.default_rng(3).permutation(test.labels)
    test = FeatureTable(ids=test.ids, features=test.features, labels=shuffled, source="shuffled", label_column="label")
    report = evaluate(train, test, task="clustering", features=["embedding"], seeds=2, device="cpu")
    metrics = report.results[0].metrics
    assert metrics["NMI"].mean < 0.05 and abs(metrics["ARI"].mean) < 0.03
    assert metrics["accuracy"].mean == pytest.approx(0.25, abs=0.1)
    original = evaluate(train, make_split(1, n_per_class=50), task="clustering", features=["embedding"], seeds=2, device="cpu")
    assert original.results[0].metrics["NMI"].mean == pytest.approx(1.0)


def test_kmeans_seeds_are_reproducible_and_matter():
    x = np.random.default_rng(8).uniform(size=(300, 4)).astype(np.float32)  # no cluster structure
    first = [kmeans(x, 6, seed=seed) for seed in range(3)]
    np.testing.assert_array_equal(first[0], kmeans(x, 6, seed=0))
    assert any(clustering_scores(first[0], other).ari < 0.99 for other in first[1:])
    assert sorted(np.unique(first[0])) == list(range(6))
    # Through the protocol: the same numbers on every call, a spread over seeds.
    table = FeatureTable(ids=np.arange(300), features={"embedding": x}, labels=first[0], source="uniform")
    runs = [evaluate(table, table, task="clustering", seeds=3, device="cpu").results[0].metrics for _ in range(2)]
    assert runs[0] == runs[1] and runs[0]["ARI"].std > 0


def test_clustering_reports_seeds_and_needs_no_train_labels():
    train = make_split(0)
    unlabelled = FeatureTable(ids=train.ids, features=train.features, source="unlabelled")
    report = evaluate(unlabelled, make_split(1), task="clustering", features=["embedding", "grad_kl"], pca=5, device="cpu")
    result = report.result("embedding+grad_kl")
    assert len(result.metrics["NMI"].values) == 5 and result.dim == 5
    assert report.settings["seeds"] == [0, 1, 2, 3, 4] and report.settings["n_clusters"] == 4
    assert report.settings["clustered_split"] == "test"


def test_clustering_rejects_one_class_too_few_rows_and_shots():
    test = make_split(1)
    one_class = FeatureTable(ids=test.ids, features=test.features, labels=np.full(test.n_rows, "cat"), source="mono")
    with pytest.raises(EvalInputError, match=r"at least 2 classes .*: mono has only class 'cat'"):
        evaluate(make_split(0), one_class, task="clustering")
    tiny = make_split(1, n_per_class=1)  # 4 rows, 4 classes: every row would be its own cluster
    with pytest.raises(EvalInputError, match="more rows than classes .*: split1 has 4 rows for 4 classes"):
        evaluate(make_split(0), tiny, task="clustering")
    with pytest.raises(EvalInputError, match="clustering takes no --shots"):
        evaluate(make_split(0), test, task="clustering", shots=2)
    with pytest.raises(EvalInputError, match="more rows than clusters: 3 rows for 5 clusters"):
        kmeans(np.eye(3, dtype=np.float32), 5, seed=0)


# --- loading and bad input ----------------------------------------------------------------


def test_load_feature_table_reads_a_directory_and_skips_bookkeeping(tmp_path):
    emb, labels = clustered(3, 2, 4, seed=7)
    kl = np.arange(12, dtype=np.float32).reshape(6, 2)
    write_features(tmp_path / "part-0.parquet", {"embedding": emb[:4], "grad_kl": kl[:4]}, labels[:4], ids=np.arange(4))
    write_features(tmp_path / "part-1.parquet", {"embedding": emb[4:], "grad_kl": kl[4:]}, labels[4:], ids=np.arange(4, 6))
    (tmp_path / "_errors").mkdir()
    write_features(tmp_path / "_errors" / "bad.parquet", {"embedding": emb[:1] * np.nan}, labels[:1])
    (tmp_path / "_fungi_manifest.json").write_text("{}")

    table = load_feature_table(tmp_path)
    order = np.argsort(table.ids)
    np.testing.assert_array_equal(table.ids[order], np.arange(6))
    np.testing.assert_array_equal(table.features["embedding"][order], emb)
    np.testing.assert_array_equal(table.features["grad_kl"][order], kl)
    np.testing.assert_array_equal(table.labels[order], labels)
    assert table.spec == {"backbone": "toy"} and table.spec_hash == "h1"
    assert table.dims == {"embedding": 4, "grad_kl": 2}

    explicit = load_feature_table(str(tmp_path / "part-0.parquet"), filesystem=pafs.LocalFileSystem(), features=["grad_kl"])
    assert list(explicit.features) == ["grad_kl"] and explicit.n_rows == 4


def test_load_feature_table_from_an_s3_uri(monkeypatch):
    server_module = pytest.importorskip("moto.server")
    server = server_module.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
        s3 = pafs.S3FileSystem(endpoint_override=f"{host}:{port}", scheme="http", region="us-east-1", allow_bucket_creation=True)
        s3.create_dir("bucket")
        emb, labels = clustered(2, 2, 3, seed=8)
        with s3.open_output_stream("bucket/features/part-0.parquet") as sink:
            write_features(sink, {"embedding": emb}, labels)
        table = load_feature_table(f"s3://bucket/features?endpoint_override={host}:{port}&scheme=http&region=us-east-1")
        np.testing.assert_array_equal(table.features["embedding"], emb)
        assert table.spec_hash == "h1"
    finally:
        server.stop()


def test_missing_label_column_names_column_and_file(tmp_path):
    path = tmp_path / "t.parquet"
    write_features(path, {"embedding": np.ones((2, 3))}, [0, 1])
    with pytest.raises(EvalInputError, match=r"label column 'class' not found in .*t\.parquet"):
        load_feature_table(path, label_column="class")


def test_nan_feature_names_row_and_column(tmp_path):
    emb = np.ones((3, 2), dtype=np.float32)
    emb[1, 0] = np.nan
    write_features(tmp_path / "t.parquet", {"embedding": emb}, [0, 1, 1], ids=np.array([7, 8, 9]))
    with pytest.raises(EvalInputError, match=r"'embedding' .* NaN .* row 1 \(id=8\)"):
        load_feature_table(tmp_path / "t.parquet")


def test_null_label_names_row(tmp_path):
    write_features(tmp_path / "t.parquet", {"embedding": np.ones((2, 2))}, pa.array(["a", None]))
    with pytest.raises(EvalInputError, match="label column 'label' .* null at row 1"):
        load_feature_table(tmp_path / "t.parquet")


def test_files_of_one_table_with_different_specs_are_rejected(tmp_path):
    write_features(tmp_path / "a.parquet", {"embedding": np.ones((2, 2))}, [0, 1], spec_hash="h1")
    write_features(tmp_path / "b.parquet", {"embedding": np.ones((2, 2))}, [0, 1], spec_hash="h2")
    with pytest.raises(EvalInputError, match=r"a\.parquet has fungi.spec_hash=h1, .*b\.parquet has h2"):
        load_feature_table(tmp_path)


def test_train_and_test_with_different_specs_or_dims_are_rejected():
    with pytest.raises(EvalInputError, match="split0 has fungi.spec_hash=h1, split1 has fungi.spec_hash=h2"):
        evaluate(make_split(0), make_split(1, spec_hash="h2"))
    test = make_split(1)
    narrow = FeatureTable(ids=test.ids, features={"embedding": test.features["embedding"][:, :5]}, labels=test.labels, source="narrow")
    with pytest.raises(EvalInputError, match="'embedding' has dimension 12 in split0 but 5 in narrow"):
        evaluate(make_split(0), narrow, features=["embedding"])


def test_test_labels_absent_from_train():
    train, test = make_split(0), make_split(1)
    relabelled = np.where(test.labels == 3, 99, test.labels)
    partly = FeatureTable(ids=test.ids, features=test.features, labels=relabelled, source="partly")
    with pytest.warns(EvalWarning, match="20 test rows of partly have labels absent"):
        report = evaluate(train, partly, features=["embedding"], device="cpu")
    assert report.results[0].metrics["accuracy"].mean == pytest.approx(0.75)
    assert report.settings["test_rows_unseen_label"] == 20
    strings = FeatureTable(ids=test.ids, features=test.features, labels=test.labels.astype(str), source="strings")
    with pytest.raises(EvalInputError, match="no label of strings"):
        evaluate(train, strings)


# --- report -----------------------------------------------------------------------------


def test_write_report_creates_markdown_json_and_png(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", EvalWarning)
        report = evaluate(make_split(0), make_split(1), task="retrieval", shots=3, seeds=2, device="cpu")
    paths = write_report(report, tmp_path / "out")
    assert paths["png"].read_bytes()[:8] == PNG_SIGNATURE
    assert matplotlib.image.imread(paths["png"]).ndim == 3
    data = json.loads(paths["json"].read_text())
    assert [r["name"] for r in data["results"]] == [r.name for r in report.results]
    assert data["results"][0]["metrics"]["mAP"]["values"] == list(report.results[0].metrics["mAP"].values)
    assert data["settings"]["train"]["spec_hash"] == "h1"
    markdown = paths["markdown"].read_text()
    assert "| features | dim | mAP (%) | mAP@R (%) |" in markdown
    assert "| embedding+grad_kl+grad_dino | 26 |" in markdown and " ± " in markdown
