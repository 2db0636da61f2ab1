"""The application on top of the library, ``tasks`` and ``models``: from CLI names to run specs
(``specs``), one run (``engine``), the grid (``sweep``), run files (``artifacts``), aggregation and
statistics (``results``, ``stats``, ``paper``), the tables and figure (``tables``, ``plots``), the
command line (``options``, ``cli``)."""
