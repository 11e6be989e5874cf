"""Input files before any row is read: footers, column types, row counts.

A night reads the Parquet footer of every input file it will featurize (new and changed
files only; an unchanged file is not opened at all), in parallel threads, and checks
them all against each other and against what earlier runs recorded, so that a
truncated file, a missing column or an id that is a string in one file and an integer
in another stops the run with one line naming the file, before any data is read.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from fungi_ops.errors import ConfigError

from pipelines.storage import InputFile, Location

FOOTER_THREADS = 16
# Parquet/Arrow types whose values a modality's decode accepts (``pyarrow.types`` predicates;
# the view types need pyarrow >= 16 and are simply absent before it); dictionaries of them too.
_ENCODED_FILE_TYPES = ("is_binary", "is_large_binary", "is_binary_view", "is_fixed_size_binary")
_PAYLOAD_TYPES = {
    "text": ("is_string", "is_large_string", "is_string_view", "is_binary", "is_large_binary", "is_binary_view"),
    "image": _ENCODED_FILE_TYPES,
    "audio": _ENCODED_FILE_TYPES,
}
_EXPECTED_PAYLOADS = {
    "text": "a string column, or a binary column of UTF-8 text",
    "image": "a binary column of encoded image files (PNG, JPEG, WebP, ...)",
    "audio": "a binary column of encoded audio files (WAV, FLAC, ...)",
}


def payload_type_error(modality: str, arrow_type: pa.DataType, column: str) -> str | None:
    """Why a Parquet column of ``arrow_type`` cannot hold ``modality`` payloads, or None if it can.

    Text takes strings or binary (decoded as UTF-8); images and audio take binary (encoded
    files). Dictionary-encoded columns of those types are accepted. Meant for job validation,
    before any data is read.
    """
    if modality not in _PAYLOAD_TYPES:
        raise ConfigError(f"modality must be image, text or audio, got '{modality}'")
    value_type = arrow_type.value_type if pa.types.is_dictionary(arrow_type) else arrow_type
    if any(getattr(pa.types, name, lambda _: False)(value_type) for name in _PAYLOAD_TYPES[modality]):
        return None
    hint = ""
    if pa.types.is_struct(value_type) and value_type.get_field_index("bytes") >= 0:
        hint = " (a struct such as a Hugging Face Image/Audio feature: store its 'bytes' field as the column)"
    elif modality != "text" and (pa.types.is_string(value_type) or pa.types.is_large_string(value_type)):
        hint = " (file paths, URLs or base64 text are not read)"
    return (
        f"column '{column}' has type {arrow_type}, which cannot hold {modality} payloads; "
        f"expected {_EXPECTED_PAYLOADS[modality]}{hint}"
    )


@dataclass(frozen=True)
class InputColumns:
    """The input columns a run uses, by role."""

    id: str
    data: str
    keep: tuple[str, ...] = ()
    event_time: str | None = None

    @property
    def names(self) -> list[str]:
        """Every column the job reads, each once."""
        return list(dict.fromkeys([self.id, self.data, *self.keep, *([self.event_time] if self.event_time else [])]))


@dataclass(frozen=True)
class InputSchema:
    """Canonical Arrow types of the columns read (``large_`` string/binary types folded).

    Every file's columns are cast to these types when read, so that blocks of different
    files concatenate.
    """

    schema: pa.Schema

    def type_of(self, name: str) -> pa.DataType:
        """Canonical type of one column."""
        return self.schema.field(name).type


def canonical_type(data_type: pa.DataType) -> pa.DataType:
    """Fold the representation variants Arrow has for one logical type (``large_string`` -> ``string``...)."""
    if pa.types.is_dictionary(data_type):
        data_type = data_type.value_type
    folded = {
        pa.large_string(): pa.string(),
        pa.string_view(): pa.string(),
        pa.large_binary(): pa.binary(),
        pa.binary_view(): pa.binary(),
    }
    return folded.get(data_type, data_type)


def read_footers(location: Location, files: Sequence[InputFile],
                 unreadable: dict[str, str] | None = None) -> list[pq.FileMetaData | None]:
    """Footers of ``files``, read in parallel.

    An unreadable file (0 bytes, truncated, not Parquet) is a ConfigError naming it; given
    ``unreadable``, it is recorded there instead (its relpath -> why) with None for its
    footer: a night's bad file then fails alone, as a file with a corrupt page does.
    """
    fs = location.filesystem()

    def footer(info: InputFile) -> pq.FileMetaData | None:
        try:
            with fs.open_input_file(info.path) as handle:
                return pq.ParquetFile(handle).metadata
        except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for a bad file
            message = f"input file {_uri(location, info)} is not a readable Parquet file ({type(exc).__name__}: {exc})"
            if unreadable is None:
                raise ConfigError(f"{message}; fix or remove it") from exc
            unreadable[info.relpath] = message
            return None

    with ThreadPoolExecutor(max_workers=min(FOOTER_THREADS, max(1, len(files)))) as pool:
        return list(pool.map(footer, files))


def check_schemas(
    location: Location,
    files: Sequence[InputFile],
    schemas: Sequence[pa.Schema],
    columns: InputColumns,
    modality: str,
    recorded_id_type: pa.DataType | None = None,
) -> InputSchema:
    """One canonical schema for the columns read, or a ConfigError naming the file at fault.

    ``recorded_id_type`` is the id type earlier runs of the output saw: a night may not
    switch ids from strings to integers, or its ids would no longer match.
    """
    chosen: dict[str, tuple[pa.DataType, InputFile]] = {}
    for info, schema in zip(files, schemas):
        missing = [name for name in columns.names if name not in schema.names]
        if missing:
            roles = {columns.id: "id", columns.data: "data", columns.event_time: "event time"}
            what = ", ".join(f"{roles.get(name, 'kept')} column '{name}'" for name in missing)
            raise ConfigError(f"{what} not found in {_uri(location, info)}; columns: {', '.join(schema.names)}")
        for name in columns.names:
            data_type = canonical_type(schema.field(name).type)
            if name not in chosen:
                chosen[name] = (data_type, info)
            elif chosen[name][0] != data_type:
                first_type, first = chosen[name]
                raise ConfigError(
                    f"column '{name}' is {first_type} in {_uri(location, first)} but {data_type} in "
                    f"{_uri(location, info)}; every input file must use the same type"
                )
    id_type = chosen[columns.id][0]
    if not (pa.types.is_string(id_type) or pa.types.is_integer(id_type)):
        raise ConfigError(f"id column '{columns.id}' is {id_type}; ids must be strings or integers")
    if recorded_id_type is not None and canonical_type(recorded_id_type) != id_type:
        raise ConfigError(
            f"id column '{columns.id}' is {id_type} in {_uri(location, chosen[columns.id][1])}, but earlier runs "
            f"of this output read {recorded_id_type} ids; use --overwrite to rebuild the output"
        )
    problem = payload_type_error(modality, chosen[columns.data][0], columns.data)
    if problem:
        raise ConfigError(f"{problem} (in {_uri(location, chosen[columns.data][1])})")
    if columns.event_time:
        time_type, where = chosen[columns.event_time]
        if not pa.types.is_timestamp(time_type):
            raise ConfigError(
                f"--event-time-column '{columns.event_time}' is {time_type} in {_uri(location, where)}; "
                "it must be a timestamp column"
            )
    return InputSchema(pa.schema([(name, chosen[name][0]) for name in columns.names]))


def _uri(location: Location, info: InputFile) -> str:
    return f"s3://{info.path}" if location.is_s3 else info.path
