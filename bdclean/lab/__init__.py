"""The lab: experiment tooling beside the purification pipeline (skills for benchmarks). No pipeline stage imports it."""
