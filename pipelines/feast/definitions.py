"""The repository's ``fungi_<name>.py``: the Feast definitions of one output, as generated source.

:func:`definitions_source` writes the entity, the sources, the feature views and the feature
service of an output; its first lines carry a header (:data:`HEADER_MARK`) that marks the
file as fungi's (:func:`read_header`), so that a user's file of the same name is never
overwritten. :func:`load_definitions` reads them back for ``FeatureStore.apply``.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from fungi_ops.errors import ConfigError
from pipelines.feast.output import FeatureOutput
from pipelines.feast.vectors import FUNGI_FEATURE
from pipelines.formats.address import PARQUET
from pipelines.layout import CONTENT_HASH_COLUMN, EVENT_TIME_COLUMN, ID_COLUMN

if TYPE_CHECKING:  # the repository writer (pipelines.feast.repo) describes what it writes with it
    from pipelines.feast.repo import RepoUpdate

DEFINITIONS_PREFIX = "fungi_"
HEADER_MARK = "# fungi-feast: "


def repo_name(text: str, explicit: bool) -> str:
    """The Python-safe name of an output's definitions (``--name``, else the output's own); ConfigError for a bad ``--name``."""
    name = re.sub(r"[^a-z0-9_]+", "_", text.lower()).strip("_")
    if explicit and name != text:
        raise ConfigError(f"--name '{text}' must be lower-case letters, digits and '_' (e.g. '{name or 'texts'}')")
    if not name:
        name = "features"
    if name[0].isdigit():
        name = f"f_{name}"
    return name


_PRIMITIVES = [
    (pa.types.is_string, "String"), (pa.types.is_large_string, "String"),
    (pa.types.is_boolean, "Bool"), (pa.types.is_float32, "Float32"), (pa.types.is_float64, "Float64"),
    (pa.types.is_int8, "Int32"), (pa.types.is_int16, "Int32"), (pa.types.is_int32, "Int32"),
    (pa.types.is_uint8, "Int32"), (pa.types.is_uint16, "Int32"), (pa.types.is_int64, "Int64"),
    (pa.types.is_uint32, "Int64"), (pa.types.is_binary, "Bytes"), (pa.types.is_large_binary, "Bytes"),
    (pa.types.is_timestamp, "UnixTimestamp"),
]


def feast_type(kind: pa.DataType) -> str | None:
    """The Feast type (as source code) of a kept column, None when Feast has none for it."""
    if pa.types.is_dictionary(kind):
        kind = kind.value_type
    if pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind):
        inner = feast_type(kind.value_type)
        return f"Array({inner})" if inner and not inner.startswith("Array") else None
    return next((feast for test, feast in _PRIMITIVES if test(kind)), None)


def read_header(definitions: Path) -> dict[str, Any] | None:
    """The header of a definitions file fungi wrote (None: no such file); ConfigError for a file of the user's."""
    if not definitions.exists():
        return None
    for line in definitions.read_text().splitlines()[:5]:
        if line.startswith(HEADER_MARK):
            try:
                return json.loads(line[len(HEADER_MARK):])
            except ValueError:
                break
    raise ConfigError(f"{definitions} exists and was not written by `fungi feast`: pass --name to choose another name")


def load_definitions(repo: str | os.PathLike) -> list[Any]:
    """The Feast objects of the repository's ``fungi_*.py`` files, for ``FeatureStore.apply``.

    ``feast apply`` does the same from the command line (and also applies your own files);
    this is for notebooks and tests that stay in one process, where importing the files
    through Feast would reuse stale modules.
    """
    from feast import Entity, FeatureService, FeatureView, FileSource

    objects: list[Any] = []
    for path in sorted(Path(repo).glob(f"{DEFINITIONS_PREFIX}*.py")):
        try:
            ours = read_header(path) is not None
        except ConfigError:  # a file of the user's that happens to start with fungi_
            ours = False
        if not ours:
            continue
        spec = importlib.util.spec_from_file_location(f"_fungi_feast_definitions_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)  # type: ignore[union-attr]
        objects.extend(v for v in vars(module).values() if isinstance(v, (Entity, FeatureService, FeatureView, FileSource)))
    return objects


# --- internals ---------------------------------------------------------------------------


def _view_tags(source: FeatureOutput, update: RepoUpdate) -> dict[str, str]:
    """The tags of the output's feature views: where they come from and the whole spec."""
    spec = source.spec
    return {
        "fungi.output": source.root,
        "fungi.source": update.source_kind,
        "fungi.spec_hash": source.spec_hash,
        "fungi.model": str(spec.get("model")),
        "fungi.modality": str(spec.get("modality")),
        "fungi.objectives": ",".join(o["name"] for o in spec.get("objectives", [])),
        "fungi.seed": str(spec.get("seed")),
        "fungi.embed_dim": str(source.dim("embedding")),
        "fungi.projection_dim": str(source.dim(source.vector_columns[1])) if len(source.vector_columns) > 1 else "",
        "fungi.spec": json.dumps(spec, sort_keys=True, separators=(",", ":")),
    }


def definitions_source(source: FeatureOutput, update: RepoUpdate, kept: list[tuple[str, str]], mirror: Path) -> str:
    """The repository's ``fungi_<name>.py``: entity, source, feature views and service of the output."""
    spec = source.spec
    objectives = [o["name"] for o in spec.get("objectives", [])]
    header = {"output": source.root, "spec_hash": source.spec_hash, "views": update.views}
    tags = _view_tags(source, update)
    endpoint = source.endpoint()
    types = sorted({"Array", "Float32", "String", *(t.replace("Array(", "").rstrip(")") for _, t in kept)})
    name, view = update.name, update.feature_view
    lines = [
        f"# Generated by `fungi feast` from {source.root} (spec {source.spec_hash}).",
        "# Re-running `fungi feast` rewrites this file: keep your own definitions in other files.",
        HEADER_MARK + json.dumps(header, sort_keys=True),
        "from datetime import timedelta",
        "",
        "from feast import Entity, FeatureService, FeatureView, Field, FileSource, ValueType",
        *(["from feast.data_format import DeltaFormat, ParquetFormat"] if source.kind != PARQUET else []),
        f"from feast.types import {', '.join(types)}",
        "",
        f"{name}_entity = Entity(",
        f"    name={name!r},",
        f"    join_keys=[{ID_COLUMN!r}],",
        "    value_type=ValueType.STRING,",
        f"    description={'rows of ' + source.root!r},",
        ")",
        "",
        f"{view}_source = FileSource(",
        f"    name={view + '_source'!r},",
        f"    path={source.source_path!r},",
        f"    timestamp_field={EVENT_TIME_COLUMN!r},",
    ]
    if source.kind != PARQUET:  # the duckdb store reads a Parquet source only when told so, and by a glob
        lines.append("    file_format=ParquetFormat()," if source.history else "    file_format=DeltaFormat(),")
    if endpoint:
        lines.append(f"    s3_endpoint_override={endpoint!r},")
    lines += [
        f"    description={_source_description(update.source_kind, table=source.kind != PARQUET)!r},",
        ")",
        "",
        f"{view} = FeatureView(",
        f"    name={view!r},",
        f"    entities=[{name}_entity],",
        "    ttl=timedelta(0),",
        f"    source={view}_source,",
        "    online=True,",
        "    schema=[",
        f"        Field(name={ID_COLUMN!r}, dtype=String),",
        _vector_field("embedding", source.dim("embedding"), True, "the model's embedding, L2-normalised"),
    ]
    for column, objective in zip(source.vector_columns[1:], objectives):
        description = f"FUNGI gradient of the {objective} objective, projected, L2-normalised"
        lines.append(_vector_field(column, source.dim(column), False, description))
    lines.append(f"        Field(name={CONTENT_HASH_COLUMN!r}, dtype=String, description='hash of the input payload'),")
    lines += [f"        Field(name={column!r}, dtype={feast_type})," for column, feast_type in kept]
    lines += [
        "    ],",
        f"    tags={_dict_source(tags)},",
        f"    description={'FUNGI features of ' + str(spec.get('model')) + ' (' + ', '.join(objectives) + ')'!r},",
        ")",
    ]
    if update.fungi_view:
        lines += _fungi_view_lines(source, update, tags, mirror)
    views = ", ".join(update.views)
    lines += [
        "",
        f"{name}_service = FeatureService(",
        f"    name={name!r},",
        f"    features=[{views}],",
        f"    description={'the features of ' + source.root + ' (its current spec: ' + ', '.join(update.views) + ')'!r},",
        f"    tags={{'fungi.spec_hash': {source.spec_hash!r}}},",
        ")",
    ]
    return "\n".join(lines) + "\n"


def _fungi_view_lines(source: FeatureOutput, update: RepoUpdate, tags: dict[str, str], mirror: Path) -> list[str]:
    """The ``<view>_fungi`` feature view over the FUNGI vectors ``fungi feast`` wrote under ``mirror``."""
    concat, name = update.fungi_view, update.name
    dim = sum(source.dim(c) for c in source.vector_columns)
    blocks = ",".join(source.vector_columns)
    return [
        "",
        f"{concat}_source = FileSource(",
        f"    name={concat + '_source'!r},",
        # the duckdb store (a table output's) reads a Parquet source only when told so, and by a glob
        *([f"    path={str(mirror / '*.parquet')!r},", "    file_format=ParquetFormat(),"] if source.kind != PARQUET
          else [f"    path={str(mirror)!r},"]),
        f"    timestamp_field={EVENT_TIME_COLUMN!r},",
        f"    description={f'the FUNGI concatenation of {blocks}, written by fungi feast from {source.source_path}'!r},",
        ")",
        "",
        f"{concat} = FeatureView(",
        f"    name={concat!r},",
        f"    entities=[{name}_entity],",
        "    ttl=timedelta(0),",
        f"    source={concat}_source,",
        "    online=True,",
        "    schema=[",
        f"        Field(name={ID_COLUMN!r}, dtype=String),",
        _vector_field(FUNGI_FEATURE, dim, True, f"{blocks}: each block L2-normalised, concatenated, L2-normalised"),
        "    ],",
        f"    tags={_dict_source({**tags, 'fungi.blocks': blocks})},",
        f"    description={'FUNGI concatenation (' + blocks + ') for vector search'!r},",
        ")",
    ]


def _dict_source(values: dict[str, str]) -> str:
    items = "".join(f"        {key!r}: {value!r},\n" for key, value in values.items())
    return "{\n" + items + "    }"


def _vector_field(name: str, dim: int, indexed: bool, description: str) -> str:
    index = f", vector_index=True, vector_length={dim}, vector_search_metric='COSINE'" if indexed else ""
    return f"        Field(name={name!r}, dtype=Array(Float32){index}, description={description + f' ({dim})'!r}),"


def _source_description(kind: str, table: bool) -> str:
    if kind == "history" and table:
        return "every row version the table keeps (its versions since the last vacuum): point-in-time correct"
    if kind == "history":
        return "every row version fungi featurize wrote (--history): point-in-time correct"
    return "the current rows (no --history): point-in-time correct only for rows never changed"
