"""``securefl demo``: a throw-away federation on built-in synthetic data, and the in-memory
secure-aggregation round (``--secagg-only``)."""
