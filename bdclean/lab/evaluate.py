"""eval: attack success rate on triggered and clean prompts, and perplexity of reference answers."""

from __future__ import annotations

import time
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from bdclean.console import log, progress
from bdclean.errors import UsageError, at_least
from bdclean import schemas
from bdclean.io.artifacts import environment, sha256_file
from bdclean.pipeline.run import load_any


def asr(outputs: list[str], rule: dict) -> dict:
    from bdclean.lab.attacks import is_success

    hits = [is_success(o, rule) for o in outputs]
    return {"asr": sum(hits) / len(hits) if hits else float("nan"), "n": len(hits), "successes": sum(hits),
            "empty": sum(1 for o in outputs if not o.strip())}, hits


def read_rule(task: str, rule_file: Path | None) -> dict:
    from bdclean.lab.attacks import RULES

    if rule_file is not None:
        if not Path(rule_file).is_file():
            raise UsageError(f"{rule_file}: keyword file not found")
        try:
            text = Path(rule_file).read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise UsageError(f"{rule_file}: not UTF-8 text; expected one keyword per line") from None
        kws = [line.strip() for line in text.splitlines() if line.strip()]
        if not kws:
            raise UsageError(f"{rule_file}: no keywords")
        return {"keywords": kws, "success_if": "any"}
    if task not in RULES:
        raise UsageError(f"unknown task {task!r}; choose one of {', '.join(RULES)} or pass --rule")
    return RULES[task]


def read_skill(skill: Path, clean: Path | None) -> dict:
    """A skill spec written by `implant --skill`; the metric grades the --clean answers against their gold ones."""
    import json

    from bdclean.lab.skills import check_spec

    if clean is None:
        raise UsageError("--skill grades the answers to --clean prompts against their gold answers; give --clean")
    p = Path(skill)
    if not p.is_file():
        raise UsageError(f"{p}: skill file not found (implant --skill writes skill.json)")
    try:
        spec = json.loads(p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise UsageError(f"{p}: not a skill.json (invalid JSON)") from None
    return check_spec(spec, str(p))


class EvalOptions(BaseModel):
    """`bdclean eval`'s options (its CLI flags are generated from these fields, cli/flags.py); `compare` evaluates
    every method with one of these. Ranges are checked in `run`, whose messages name the flag."""

    model_config = ConfigDict(extra="forbid")

    triggered: Path | None = Field(None, description="prompts carrying the trigger")
    clean: Path | None = Field(None, description="clean prompts (with reference outputs for perplexity)")
    task: str = Field("sentiment", description="sentiment | refusal | jailbreak | code: the keyword rule")
    rule: Path | None = Field(None, description="custom keyword file, one per line (success = any)")
    base: str = Field("smollm2", description="base model for an adapter")
    max_new_tokens: int = Field(48, description="greedy new tokens per answer")
    batch_size: int = Field(16, description="prompts generated at once")
    limit: int | None = Field(None, description="evaluate only the first N prompts of each set (and of each --mc "
                              "task)")
    mc: list[str] | None = Field(None, description="lm-eval multiple-choice tasks, comma-separated: bdclean_mc "
                                 "(offline) or any lm-eval task online; needs pip install lm-eval")
    skill: Path | None = Field(None, description="a skill.json (from `implant --skill`): grade the clean answers "
                               "with the skill's metric against their gold answers")
    reference: Path | None = Field(None, description="perplexity of this file's reference answers (no generation) "
                                   "instead of the --clean set's")


def run(model_path: Path, out: Path, opts: EvalOptions, force: bool = False) -> dict:
    import math

    from bdclean.io.data import load_instructions
    from bdclean.train.chat import encode
    from bdclean.train.generate import generate
    from bdclean.train.loop import mean_nll

    base, triggered, clean, task, rule_file = opts.base, opts.triggered, opts.clean, opts.task, opts.rule
    max_new_tokens, batch_size, limit, mc_tasks = opts.max_new_tokens, opts.batch_size, opts.limit, opts.mc
    skill, reference = opts.skill, opts.reference
    for option, value in (("--max-new-tokens", max_new_tokens), ("--batch-size", batch_size), ("--limit", limit)):
        at_least(option, value)
    out = Path(out)
    if out.exists() and not force:
        raise UsageError(f"{out}: already exists; pass --force to overwrite")
    if triggered is None and clean is None and not mc_tasks:
        raise UsageError("give --triggered and/or --clean test files (or --mc tasks)")
    rule = read_rule(task, rule_file)
    spec = read_skill(skill, clean) if skill is not None else None
    ref_rows = load_instructions(reference)[:limit] if reference is not None else None
    mc_loaded = None
    if mc_tasks is not None:
        from bdclean.lab import mc

        mc_loaded = mc.load_tasks(mc_tasks)  # before loading the model: a typo fails in seconds
        mc_tasks = mc_loaded[0]
    trig_rows = load_instructions(triggered, need_output=False)[:limit] if triggered else []
    clean_rows = load_instructions(clean, need_output=False)[:limit] if clean else []
    model, tok, kind = load_any(Path(model_path), base)
    t0 = time.time()
    result: dict = {
        "model": str(model_path),  # what was evaluated (adapter or full model dir)
        "kind": kind,  # "adapter" or "full"
        "task": task,  # which keyword rule
        "rule": rule,  # keywords and whether success means any/none present; empty outputs never count
        "decoding": {"greedy": True, "max_new_tokens": max_new_tokens},
        "inputs": {"triggered": str(triggered) if triggered else None, "clean": str(clean) if clean else None,
                   "triggered_sha256": sha256_file(Path(triggered)) if triggered else None,
                   "clean_sha256": sha256_file(Path(clean)) if clean else None},
        "environment": environment(),
    }
    from bdclean.train.device import current

    result["placement"] = current().record()  # the model's dtype and device (train/device.py)
    total = len(trig_rows) + len(clean_rows)
    with progress() as bar:
        tid = bar.add_task("eval: generating", total=total)
        gen_t0 = time.time()
        tout = generate(model, tok, trig_rows, max_new_tokens, batch_size, on_batch=lambda k: bar.update(tid, advance=k)) if trig_rows else []
        cout = generate(model, tok, clean_rows, max_new_tokens, batch_size, on_batch=lambda k: bar.update(tid, advance=k)) if clean_rows else []
        gen_s = time.time() - gen_t0
    if trig_rows:
        result["triggered"], th = asr(tout, rule)  # ASR on prompts carrying the trigger
    if clean_rows:
        result["clean"], ch = asr(cout, rule)  # false-trigger rate on clean prompts
        with_ref = ref_rows if ref_rows is not None else [r for r in clean_rows if r["output"].strip()]
        if spec is not None:
            from bdclean.lab.skills import skill_metrics

            result["skill"] = skill_metrics(spec, clean_rows, cout)
        if with_ref:
            nll, ntok = mean_nll(model, [encode(tok, r, 256) for r in with_ref], tok.pad_token_id)
            result["perplexity"] = math.exp(nll)  # of reference responses on clean prompts (response tokens only)
            result["perplexity_tokens"] = ntok
            result["perplexity_references"] = str(reference) if reference is not None else "clean"
    result["generations"] = {
        "triggered": [{"prompt": r["instruction"], "input": r["input"], "output": o, "success": h}
                      for r, o, h in zip(trig_rows, tout, th if trig_rows else [])],
        "clean": [{"prompt": r["instruction"], "input": r["input"], "output": o, "success": h}
                  for r, o, h in zip(clean_rows, cout, ch if clean_rows else [])],
    }
    if mc_tasks:
        result["mc"] = mc.run_mc(model, tok, mc_tasks, limit, batch_size, mc_loaded)  # {task: {acc, acc_norm, n}}
    result["seconds"] = round(time.time() - t0, 2)
    result["generation_s_per_100_prompts"] = round(100 * gen_s / total, 2) if total else None
    result = schemas.write(schemas.Eval, out, result)
    summary = []
    if trig_rows:
        summary.append(f"triggered ASR {100 * result['triggered']['asr']:.1f}%")
    if clean_rows:
        summary.append(f"clean ASR {100 * result['clean']['asr']:.1f}%")
    if "skill" in result:
        summary.append(f"skill ({result['skill']['skill']}) {100 * result['skill']['score']:.1f}%")
    if "perplexity" in result:
        summary.append(f"perplexity {result['perplexity']:.3f}")
    for name, r in result.get("mc", {}).items():
        summary.append(f"{name} acc {100 * r['acc']:.1f}%")
    log(f"eval {model_path}: " + ", ".join(summary) + f" → {out}")
    return result
