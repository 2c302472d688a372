"""Training: DeepSpeed engine, device and process group (``engine``), checkpoints and their
reporters (``checkpoints``), the per-rank ``Trainer`` (``trainer``), and the train stage's
launchers, Ray Train or local (``launch``)."""
