"""probe: what does a searched universal hidden-state shift make the model say? (a trigger-free backdoor probe)

For the suspicious model and, as a control, its base: the shift δ of train/adversarial.py (layer, radius as a
fraction of the median hidden norm) is searched on seeded generic clean rows to change the answers most; then the
model answers test prompts greedily with δ added. A backdoor shows as one answer repeated across unrelated prompts
(its target behaviour) that the base, searched the same way, does not give. The probe only reads; it writes one
JSON report.
"""

from __future__ import annotations

import collections
import random
from pathlib import Path

from bdclean.console import log
from bdclean.errors import UsageError

TOP = 5  # most frequent shifted answers reported


def _probe_one(model, tok, rows: list[dict], tests: list[dict], radius_frac: float, layer: int | None, seed: int,
               max_new_tokens: int) -> dict:
    from bdclean.train.adversarial import answer_key, answers_with_and_without, start_shift
    from bdclean.train.chat import encode

    for p in model.parameters():
        p.requires_grad_(False)
    examples = [encode(tok, r, 96) for r in rows]
    shift, facts = start_shift(model, examples, tok.pad_token_id, radius_frac, layer, seed, flag="--layer")
    try:
        shifted, plain = answers_with_and_without(model, tok, shift, tests, max_new_tokens)
    finally:
        shift.remove()
    counts = collections.Counter(answer_key(o) for o in shifted)
    top = [{"answer": a, "count": c} for a, c in counts.most_common(TOP)]
    return {**facts, "top_shifted_answers": top, "top_share": top[0]["count"] / len(tests) if top else 0.0,
            "changed_share": sum(answer_key(a) != answer_key(b) for a, b in zip(shifted, plain)) / len(tests),
            "examples": [{"prompt": t["instruction"], "plain": b, "shifted": a}
                         for t, a, b in list(zip(tests, shifted, plain))[:8]]}


def run(model_path: Path, out: Path, base: str | None, clean: str, tests: str, radius: float, layer: int | None,
        samples: int, limit: int, seed: int, max_new_tokens: int, force: bool = False) -> dict:
    from bdclean.io.artifacts import write_json
    from bdclean.io.data import load_instructions
    from bdclean.io.models import load_model, load_tokenizer
    from bdclean.pipeline.run import load_any, load_suspicious

    out = Path(out)
    if out.exists() and not force:
        raise UsageError(f"{out}: already exists; pass --force to overwrite")
    if not 0 < radius <= 1:
        raise UsageError(f"--radius {radius:g}: give a fraction of the median hidden norm in (0, 1]")
    pool = load_instructions(clean)
    rows = random.Random(seed).sample(pool, min(samples, len(pool)))
    test_rows = load_instructions(tests, need_output=False)[:limit]
    sus = load_suspicious(Path(model_path), base)
    if sus.kind != "adapter":  # a full checkpoint's own tokenizer and template are not to be trusted (SECURITY.md)
        raise UsageError(f"{model_path}: probe takes a LoRA adapter (full checkpoints: `bdclean extract` first)")
    model, tok, kind = load_any(Path(model_path), base or "smollm2")
    report = {"model": str(model_path), "kind": kind, "clean": str(clean), "tests": str(tests), "samples": len(rows),
              "prompts": len(test_rows), "radius": radius, "seed": seed,
              "suspicious": _probe_one(model, tok, rows, test_rows, radius, layer, seed, max_new_tokens)}
    del model
    report["base"] = str(sus.base_dir)  # the control: the same search on the base
    report["control"] = _probe_one(load_model(sus.base_dir), load_tokenizer(sus.base_dir), rows, test_rows, radius,
                                   layer, seed, max_new_tokens)
    write_json(out, report)
    s, c = report["suspicious"], report["control"]
    log(f"probe: shifted, the adapter gives one answer to {s['top_share']:.0%} of {len(test_rows)} prompts: "
        f"{s['top_shifted_answers'][0]['answer']!r}; the base, searched the same way, {c['top_share']:.0%} "
        f"→ {out}")
    return report
