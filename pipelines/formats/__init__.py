"""Table formats fungi reads and writes: Parquet folders, Delta tables and Iceberg tables.

:mod:`pipelines.formats.address` parses where a job reads or writes (``PATH``,
``delta:PATH``, ``iceberg:NAMESPACE.TABLE``); :mod:`pipelines.formats.base` is the one
interface (:class:`~pipelines.formats.base.OutputTable`) the job commits through and readers
read through; :mod:`~pipelines.formats.folder` implements it for a folder, and
:mod:`~pipelines.formats.table` for the table formats, whose own parts are in
:mod:`~pipelines.formats.delta` and :mod:`~pipelines.formats.iceberg`. :mod:`~pipelines.formats.sources` lists
and reads the three as input (a table's data files, its deletes applied).
"""
from __future__ import annotations

from typing import Any

import pyarrow as pa

from pipelines.formats.address import DELTA, ICEBERG, parse_address
from pipelines.formats.base import Fault, OutputTable
from pipelines.storage import Location


def open_output(uri: str, storage_options: dict[str, Any] | None = None, *, catalog: str | None = None,
                fault: Fault | None = None) -> OutputTable:
    """The output ``uri`` addresses (a folder, ``delta:PATH`` or ``iceberg:NS.TABLE`` in ``catalog``,
    see :func:`pipelines.formats.address.load_catalog`); no data is read yet."""
    address = parse_address(uri)
    if address.kind == DELTA:
        from pipelines.formats.delta import DeltaOutput

        return DeltaOutput(address.target, storage_options or {}, fault=fault)
    if address.kind == ICEBERG:
        from pipelines.formats.iceberg import IcebergOutput

        return IcebergOutput(address, catalog, storage_options or {}, fault=fault)
    from pipelines.formats.folder import ParquetFolder

    return ParquetFolder(Location(address.target, storage_options or {}), fault=fault)


def read_output(uri: str, *, columns: list[str] | None = None, storage_options: dict[str, Any] | None = None,
                version: int | None = None, catalog: str | None = None) -> pa.Table:
    """The feature rows of a fungi output, exactly as one committed state has them (never a mix).

    ``version``: a Delta version or an Iceberg snapshot id (time travel); None, the current
    state. Vector columns are fixed-size lists whatever the format. Raises ConfigError when
    ``uri`` is not a fungi output.
    """
    return open_output(uri, storage_options, catalog=catalog).read(columns=columns, version=version)
