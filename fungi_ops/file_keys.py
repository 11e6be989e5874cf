"""The names a feature file's writer and its readers share: its id column and its schema metadata keys.

``pipelines`` writes them (:mod:`pipelines.layout`), :mod:`fungi_ops.eval.io` and
:mod:`fungi_ops.dense_table` read them. A module of its own, importing nothing, so that a
Ray worker that only names a column does not import the readers' pyarrow.dataset and pandas.
"""
from __future__ import annotations

ID_COLUMN = "id"
SPEC_KEY = b"fungi.spec"  # the resolved spec (JSON) in every feature file's Parquet schema metadata
SPEC_HASH_KEY = b"fungi.spec_hash"  # its hash: the files of one output agree on it
