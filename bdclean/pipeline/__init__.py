"""The purification pipeline: each stage reads and writes artifacts in a run folder and records a manifest
(see io.artifacts). make-variants → train-pairs → diff → score → suppress → restore; purify runs them all.
Nothing here imports the lab."""
