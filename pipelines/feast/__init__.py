"""A ready Feast repository for a FUNGI feature output (``fungi feast``).

From an output's manifest and its ``fungi.spec``, :func:`pipelines.feast.repo.write_feast_repo`
writes into a Feast repository directory:

* ``fungi_<name>.py``, the definitions of one output, rewritten on every run (keep your
  own definitions in other files of the repository: they are never touched):

  - an entity ``<name>`` on the ``id`` column;
  - a ``FileSource`` on the output's Parquet files, ``timestamp_field="event_time"``:
    the folder ``OUT.history`` beside the output (every row version, append-only) when the job ran
    with ``--history``, else the glob ``OUT/*.parquet`` of the current files (then
    point-in-time joins are correct only for rows never changed; a glob because Feast's
    file offline store reads a folder recursively, ``_errors/`` included). Local paths are
    absolute; ``s3://`` keeps the endpoint (``--storage-options`` ``endpoint_url``, else
    ``AWS_ENDPOINT_URL``) as ``s3_endpoint_override``; credentials stay in the environment;
  - a feature view ``<name>_<spec hash[:8]>``: ``embedding`` (``Array(Float32)``,
    vector-indexed, ``COSINE``), each ``grad_<objective>`` (``Array(Float32)``),
    ``content_hash`` and the kept columns; tags ``fungi.spec_hash``, ``fungi.model``,
    ``fungi.objectives``, ``fungi.spec`` (the whole spec), ...;
  - a feature view ``<name>_<spec hash[:8]>_fungi`` with one vector-indexed feature
    ``fungi``: the FUNGI concatenation (each block L2-normalised, concatenated,
    L2-normalised again: cosine on it is the paper's comparison). Feast's SQLite store
    indexes one field per view and searches stored columns only, so these vectors are
    written by ``fungi feast`` as Parquet under ``data/fungi/<name>/<spec hash>/`` of the
    repository (one file per source file, refreshed when a source file is new or
    changed; ``--no-fungi-view`` leaves it out);
  - a feature service ``<name>``: both views of the output's current spec, a name that
    stays when the spec changes.

* ``feature_store.yaml`` when the repository has none: the local provider, the file
  offline store (the ``duckdb`` one for a Delta or Iceberg output: Feast's file store reads
  no Delta table), and Feast's SQLite online store with vector search (:mod:`pipelines.feast.online_store`);
  an existing one is never rewritten.

A Delta or Iceberg output (``delta:PATH``, ``iceberg:NS.TABLE``) is read by Feast's duckdb
offline store. Time travel is the table's own: every version keeps its data files until
``fungi vacuum``, so the source is the glob of the table's data files, every row version the
table keeps (:meth:`pipelines.formats.table.LakeTable.row_version_files`), and a
point-in-time join finds each row as it was at the entity's timestamp, back to the oldest
kept version, as ``--history`` gives a folder. With ``current_version`` (``fungi feast
--current-version``), a Delta output is a ``FileSource`` with ``file_format=DeltaFormat()``
on the table: its current rows only, point-in-time correct for rows never changed (an
Iceberg table's current snapshot is Feast's ``IcebergSource``, with the catalog's settings:
not written here).

Every run also finds the ids the output no longer holds and removes them from the online
store (:mod:`pipelines.feast.deletions`); :func:`~pipelines.feast.repo.materialize_repo` (``--materialize``)
applies and materializes first, so that the removal follows the materialization.

A second spec (another model or seed, featurized into another output) becomes another
definitions file and feature views; re-running for the same output updates its file in
place (a new spec there replaces the views of the old one).

The modules, in the order a run uses them: :mod:`~pipelines.feast.output` (the output as Feast
reads it), :mod:`~pipelines.feast.vectors` (the FUNGI vectors), :mod:`~pipelines.feast.definitions`
(the generated ``fungi_<name>.py``), :mod:`~pipelines.feast.repo` (the writer, the command's
entry point), :mod:`~pipelines.feast.deletions` (ids removed from the online store) and
:mod:`~pipelines.feast.online_store` (the SQLite online store Feast loads; it imports Feast).
"""
from __future__ import annotations

STORE_TYPE = "pipelines.feast_online.FungiSqliteOnlineStore"
"""The online store's dotted path as ``feature_store.yaml`` names it: ``pipelines.feast_online`` re-exports
:mod:`pipelines.feast.online_store`, so that the repositories written before it moved keep working."""
