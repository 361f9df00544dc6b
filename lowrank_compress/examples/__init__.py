"""The demo and its model, outside the runtime: the digits CNN (``digits``), its bundled checkpoint and
held-out split (``assets/``), and ``lrc demo`` (``demo``). Nothing in the rest of the package imports
this package; only the ``lrc demo`` command loads it, and the arch-spec resolver allows its model."""
