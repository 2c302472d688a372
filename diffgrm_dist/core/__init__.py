"""Foundation, imported by every layer above: typed configs (``config``), one error type per
kind of bad input (``errors``), atomic stage folders on a disk or a bucket (``rundir``),
ragged-array helpers (``ragged``)."""
