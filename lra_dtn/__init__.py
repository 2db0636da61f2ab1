"""LRA suite comparing Dynamic Token Normalization with LayerNorm.

Three layers, each importing only from the ones below it:

* the library, this package: normalizers (``norms``, ``dtn``), the registry, configs, the data cache and
  batching, the optimizer, memory and multi-process helpers;
* ``tasks/`` and ``models/``, built on the library;
* the application, :mod:`lra_dtn.app`: specs, engine, sweep, results, tables, plots and the CLI.

Importing the package imports nothing (no torch): the normalizers register themselves when their
modules are imported, which ``models`` does for the encoders.
"""
