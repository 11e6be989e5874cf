"""Input sources: a Parquet folder's files, a Delta version's or an Iceberg snapshot's data files.

A job's unit of input is a **source**: one data file, with lineage (its output rows live in
one output file). :func:`list_sources` lists them for any ``--input`` / ``--setup-from`` /
``--support-from`` address, with no data file opened:

* a Parquet folder: its files (:func:`list_parquet`), identity = modification time (ETag on S3);
  a folder that is a table's own folder is refused (its files include deleted rows);
* ``delta:PATH``: the add actions of the table's current version (``deltalake``). Data files
  are immutable: a delete, update, merge or compaction removes files and adds new ones, so a
  removed file is a source gone from the input (``--prune`` removes its rows), ids now in a
  new file have moved, and a new file is a new source. A file's deletion vector (rows a
  DELETE, UPDATE or MERGE marked deleted in place) is part of its identity (a new or grown
  vector makes the source changed) and is applied wherever its rows are read;
* ``iceberg:NS.TABLE``: the current snapshot's file scan tasks (pyiceberg), one source per
  data file; the positional delete files that apply to it are part of its identity (a new
  delete file makes the source changed) and are applied wherever its rows are read.

:func:`read_batches` / :func:`read_columns` are the one reader of a source's live rows for
every stage that reads input rows (the stream's read stage, the id checks, the setup-row
draw, finalize's prune, the row counts of files with deletes).

Refused, with the fix named: Delta column mapping (physical column names differ from the
table's); Iceberg equality deletes (pyiceberg cannot apply them).

``deltalake`` applies deletion vectors only to whole-table scans: its add actions do not carry
them, and ``DeltaTable.deletion_vectors()`` materializes every file's keep mask, one bool per
row, on the driver. So :func:`delta_deletion_vectors` reads the vectors' descriptors from the
log itself (the newest checkpoint and the commits after it, O(files)), and a worker decodes
one file's vector when it reads that file (RoaringBitmap, ``pyroaring``).
"""
from __future__ import annotations

import hashlib
import json
import posixpath
import re
import uuid
import zlib
from dataclasses import dataclass
from typing import Any, Iterator, Sequence
from urllib.parse import unquote, urlparse

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from fungi_ops.errors import ConfigError
from pipelines.formats.address import DELTA, ICEBERG, TableAddress, load_catalog, parse_address, refuse_table_folder
from pipelines.storage import InputFile, Location, exists, list_files
from pipelines.tasks import Tasks

FIELD_ID_KEY = b"PARQUET:field_id"


@dataclass(frozen=True)
class IcebergRead:
    """How to read one Iceberg data file's live rows (travels to Ray workers with its :class:`InputFile`).

    ``data_uri`` is the file's path as the table's delete files name it; ``deletes`` the
    positional delete files that apply to it (paths on the input's filesystem);
    ``field_ids`` the table's column names and Iceberg field ids, so that a file written
    before a column was renamed is read by field id, not by its old name; ``name_mapping``
    the table's name mapping (``schema.name-mapping.default``: each field id's names, the old
    ones included), how a file without field ids (one added with ``add_files``) is read.
    """

    data_uri: str
    deletes: tuple[str, ...]
    field_ids: tuple[tuple[str, int], ...]
    name_mapping: tuple[tuple[int, tuple[str, ...]], ...] = ()


@dataclass(frozen=True)
class DeltaRead:
    """How to read one Delta data file's live rows: without the rows its deletion vector deletes.

    The vector as its add action describes it (the Delta protocol's ``deletionVector``):
    ``inline`` its Z85 text when stored in the log (``storageType`` ``i``), else ``path`` the
    vector file on the input's filesystem and ``offset`` where its size field starts;
    ``size`` its serialized bytes, ``cardinality`` the rows it deletes.
    """

    unique_id: str
    cardinality: int
    size: int
    inline: str | None = None
    path: str | None = None
    offset: int | None = None


@dataclass(frozen=True)
class InputListing:
    """What an input address holds now: its sources and, for a table, the version they are of."""

    address: TableAddress
    location: Location  # the folder, or the table's root: where the sources' paths are
    files: list[InputFile]
    version: int | None = None  # Delta version / Iceberg snapshot id; None for a Parquet folder
    schema: pa.Schema | None = None  # a table's schema (its data files' columns); None: each file's footer

    def settings(self) -> dict[str, Any]:
        """What the output's manifest records of the input (and each run record, its version)."""
        return {"format": self.address.kind, "table_version": self.version}


def input_location(text: str, storage_options: dict[str, Any], flag: str = "--input") -> Location | None:
    """The folder an address reads from, when known without a catalog (None for Iceberg)."""
    address = parse_address(text, flag)
    return None if address.kind == ICEBERG else Location(address.target, storage_options)


def list_sources(text: str, storage_options: dict[str, Any], catalog: str | None, *, what: str = "input",
                 flag: str = "--input") -> InputListing:
    """The sources of the address ``text`` (see the module docstring); ConfigError when there is none."""
    address = parse_address(text, flag)
    if address.kind == DELTA:
        listing = _list_delta(address, storage_options, what)
    elif address.kind == ICEBERG:
        listing = _list_iceberg(address, storage_options, catalog, what)
    else:
        location = Location(address.target, storage_options)
        listing = InputListing(address, location, list_parquet(location, what, flag))
    if not listing.files:
        raise ConfigError(f"{what} {address} holds no data files")
    return listing


def list_parquet(location: Location, what: str, flag: str = "--input") -> list[InputFile]:
    """The Parquet data files of a folder; ConfigError when there is none, or when the folder
    is a Delta or Iceberg table's own (its files hold rows the table deleted)."""
    fs = location.filesystem()
    if not exists(fs, location.path):
        raise ConfigError(f"{what} {location.uri} does not exist")
    refuse_table_folder(fs, location.path, location.uri, flag)
    files = _parquet_files(location)
    if not files:
        raise ConfigError(f"{what} {location.uri} holds no Parquet files")
    return files


def _parquet_files(location: Location) -> list[InputFile]:
    """Parquet data files under a file or directory, sorted, with their identities.

    Entries whose relative path has a component starting with ``_`` or ``.`` are
    bookkeeping (Spark, Hive and fungi's own) and are skipped. One listing call on S3
    per 1,000 keys; no file is opened.
    """
    root = location.path
    if location.is_s3:
        fs = location.s3()
        if fs.isfile(root):
            info = fs.info(root)
            return [InputFile(root, posixpath.basename(root), int(info["size"]), str(info.get("ETag", "")))]
        entries = fs.find(root, detail=True)
        files = [
            InputFile(path, path[len(root) + 1 :], int(info["size"]), str(info.get("ETag", "")))
            for path, info in entries.items()
            if info.get("type") == "file" and path.endswith(".parquet")
        ]
    else:
        fs = pafs.LocalFileSystem()
        info = fs.get_file_info(root)
        if info.type == pafs.FileType.File:
            return [InputFile(root, posixpath.basename(root), info.size, str(info.mtime_ns))]
        files = [
            InputFile(entry.path, entry.path[len(root) + 1 :], entry.size, str(entry.mtime_ns))
            for entry in list_files(fs, root, ".parquet", recursive=True)
        ]
    return sorted(
        (f for f in files if not any(part.startswith(("_", ".")) for part in f.relpath.split("/"))),
        key=lambda f: f.relpath,
    )


def file_schemas(listing: InputListing, footers: Sequence[pq.FileMetaData]) -> list[pa.Schema]:
    """The schema each listed file's rows are read with: the table's for a table, else the file's footer."""
    if listing.schema is not None:
        return [listing.schema] * len(footers)
    return [footer.schema.to_arrow_schema() for footer in footers]


# -- Delta -----------------------------------------------------------------------------------


def delta_storage_options(location: Location) -> dict[str, str]:
    """``deltalake``'s storage options for a location: its endpoint and keys (s3fs spelling) mapped."""
    if not location.is_s3:
        return {}
    import os

    options = location.storage_options
    endpoint = options.get("endpoint_url") or options.get("client_kwargs", {}).get("endpoint_url") \
        or os.environ.get("AWS_ENDPOINT_URL")
    mapped = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": options.get("key"),
              "AWS_SECRET_ACCESS_KEY": options.get("secret"), "AWS_REGION": options.get("client_kwargs", {}).get("region_name")}
    if endpoint and endpoint.startswith("http://"):
        mapped["AWS_ALLOW_HTTP"] = "true"
    return {key: str(value) for key, value in mapped.items() if value}


def _list_delta(address: TableAddress, storage_options: dict[str, Any], what: str) -> InputListing:
    """The add actions of a Delta table's current version, one source each."""
    from deltalake import DeltaTable
    from deltalake.exceptions import TableNotFoundError

    location = Location(address.target, storage_options)
    table_uri = f"s3://{location.path}" if location.is_s3 else location.path
    try:
        table = DeltaTable(table_uri, storage_options=delta_storage_options(location))
    except TableNotFoundError:
        raise ConfigError(f"{what} {address} is not a Delta table (no _delta_log/ at {location.uri})") from None
    _refuse_delta_features(table, address)
    actions = pa.table(table.get_add_actions(flatten=True))
    paths = actions.column("path").to_pylist()
    features = table.protocol().reader_features or []
    vectors = delta_deletion_vectors(location, table.version(), paths) if "deletionVectors" in features else {}
    files = []
    for path, size, modified in zip(paths, *(actions.column(n).to_pylist() for n in ("size_bytes", "modification_time"))):
        if "://" in path:
            full = _filesystem_path(path)
            relpath = posixpath.relpath(full, location.path) if full.startswith(location.path + "/") else full
        else:
            relpath = unquote(path)
            full = location.child_path(relpath)
        vector = vectors.get(unquote(path))
        if vector is None:
            files.append(InputFile(full, relpath, int(size), f"delta:{modified}"))
        else:
            read = _delta_read(vector, location)
            identity = hashlib.sha256(read.unique_id.encode()).hexdigest()[:16]
            files.append(InputFile(full, relpath, int(size), f"delta:{modified}:dv:{identity}", read))
    metadata = table.metadata()
    partitions = tuple(metadata.partition_columns)
    schema = pa.schema(table.schema().to_arrow())
    schema = pa.schema([f for f in schema if f.name not in partitions])  # values in the log, not the files
    return InputListing(address, location, sorted(files, key=lambda f: f.relpath), table.version(), schema)


def _refuse_delta_features(table: Any, address: TableAddress) -> None:
    """ConfigError for a Delta table whose files' rows are not their live rows as plain Parquet reads them."""
    configuration = table.metadata().configuration
    if configuration.get("delta.columnMapping.mode", "none") != "none":
        raise ConfigError(
            f"--input {address} uses column mapping (delta.columnMapping.mode="
            f"{configuration['delta.columnMapping.mode']}): its files' column names are not the table's, and fungi "
            "reads data files by name; rewrite the table without column mapping"
        )


DV_MAGIC = 1681511377  # the Delta protocol's deletion vector format (RoaringBitmapArray, portable)
Z85_ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.-:+=^!/*?&<>()[]{}@%$#"
_Z85_VALUES = {char: value for value, char in enumerate(Z85_ALPHABET)}
_CHECKPOINT = re.compile(r"^(\d{20})\.checkpoint(?:\.(\d{10})\.(\d{10})|\.[^.]+)?\.(parquet|json)$")


def delta_deletion_vectors(location: Location, version: int, live_paths: Sequence[str]) -> dict[str, dict[str, Any]]:
    """The ``deletionVector`` descriptor of each live data file that has one, by its (unquoted) log path.

    Read from the log as of ``version``: the newest complete checkpoint at or before it (classic,
    multi-part, or V2 with its sidecars) and the commits after it. A live file's logical file is
    its last ``add`` action (a DELETE that gives a file a vector commits the file again with it),
    so no remove needs replaying; ``live_paths`` (``deltalake``'s add actions) says which files
    are live. O(files + commits since the checkpoint), no data file or vector opened.
    """
    fs = location.filesystem()
    log = location.child_path("_delta_log")
    names = [posixpath.basename(info.path) for info in fs.get_file_info(pafs.FileSelector(log))]
    start, parts = _newest_checkpoint(names, version)
    vectors: dict[str, dict[str, Any]] = {}
    for name in parts:
        for add in _checkpoint_adds(fs, log, name):
            vectors[unquote(add["path"])] = add.get("deletionVector")
    commits = sorted(int(n[:20]) for n in names if len(n) == 25 and n.endswith(".json") and n[:20].isdigit())
    for number in (n for n in commits if start < n <= version):
        with fs.open_input_stream(posixpath.join(log, f"{number:020d}.json")) as handle:
            for line in handle.read().decode().splitlines():
                if '"add"' in line:
                    add = json.loads(line).get("add")
                    if add:
                        vectors[unquote(add["path"])] = add.get("deletionVector")
    live = {unquote(path) for path in live_paths}
    missing = live - vectors.keys()
    if missing:
        raise ConfigError(f"the Delta log at {log} names no add action for {len(missing)} live file(s), e.g. "
                          f"{sorted(missing)[0]}, in its checkpoint or the commits after it: fungi cannot read their "
                          "deletion vectors; checkpoint the table (deltalake: DeltaTable.create_checkpoint()) and run again")
    return {path: vector for path, vector in vectors.items() if vector and path in live}


def _newest_checkpoint(names: Sequence[str], version: int) -> tuple[int, list[str]]:
    """(version, file names) of the newest complete checkpoint at or before ``version``; (-1, []) if none."""
    found: dict[int, dict[str, list[str]]] = {}
    for name in names:
        match = _CHECKPOINT.match(name)
        if match and int(match.group(1)) <= version:
            kind = f"multi:{match.group(3)}" if match.group(3) else name
            found.setdefault(int(match.group(1)), {}).setdefault(kind, []).append(name)
    for number in sorted(found, reverse=True):
        for kind, files in sorted(found[number].items()):
            if not kind.startswith("multi:") or len(files) == int(kind[6:]):
                return number, sorted(files)
    return -1, []


def _checkpoint_adds(fs: Any, log: str, name: str) -> Iterator[dict[str, Any]]:
    """The add actions of one checkpoint file (path and deletionVector only), and of its V2 sidecars."""
    path = posixpath.join(log, name)
    if name.endswith(".json"):
        with fs.open_input_stream(path) as handle:
            actions = [json.loads(line) for line in handle.read().decode().splitlines() if line.strip()]
        yield from (action["add"] for action in actions if action.get("add"))
        sidecars = [action["sidecar"]["path"] for action in actions if action.get("sidecar")]
    else:
        yield from _parquet_adds(fs, path)
        names = pq.read_schema(path, filesystem=fs).names
        sidecars = [] if "sidecar" not in names else [  # a nested column is read as its leaf
            row for row in pq.read_table(path, columns=["sidecar.path"], filesystem=fs).column(0).to_pylist() if row]
    for sidecar in sidecars:
        full = _filesystem_path(sidecar) if "://" in sidecar else posixpath.join(log, "_sidecars", unquote(sidecar))
        yield from _parquet_adds(fs, full)


def _parquet_adds(fs: Any, path: str) -> Iterator[dict[str, Any]]:
    """``add.path`` and ``add.deletionVector`` of a checkpoint or sidecar Parquet file."""
    add = pq.read_schema(path, filesystem=fs).field("add").type
    columns = ["add.path"] + (["add.deletionVector"] if add.get_field_index("deletionVector") >= 0 else [])
    adds = pq.read_table(path, columns=columns, filesystem=fs)  # nested columns are read as their leaves
    yield from (row for row in adds.to_pylist() if row["path"])


def _delta_read(vector: dict[str, Any], location: Location) -> DeltaRead:
    """A data file's :class:`DeltaRead` from its ``deletionVector`` descriptor (the vector file's path resolved)."""
    storage, text, offset = vector["storageType"], vector["pathOrInlineDv"], vector.get("offset")
    unique_id = f"{storage}{text}" + (f"@{offset}" if offset is not None else "")
    common = dict(unique_id=unique_id, cardinality=int(vector["cardinality"]), size=int(vector["sizeInBytes"]))
    if storage == "i":
        return DeltaRead(**common, inline=text)
    if storage == "u":  # <random prefix><20 characters: the Z85 of the UUID>
        name = f"deletion_vector_{uuid.UUID(bytes=z85_decode(text[-20:]))}.bin"
        path = location.child_path(text[:-20], name) if len(text) > 20 else location.child_path(name)
    elif storage == "p":
        path = _filesystem_path(text)
    else:
        raise ConfigError(f"Delta deletion vector with unknown storageType {storage!r} in {location.uri}")
    return DeltaRead(**common, path=path, offset=offset)


def z85_decode(text: str) -> bytes:
    """Z85 (ZeroMQ's Base85, the Delta log's encoding of inline vectors and vector file UUIDs)."""
    if len(text) % 5:
        raise ValueError(f"a Z85 text has a multiple of 5 characters, not {len(text)}")
    out = bytearray()
    for start in range(0, len(text), 5):
        value = 0
        for char in text[start:start + 5]:
            value = value * 85 + _Z85_VALUES[char]
        out += value.to_bytes(4, "big")
    return bytes(out)


# -- Iceberg ---------------------------------------------------------------------------------


def _list_iceberg(address: TableAddress, storage_options: dict[str, Any], catalog: str | None, what: str) -> InputListing:
    """The data files of an Iceberg table's current snapshot, each with its positional deletes."""
    from pyiceberg.exceptions import NoSuchNamespaceError, NoSuchTableError

    try:
        table = load_catalog(catalog).load_table(address.target)
    except (NoSuchTableError, NoSuchNamespaceError):
        raise ConfigError(f"{what} {address} does not exist in the Iceberg catalog (--catalog)") from None
    location = Location(location_uri(table.metadata.location), storage_options)
    snapshot = table.current_snapshot()
    if snapshot is None:
        return InputListing(address, location, [], None, table.schema().as_arrow())
    try:
        tasks = list(table.scan(snapshot_id=snapshot.snapshot_id).plan_files())
    except ValueError as exc:
        if "equality deletes" not in str(exc):
            raise
        raise ConfigError(_equality_message(address)) from None
    field_ids = tuple((f.name, f.field_id) for f in table.schema().fields)
    mapping = table.name_mapping()
    name_mapping = tuple((f.field_id, tuple(f.names)) for f in mapping or () if f.field_id is not None)
    files = [iceberg_source(task, location, field_ids, address, name_mapping) for task in tasks]
    return InputListing(address, location, sorted(files, key=lambda f: f.relpath), snapshot.snapshot_id,
                        table.schema().as_arrow())


def iceberg_source(task: Any, location: Location, field_ids: tuple[tuple[str, int], ...],
                   address: TableAddress, name_mapping: tuple[tuple[int, tuple[str, ...]], ...] = ()) -> InputFile:
    """One file scan task as a source: identity = its delete files; equality deletes refused."""
    from pyiceberg.manifest import DataFileContent

    deletes = sorted(task.delete_files, key=lambda d: d.file_path)
    if any(d.content != DataFileContent.POSITION_DELETES for d in deletes):
        raise ConfigError(_equality_message(address))
    path = _filesystem_path(task.file.file_path)
    relpath = posixpath.relpath(path, location.path) if path.startswith(location.path + "/") else path
    identity = hashlib.sha256("\n".join(d.file_path for d in deletes).encode()).hexdigest()[:16] if deletes else "-"
    read = IcebergRead(task.file.file_path, tuple(_filesystem_path(d.file_path) for d in deletes), field_ids,
                       name_mapping)
    return InputFile(path, relpath, int(task.file.file_size_in_bytes), f"iceberg:{identity}", read)


def _equality_message(address: TableAddress) -> str:
    return (
        f"--input {address} has equality delete files, which pyiceberg cannot apply: compact the table "
        "(Spark: CALL system.rewrite_data_files(..., options => map('delete-file-threshold','1'))) so that "
        "no equality deletes remain, then run again"
    )


def location_uri(uri: str) -> str:
    """A table location as a :class:`Location` URI (``file://`` URIs as local paths)."""
    return unquote(urlparse(uri).path) if uri.startswith("file:") else uri


def _filesystem_path(uri: str) -> str:
    """A data file's URI as a path on its location's filesystem (``bucket/key`` on S3)."""
    if uri.startswith("file:"):
        return unquote(urlparse(uri).path)
    if "://" in uri:
        return uri.split("://", 1)[1]
    return uri


# -- reading a source's live rows ------------------------------------------------------------


def read_batches(location: Location, source: InputFile, columns: list[str], batch_size: int) -> Iterator[pa.RecordBatch]:
    """The live rows of one source, ``columns`` only, in record batches of at most ``batch_size`` rows.

    A Parquet folder's file is read as it is; a Delta file without the rows its deletion
    vector deletes; an Iceberg file by field id, without the rows its positional delete files
    delete (a column the file predates is null). View types (``deltalake`` writes
    ``string_view``) come as plain strings and binaries: not every compute kernel takes views.
    """
    for batch in _live_batches(location, source, columns, batch_size):
        views = [i for i, f in enumerate(batch.schema) if f.type in _VIEW_TYPES]
        for index in views:
            batch = batch.set_column(index, batch.schema.field(index).name,
                                     batch.column(index).cast(_VIEW_TYPES[batch.schema.field(index).type]))
        yield batch


_VIEW_TYPES = {pa.string_view(): pa.string(), pa.binary_view(): pa.binary()}


def _live_batches(location: Location, source: InputFile, columns: list[str], batch_size: int) -> Iterator[pa.RecordBatch]:
    """:func:`read_batches` before its view types are made plain."""
    fs = location.filesystem()
    with fs.open_input_file(source.path) as handle:
        parquet = pq.ParquetFile(handle)
        read = source.read
        if read is None:
            yield from parquet.iter_batches(batch_size=batch_size, columns=columns)
            return
        physical = _physical_names(parquet.schema_arrow, read, columns) if isinstance(read, IcebergRead) else columns
        deleted = _deleted_positions(fs, read)
        start = 0
        for batch in parquet.iter_batches(batch_size=batch_size, columns=sorted({p for p in physical if p})):
            rows = batch.num_rows
            arrays = [batch.column(name) if name else pa.nulls(rows) for name in physical]
            batch = pa.RecordBatch.from_arrays(arrays, names=columns)
            if len(deleted):
                positions = np.arange(start, start + rows)
                batch = batch.filter(pa.array(~np.isin(positions, deleted, assume_unique=True)))
            start += rows
            yield batch


def read_columns(location: Location, source: InputFile, columns: list[str]) -> pa.Table:
    """The live rows of one source, ``columns`` only, as one table."""
    batches = list(read_batches(location, source, columns, 1 << 16))
    if not batches:
        return pa.table({column: pa.nulls(0) for column in columns})
    return pa.Table.from_batches(batches)


def count_live_rows(location: Location, source: InputFile) -> int:
    """Ray task: a source's live rows (its footer's count less what its delete files delete)."""
    with location.filesystem().open_input_file(source.path) as handle:
        rows = pq.ParquetFile(handle).metadata.num_rows
    if not isinstance(source.read, IcebergRead) or not source.read.deletes:
        return rows
    return rows - len(_deleted_positions(location.filesystem(), source.read))


def live_row_counts(location: Location, sources: Sequence[InputFile], footer_rows: dict[str, int],
                    tasks: Tasks) -> dict[str, int]:
    """Live rows per source: ``footer_rows``, less a Delta file's deletion vector's cardinality (in
    its add action), but a task's count for an Iceberg file with deletes (off the driver on Ray)."""
    counts = dict(footer_rows)
    with_deletes = [source for source in sources if isinstance(source.read, IcebergRead) and source.read.deletes]
    if with_deletes:
        task = tasks.remote(count_live_rows, num_cpus=0.25)
        for source, rows in zip(with_deletes, tasks.get([task(location, s) for s in with_deletes])):
            counts[source.relpath] = rows
    for source in sources:
        if isinstance(source.read, DeltaRead) and source.relpath in counts:
            counts[source.relpath] -= source.read.cardinality
    return counts


def _physical_names(file_schema: pa.Schema, read: IcebergRead, columns: list[str]) -> list[str | None]:
    """The file's column for each wanted table column: by Iceberg field id (the file's own, else through
    the table's name mapping, as Iceberg's readers do), else by name; None if absent."""
    by_id = {
        int(f.metadata[FIELD_ID_KEY]): f.name for f in file_schema if f.metadata and FIELD_ID_KEY in f.metadata
    }
    if not by_id:
        by_id = {field_id: name for field_id, names in read.name_mapping for name in names if name in file_schema.names}
    ids = dict(read.field_ids)
    names = []
    for column in columns:
        if by_id and column in ids:
            names.append(by_id.get(ids[column]))
        else:
            names.append(column if column in file_schema.names else None)
    return names


def _deleted_positions(fs: Any, read: IcebergRead | DeltaRead) -> np.ndarray:
    """Sorted row positions of one data file that its positional delete files or deletion vector delete."""
    if isinstance(read, DeltaRead):
        return deletion_vector_positions(fs, read)
    parts = [
        pq.read_table(path, columns=["pos"], filters=[("file_path", "=", read.data_uri)], filesystem=fs).column(0)
        for path in read.deletes
    ]
    if not parts:
        return np.empty(0, dtype=np.int64)
    return np.unique(np.concatenate([part.to_numpy() for part in parts]).astype(np.int64))


def deletion_vector_positions(fs: Any, read: DeltaRead) -> np.ndarray:
    """Sorted row positions a Delta deletion vector deletes, decoded from the log's text or its file.

    A vector file holds a version byte, then per vector its size (4 bytes, big-endian), its
    bytes and their CRC-32; the bytes are the magic number (4 bytes, little-endian) and a
    64-bit RoaringBitmap in the portable format (``pyroaring.BitMap64``).
    """
    from pyroaring import BitMap64

    where = read.path or "the log"
    if read.inline is not None:
        data = z85_decode(read.inline)[:read.size]
    else:
        with fs.open_input_file(read.path) as handle:
            handle.seek(1 if read.offset is None else read.offset)
            size = int.from_bytes(handle.read(4), "big")
            data = handle.read(size)
            checksum = int.from_bytes(handle.read(4), "big")
        if size != read.size or len(data) != size or zlib.crc32(data) != checksum:
            raise ValueError(f"Delta deletion vector at {where}@{read.offset} is corrupt (size or CRC-32 differ)")
    if int.from_bytes(data[:4], "little") != DV_MAGIC:
        raise ValueError(f"Delta deletion vector in {where} does not start with the magic number {DV_MAGIC}")
    positions = np.frombuffer(BitMap64.deserialize(data[4:]).to_array(), dtype=np.uint64).astype(np.int64)
    if len(positions) != read.cardinality:
        raise ValueError(f"Delta deletion vector in {where} holds {len(positions)} rows, its add action says "
                         f"{read.cardinality}")
    return positions
