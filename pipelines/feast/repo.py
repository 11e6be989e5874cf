"""Write or update a Feast repository for a FUNGI feature output (``fungi feast``): :func:`write_feast_repo`.

It opens the output (:mod:`pipelines.feast.output`), writes its FUNGI vectors
(:mod:`pipelines.feast.vectors`) and its definitions file (:mod:`pipelines.feast.definitions`),
``feature_store.yaml`` when the repository has none, and removes the ids the output no longer
holds from the online store (:mod:`pipelines.feast.deletions`); :func:`materialize_repo`
(``--materialize``) applies and materializes first. :func:`describe` is what the command prints.
"""
from __future__ import annotations

import os
import posixpath
import re
import shutil
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable

from fungi_ops.errors import ConfigError
from pipelines.feast import STORE_TYPE
from pipelines.feast.definitions import (
    DEFINITIONS_PREFIX, definitions_source, feast_type, load_definitions, read_header, repo_name,
)
from pipelines.feast.deletions import remove_deleted_ids, served_folder, track_deletions
from pipelines.feast.output import FeatureOutput, open_feature_output
from pipelines.feast.vectors import sync_fungi_vectors
from pipelines.formats.address import DELTA, ICEBERG, PARQUET, parse_address
from pipelines.layout import CONTENT_HASH_COLUMN

DUCKDB_STORE = "duckdb"  # Feast's offline store that reads Delta and Parquet globs (a table's data files)
TABLE_NAMES = {DELTA: "a Delta", ICEBERG: "an Iceberg"}  # with their article, for messages


@dataclass
class RepoUpdate:
    """What :func:`write_feast_repo` wrote."""

    repo: Path
    definitions: Path
    name: str
    entity: str
    feature_view: str
    fungi_view: str | None
    source: str
    source_kind: str  # "history" or "current"
    features: list[str]
    skipped_columns: list[str]
    config_written: bool
    fungi_files_written: int = 0
    fungi_files_kept: int = 0
    removed_views: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    deleted_found: int = 0  # ids the output lost since the last run (pipelines.feast.deletions)
    deleted_removed: int = 0  # ids removed from the online store by this run
    deleted_pending: int = 0  # ids deleted from the output that the online store may still serve
    materialized: bool = False  # `--materialize`: applied and materialized by this run

    @property
    def views(self) -> list[str]:
        """The feature views written for the output, in order."""
        return [v for v in (self.feature_view, self.fungi_view) if v]


def write_feast_repo(
    output: str,
    repo: str | os.PathLike,
    *,
    name: str | None = None,
    project: str = "fungi",
    storage_options: dict[str, Any] | None = None,
    fungi_view: bool = True,
    current_version: bool = False,
    catalog: str | None = None,
) -> RepoUpdate:
    """Write or update the Feast repository ``repo`` for the feature output ``output``.

    ``current_version``: the output's current rows only (see the module docstring); ``catalog``:
    an Iceberg output's catalog (``--catalog``).
    """
    source = open_feature_output(output, storage_options, current_version=current_version, catalog=catalog)
    repo_path = Path(repo).resolve()
    if repo_path.exists() and not repo_path.is_dir():
        raise ConfigError(f"--repo {repo} is a file, not a directory")
    address = parse_address(output)
    default = (address.identifier[-1] if address.kind == ICEBERG else posixpath.basename(address.target.rstrip("/")))
    name = repo_name(name if name is not None else default or "features", explicit=name is not None)
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", project):
        raise ConfigError(f"--project '{project}' must be letters, digits, '_' and '-', not starting with '_' or '-'")
    definitions = repo_path / f"{DEFINITIONS_PREFIX}{name}.py"
    previous = read_header(definitions)
    if previous is not None and previous.get("output") != source.root:
        raise ConfigError(
            f"{definitions} serves another output ({previous.get('output')}); pass --name to add {source.root} "
            "beside it, or delete that file to replace it"
        )
    view = f"{name}_{source.spec_hash[:8]}"
    concat_view = f"{view}_fungi" if fungi_view else None
    kept, skipped = [], []
    for column in source.kept_columns:
        kind = feast_type(column.type)
        if kind:
            kept.append((column.name, kind))
        else:
            skipped.append(f"{column.name} ({column.type})")
    update = RepoUpdate(
        repo=repo_path, definitions=definitions, name=name, entity=name, feature_view=view, fungi_view=concat_view,
        source=source.source_path, source_kind="history" if source.history else "current",
        features=[*source.vector_columns, CONTENT_HASH_COLUMN, *(n for n, _ in kept)], skipped_columns=skipped,
        config_written=False,
    )
    note = _source_note(output, source)
    update.notes.extend([note] if note else [])
    if skipped:
        update.notes.append(f"left out (no Feast type): {', '.join(skipped)}")
    repo_path.mkdir(parents=True, exist_ok=True)
    update.config_written = _write_config(repo_path, project, update.notes, "file" if source.kind == PARQUET else DUCKDB_STORE)
    if source.kind == DELTA and not source.history:  # DuckDB reads DeltaFormat through its delta extension
        _install_duckdb_delta(update.notes)

    mirror = _refresh_fungi_vectors(source, update, repo_path / "data" / "fungi" / name)
    if previous:
        update.removed_views = [v for v in previous.get("views", []) if v not in update.views]

    text = definitions_source(source, update, kept, mirror)
    if not definitions.exists() or definitions.read_text() != text:
        temporary = definitions.with_suffix(".py.tmp")
        temporary.write_text(text)
        temporary.replace(definitions)
    served = served_folder(repo_path, name)
    update.deleted_found = track_deletions(source, served)
    _remove_deleted(update)
    return update


def materialize_repo(update: RepoUpdate, end: datetime | None = None) -> RepoUpdate:
    """``fungi feast --materialize``: apply the output's definitions, materialize its views up to ``end``
    (now), then remove the ids the output no longer holds from the online store.

    In this order, the removal follows the materialization, which pushes every id its window
    holds (a ``--history`` source keeps the last version of a deleted id). Only fungi's objects are
    applied (your own definitions are left to ``feast apply``); the views of the output's earlier spec
    are deleted.
    """
    from feast import FeatureStore

    store = FeatureStore(repo_path=str(update.repo))
    stale = [v for v in store.list_feature_views() if v.name in update.removed_views]
    store.apply(load_definitions(update.repo), objects_to_delete=stale, partial=not stale)
    store.materialize_incremental(end_date=end or datetime.now(timezone.utc), feature_views=update.views)
    update.materialized = True
    _remove_deleted(update)
    return update


def _remove_deleted(update: RepoUpdate) -> None:
    """Remove the pending deleted ids from the online store (see :func:`remove_deleted_ids`)."""
    removed, update.deleted_pending, note = remove_deleted_ids(update.repo, update.entity,
                                                               served_folder(update.repo, update.name))
    update.deleted_removed += removed
    if note:
        update.notes.append(note)


def _source_note(output: str, source: FeatureOutput) -> str | None:
    """What the repository's source misses or keeps, for point-in-time joins (None: a folder's --history, all)."""
    if source.kind != PARQUET and source.history:
        return (
            f"{output} is {TABLE_NAMES[source.kind]} table: Feast reads every row version it keeps "
            f"({len(source.history_files)} data files), so point-in-time joins are correct back to its oldest kept "
            "version (`fungi vacuum` retires older ones); an id deleted with --prune is still found offline at its "
            "last version (the online store drops it: see `fungi feast --materialize`)"
        )
    if source.kind == DELTA:
        return (
            f"{source.uri} is a Delta table: Feast reads its current version, so point-in-time joins are correct "
            "only for rows that never changed (without --current-version Feast reads every row version it keeps)"
        )
    if source.history:
        return None
    return (
        f"{source.uri} was featurized without --history: Feast reads its current files, so point-in-time joins "
        "are correct only for rows that never changed (featurize with --history to keep every row version)"
    )


def _refresh_fungi_vectors(source: FeatureOutput, update: RepoUpdate, vectors_root: Path) -> Path:
    """Bring the ``fungi`` vectors of the output's spec up to date under ``vectors_root`` (other specs'
    are deleted, and all of them without a fungi view); the folder of this spec's."""
    mirror = vectors_root / source.spec_hash
    if update.fungi_view:
        update.fungi_files_written, update.fungi_files_kept = sync_fungi_vectors(source, mirror)
    for stale in sorted(vectors_root.glob("*")) if vectors_root.exists() else []:
        if stale.is_dir() and (stale != mirror or not update.fungi_view):
            shutil.rmtree(stale)
    return mirror


def _write_config(repo: Path, project: str, notes: list[str], offline_store: str) -> bool:
    """Write ``feature_store.yaml`` when missing (True); an existing one is checked, never rewritten."""
    path = repo / "feature_store.yaml"
    if path.exists():
        import yaml

        try:
            config = yaml.safe_load(path.read_text()) or {}
            store = (config.get("online_store") or {}) if isinstance(config, dict) else {}
            offline = (config.get("offline_store") or {}) if isinstance(config, dict) else {}
        except yaml.YAMLError:
            store = offline = {}
        if offline_store == DUCKDB_STORE and (not isinstance(offline, dict) or offline.get("type") != DUCKDB_STORE):
            raise ConfigError(
                f"{path}: a Delta or Iceberg output is served by Feast's {DUCKDB_STORE} offline store, and this "
                f"repository's is {offline.get('type') if isinstance(offline, dict) else offline}, for which "
                "the sources of its Parquet folder outputs are written: serve the table from a repository of its own "
                "(another --repo)"
            )
        if not isinstance(store, dict) or store.get("type") != STORE_TYPE or not store.get("vector_enabled"):
            notes.append(
                f"{path} is kept as it is; vector search with sqlite-vec needs its online_store to be "
                f"type: {STORE_TYPE} with vector_enabled: true"
            )
        return False
    path.write_text(
        "# Written by `fungi feast` (never rewritten: edit freely). The local provider; the offline store reads\n"
        "# the sources (`file`: Parquet folders; `duckdb`: also the data files of Delta and Iceberg tables); the\n"
        "# SQLite online store with sqlite-vec vector search (pipelines/feast/online_store.py).\n"
        f"project: {project}\n"
        "provider: local\n"
        "registry: data/registry.db\n"
        "offline_store:\n"
        f"  type: {offline_store}\n"
        "online_store:\n"
        f"  type: {STORE_TYPE}\n"
        "  path: data/online.db\n"
        "  vector_enabled: true\n"
        "entity_key_serialization_version: 3\n"
    )
    return True


def _install_duckdb_delta(notes: list[str]) -> None:
    """Make DuckDB's ``delta`` extension available offline, from the ``duckdb-extension-delta`` wheel.

    Feast's duckdb offline store reads Delta through ibis, which asks DuckDB to ``INSTALL
    delta`` (a download) unless the extension is installed already; installing it once from
    the wheel's file means no node needs the extension server.
    """
    import duckdb

    installed = duckdb.sql(
        "SELECT installed FROM duckdb_extensions() WHERE extension_name = 'delta'"
    ).fetchone()
    if installed and installed[0]:
        return
    try:
        import duckdb_extension_delta
    except ImportError:
        notes.append("DuckDB's delta extension is not installed: Feast's first read downloads it "
                     "(offline: pip install duckdb-extension-delta matching your duckdb version)")
        return
    folder = Path(duckdb_extension_delta.__file__).parent / "extensions" / f"v{duckdb.__version__}"
    files = sorted(folder.glob("delta.duckdb_extension"))
    if not files:
        notes.append(f"duckdb-extension-delta has no extension for duckdb {duckdb.__version__}: install the matching "
                     "version, or let Feast's first read download it")
        return
    duckdb.install_extension(str(files[0]))


def describe(update: RepoUpdate) -> Iterable[str]:
    """The lines ``fungi feast`` prints."""
    verb = "wrote" if update.config_written else "kept"
    yield f"{verb} {update.repo / 'feature_store.yaml'}"
    yield (
        f"wrote {update.definitions}: entity {update.entity} (id), feature view {update.feature_view} "
        f"({', '.join(update.features)})" + (f", feature view {update.fungi_view} (fungi)" if update.fungi_view else "")
        + f", feature service {update.name}"
    )
    yield f"source: {update.source} ({'every row version' if update.source_kind == 'history' else 'current rows'})"
    if update.fungi_view:
        yield f"FUNGI vectors: {update.fungi_files_written} file(s) written, {update.fungi_files_kept} up to date"
    if update.removed_views:
        yield f"removed views: {', '.join(update.removed_views)} (`feast apply` deletes them)"
    if update.materialized:
        yield f"applied and materialized: {', '.join(update.views)}"
    if update.deleted_found or update.deleted_removed or update.deleted_pending:
        line = (f"deleted ids: {update.deleted_found} gone from the output since the last run, "
                f"{update.deleted_removed} removed from the online store")
        if update.deleted_pending:
            line += (f", {update.deleted_pending} to remove once every view is materialized "
                     "(`fungi feast --materialize` does it in one step)")
        yield line
    for note in update.notes:
        yield f"note: {note}"
    if not update.materialized:
        yield (
            f"next: feast -c {update.repo} apply && "
            f"feast -c {update.repo} materialize-incremental $(date -u +%Y-%m-%dT%H:%M:%S); or this command with "
            "--materialize, which also removes the ids the output deleted, after materializing"
        )
