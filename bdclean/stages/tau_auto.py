"""Automatic τ by self-validation on held-out synthetic backdoors (``--tau auto``).

For each held-out variant h (its key k_h and behavior b_h are known to us): the signature is recomputed from the
other variants' deltas only; for each τ on a grid, those channels are suppressed in h's backdoored twin θ_h^bd
(which carries the suspicious model's unknown backdoor *and* the known synthetic one), a mini restore is run
(the same recipe as restore, on few samples), and we measure the held-out key's ASR (does the output contain the
start of b_h?) on clean prompts that h never trained on, and the perplexity of clean references. The chosen τ is
the smallest grid value whose mean held-out ASR is at most ``target_asr`` while perplexity stays within
``max_ppl_increase`` of the unsuppressed θ_h^bd after the same mini restore; if no τ meets both, the τ with the
lowest ASR within the perplexity budget (else the smallest τ) is chosen and the reason recorded.
"""

from __future__ import annotations

import math
import random
from pathlib import Path

import torch

from bdclean import constants as C
from bdclean.console import log, progress
from bdclean.errors import UsageError
from bdclean.io.artifacts import load_manifest, read_json


def _behavior_hit(output: str, behavior: str) -> bool:
    probe = behavior.strip()[:24].lower()
    return bool(output.strip()) and probe in output.lower()


def select(out: Path, opts, G: torch.Tensor) -> dict:
    """Run the selection; returns the record written to tau_selection.json (with "tau": the choice)."""
    from safetensors.torch import load_file

    from bdclean.config import RestoreOptions
    from bdclean.core.arch import mlp_module_names, peft_key
    from bdclean.core.masks import suppress_lora_channels
    from bdclean.core.score import combine, norm_and_align, select_top
    from bdclean.io.data import load_instructions
    from bdclean.io.models import AdapterInfo, load_model, load_tokenizer, read_model_config
    from bdclean.io.peft_io import attach, load_state
    from bdclean.stages.restore import _train
    from bdclean.stages.variants import insert_key
    from bdclean.train.chat import encode
    from bdclean.train.generate import generate
    from bdclean.train.loop import mean_nll

    out = Path(out)
    vfolder, pfolder = out / C.STAGE_DIRS["make-variants"], out / C.STAGE_DIRS["train-pairs"]
    pman = load_manifest(pfolder)
    if pman["config"].get("mode") != "adapter":
        raise UsageError("--tau auto is implemented for the adapter-only threat model; give a fixed --tau")
    spec = read_json(vfolder / C.VARIANTS_FILE)
    n = spec["n_variants"]
    if n < 3:
        raise UsageError("--tau auto needs at least 3 variants (one held out, two to score)")
    grid = sorted(set(opts.tau_grid))
    holdouts = list(range(min(opts.holdout, n - 2)))
    base_dir = Path(pman["config"]["base"])
    base_cfg = read_model_config(base_dir)
    modules = [{k: peft_key(v) for k, v in names.items()}
               for names in mlp_module_names(base_cfg["model_type"], G.shape[0])]
    tok = load_tokenizer(base_dir)
    acfg = read_json(pfolder / "suspicious_adapter_config.json")
    first = load_file(str(pfolder / C.PAIR_WEIGHTS.format(i=0, twin="bd")))
    model = attach(load_model(base_dir), AdapterInfo(pfolder, acfg, first), first)
    clean_name = pman["config"].get("clean") or load_manifest(vfolder)["config"]["clean"]
    pool = load_instructions(clean_name)
    mini = RestoreOptions(samples=opts.selection_restore_samples, epochs=1, lr=2e-4, seed=0, max_len=64)
    rec = {"grid": grid, "target_asr": opts.target_asr, "max_ppl_increase": opts.max_ppl_increase,
           "holdout": holdouts, "prompts": opts.selection_prompts, "mini_restore": mini.model_dump(), "runs": []}
    total = len(holdouts) * (len(grid) + 1)
    with progress() as bar:
        task = bar.add_task("tau auto", total=total)
        for h in holdouts:
            v = spec["variants"][h]
            used = set(v["samples"])
            rng = random.Random(1000 + h)
            free = [r for k, r in enumerate(pool) if k not in used]
            rng.shuffle(free)
            probes = free[: opts.selection_prompts]
            refs = free[opts.selection_prompts: opts.selection_prompts + 24] or probes
            trig = [{"instruction": insert_key(r["instruction"], v["key"], v["key_kind"], rng), "input": r["input"]}
                    for r in probes]
            ref_ex = [encode(tok, r, 96) for r in refs]
            keep = [i for i in range(n) if i != h]
            Gh = G[..., keep, :][..., :, keep]
            nrm, aln = norm_and_align(Gh)
            scores = combine(nrm, aln, opts.lam, opts.score, opts.norm_scale)
            bd = load_file(str(pfolder / C.PAIR_WEIGHTS.format(i=h, twin="bd")))
            for tau in [0.0] + grid:
                tensors = bd if tau == 0.0 else suppress_lora_channels(bd, select_top(scores, tau, opts.scope),
                                                                        modules)[0]
                load_state(model, tensors)
                for p in model.parameters():
                    p.grad = None
                _train(model, tok, clean_name, mini, mini.lr, f"tau auto: variant {h} τ={tau:g} mini restore")
                outs = generate(model, tok, trig, max_new_tokens=24)
                asr = sum(_behavior_hit(o, v["behavior"]) for o in outs) / len(outs)
                nll, _ = mean_nll(model, ref_ex, tok.pad_token_id)
                rec["runs"].append({"holdout": h, "tau": tau, "asr": asr, "perplexity": math.exp(nll)})
                bar.update(task, advance=1)
                del tensors
    # aggregate over held-out variants
    table = []
    for tau in [0.0] + grid:
        rows = [r for r in rec["runs"] if r["tau"] == tau]
        ref = {r["holdout"]: r["perplexity"] for r in rec["runs"] if r["tau"] == 0.0}
        ratio = sum(r["perplexity"] / ref[r["holdout"]] for r in rows) / len(rows)
        table.append({"tau": tau, "asr": sum(r["asr"] for r in rows) / len(rows), "ppl_ratio": ratio})
    rec["table"] = table
    choice, why = choose(table[1:], opts.target_asr, opts.max_ppl_increase)
    rec["tau"], rec["reason"] = choice["tau"], why
    rec["synthetic_asr_before"] = table[0]["asr"]
    log(f"tau auto: chose τ={choice['tau']:g} ({why}); held-out ASR {table[0]['asr']:.0%} unsuppressed → "
        f"{choice['asr']:.0%}")
    return rec


def choose(table: list[dict], target_asr: float, max_ppl_increase: float) -> tuple[dict, str]:
    """The selection rule over rows {"tau", "asr", "ppl_ratio"} sorted by τ (pure; see module docstring)."""
    ok = [t for t in table if t["asr"] <= target_asr and t["ppl_ratio"] <= 1 + max_ppl_increase]
    if ok:
        return ok[0], "smallest τ meeting the held-out ASR target within the perplexity budget"
    within = [t for t in table if t["ppl_ratio"] <= 1 + max_ppl_increase]
    if within:
        return (min(within, key=lambda t: (t["asr"], t["tau"])),
                "no τ met the ASR target; lowest held-out ASR within the perplexity budget")
    return table[0], "no τ stayed within the perplexity budget; smallest τ on the grid"
