"""Ray orchestration for fungi: the ``fungi`` CLI, the featurization job, its outputs and their hand-offs.

The torch engine lives in :mod:`fungi_ops`; this package composes it with Ray Data. Where
things are:

- :mod:`pipelines.cli` and :mod:`pipelines.commands`: the ``fungi`` command, one module per
  sub-command, each a thin layer over one entry point;
- :mod:`pipelines.config`: a run's settings (and whether it stays in the driver's process);
- :mod:`pipelines.job`: the featurization run (``fungi featurize``), one module per step;
- :mod:`pipelines.formats`: the formats fungi reads and writes (a Parquet folder, a Delta or an
  Iceberg table): the outputs' commit and readers, and the inputs' sources
  (:mod:`pipelines.formats.sources`);
- :mod:`pipelines.layout`: the names of an output's columns, metadata keys and files;
- :mod:`pipelines.manifest` and :mod:`pipelines.lease`: an output's committed state, and its one writer;
- :mod:`pipelines.inputs`: the input files' footers and schema checks, before any row is read;
- :mod:`pipelines.storage`: local paths and object stores behind one filesystem API;
- :mod:`pipelines.tasks`, :mod:`pipelines.ray_runtime`, :mod:`pipelines.interrupts`: where a run's
  tasks execute, starting Ray, Ctrl-C and SIGTERM;
- :mod:`pipelines.feast`: a Feast repository for an output (``fungi feast``);
- :mod:`pipelines.serve`: the output's featurizer and search index on Ray Serve (``fungi serve``);
- :mod:`pipelines.submit` (``fungi submit``) and :mod:`pipelines.demo` (``fungi demo``).
"""
