"""The machine a benchmark ran on, as recorded in every results file.

Two hosts that both call themselves "AMD EPYC" can differ by 2× in speed (CPU generation, vector units), so the
CPU family/model numbers and the widest vector extensions are recorded too: wall times are only comparable
between records with the same ``cpu`` block; ratios measured within one run are comparable across machines.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields from /proc/cpuinfo (empty where there is none)."""
    fields: dict[str, str] = {}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return fields
    for line in text.splitlines():
        if not line.strip():
            break  # end of the first processor's block
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return fields


def describe() -> dict:
    import torch

    info = _cpuinfo()
    flags = set(info.get("flags", "").split())
    cpu = {"name": info.get("model name") or platform.processor() or platform.machine(),
           "family": info.get("cpu family"), "model": info.get("model"),
           "vector": sorted(f for f in flags if f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"))}
    return {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
            "python": platform.python_version()}


ROOT = Path(__file__).resolve().parent.parent


def keep_machines(kept: list[dict], old: dict, new: dict) -> list[dict]:
    """Rows kept from an earlier sitting that ran on ``old``: each names the machine it was measured on, unless that
    is ``new`` (this sitting's, the record's own). Returns ``kept``, changed in place."""
    for r in kept:
        r.setdefault("machine", old)
        if r["machine"] == new:
            del r["machine"]
    return kept


def machine_marks(rows: list[dict]) -> tuple[list[str], list[dict]]:
    """(a mark per row: "", " †", " ††", … one per other machine, in order of appearance; those machines)."""
    others: list[dict] = []
    marks = []
    for r in rows:
        m = r.get("machine")
        if m and m not in others:
            others.append(m)
        marks.append(" " + "†" * (others.index(m) + 1) if m else "")
    return marks, others


def portable(obj):
    """``obj`` with every path under the repository made relative to it and the home folder written ``~``, so a
    results file names no machine's folders (commands stay runnable from the repository root)."""
    if isinstance(obj, str):
        return obj.replace(str(ROOT) + "/", "").replace(str(ROOT), ".").replace(str(Path.home()), "~")
    if isinstance(obj, dict):
        return {k: portable(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [portable(v) for v in obj]
    return obj
