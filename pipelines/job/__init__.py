"""A featurization run, one module per step: Parquet or a lake table in -> FUNGI features out.

:func:`run_featurize` (:mod:`pipelines.job.run`) is the entry point; the steps it takes, in
order:

- :mod:`~pipelines.job.spec_resolution`: the feature spec, resolved from the model in a child
  process while Ray starts;
- :mod:`~pipelines.job.plan`: which input files (sources) the night touches and why, the id
  check (duplicates, ids that moved between files);
- :mod:`~pipelines.job.setup_rows`: the setup state (SimCLR negatives, a dense spec's support
  index), drawn from the input or reused;
- :mod:`~pipelines.job.stream`: the Ray Data stream (or, for a small job, the same functions in
  the driver's process) through the stages

  1. :mod:`~pipelines.job.read`: one task per input file, its rows whose id or content is new;
  2. :mod:`~pipelines.job.decode`: CPU tasks, payload -> compact canonical form;
  3. :mod:`~pipelines.job.actor`: the actor pool that keeps the frozen model loaded;
  4. :mod:`~pipelines.job.stage`: each block's rows, per source, into the run's staging area;
  5. :mod:`~pipelines.job.finalize`: one task per touched source, its new data and error file;
- :mod:`~pipelines.job.summary`: what the run did, for the manifest and the user.

Rows travel as Arrow tables. A row that fails anywhere keeps flowing with its error
message in ``ERROR_COLUMN`` and the stage in ``STAGE_COLUMN`` (:mod:`pipelines.layout`), so
it is written to the ``_errors`` table instead of vanishing, and the rest of its batch goes
on. A source whose file cannot be read (a corrupt page) fails as a whole: nothing of it is
committed and its previous output stays as it was.

A dense spec (per-patch features, :mod:`fungi_ops.dense`) flows through the same stages;
the actor's featurizer and columns and the Parquet layout (``dense``) are all that differ.
Its rows are large (6 MiB of features a 512-px ViT-B image), so no stage copies the
feature columns it passes on (slices, not filters, unless rows failed), and finalize
streams a source's rows into its new file instead of holding them.
"""
from __future__ import annotations

from fungi_ops._lazy import lazy_exports

# The run's entry points, loaded on first use (PEP 562): a Ray worker that runs one stage
# (pipelines.job.read, ...) imports this package first, and needs none of the run's modules.
_EXPORTS = {
    "FeaturizeConfig": "pipelines.config",
    "FeaturizeJob": "pipelines.job.run",
    "run_featurize": "pipelines.job.run",
}
__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
