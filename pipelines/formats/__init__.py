"""Table formats fungi reads and writes: a Parquet folder, a Delta table, an Iceberg table.

:mod:`pipelines.formats.address` parses where a job reads or writes (``PATH``,
``delta:PATH``, ``iceberg:NAMESPACE.TABLE``) and opens Iceberg catalogs.
"""
