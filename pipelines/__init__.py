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
import os

# GNU OpenMP (torch's CPU thread pool) lets idle team threads spin on the cores that the thread
# calling torch needs. Where torch runs only in a process's main thread (the in-process job, a
# featurize actor of 2 or more CPUs) that cost 2-12x the CPU per item on 2 cores: MiniLM kl,simclr
# 903 against 170 ms per one-item call and 401 against 197 ms per item in batches of 32; ViT-Tiny
# kl 1,175 against 92 ms per one-image call (benchmarks/bench_omp_wait.py); features unchanged.
# libgomp reads the policy when torch loads it, so it is set here, before this package imports
# torch; Ray's workers get the driver's value through pipelines.ray_runtime's runtime env. An
# OMP_WAIT_POLICY set by the user wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
