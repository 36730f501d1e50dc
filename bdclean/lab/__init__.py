"""The lab: experiment tooling beside the purification pipeline: attacks and implant, baseline defenses, eval and
multiple-choice eval, compare, report, ablate, skills for benchmarks. No pipeline stage imports it."""
