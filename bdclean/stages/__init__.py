"""Stages: each reads and writes artifacts in a run folder and records a manifest (see io.artifacts)."""
