"""Sub-commands of the ``fungi`` CLI, one module each (see :mod:`pipelines.cli`)."""
