"""Ray: sessions and resources on a local instance or a cluster (``raycluster``), and Ray
Jobs that submit the pipeline to a running cluster (``submit``)."""
