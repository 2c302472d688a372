"""``diffgrm stress``: the grid (``config``), one watched point (``point``), the fan-out over
the cluster (``grid``) and the report (``report``)."""
