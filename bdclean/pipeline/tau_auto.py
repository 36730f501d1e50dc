"""Automatic τ by self-validation on held-out synthetic backdoors (``--tau auto``).

For each held-out variant h (its key k_h and behavior b_h are known to us): the signature is recomputed from the
other variants' deltas only (MLP channels at each τ of a grid, plus the same share of attention units that purify
adds); those entries are suppressed in h's backdoored twin θ_h^bd (which carries the suspicious model's unknown
backdoor *and* the known synthetic one), a mini restore is run (the restore recipe on few samples), and we measure
on clean prompts that h never trained on, with k_h inserted:
- the **removal** of the held-out backdoor: the mean NLL of b_h under the key, placed between the unsuppressed
  θ_h^bd (0) and h's clean twin θ_h^clean (1), both after the same mini restore. Teacher-forced likelihood is a
  far steadier signal than an ASR of a few greedy generations (the synthetic backdoors are weak: on the demo their
  held-out ASR was 12.5 % before any suppression, so an ASR target was met at once and τ came out too small);
- the held-out key's ASR (does the output contain the start of b_h?), recorded and used as a second condition;
- the perplexity of clean references.
The chosen τ is the smallest grid value whose mean removal reaches ``target_removal`` and mean held-out ASR is at
most ``target_asr`` while perplexity stays within ``max_ppl_increase`` of the unsuppressed θ_h^bd after the same
mini restore; if no τ meets all three, the τ with the highest removal within the perplexity budget (else the
smallest τ) is chosen and the reason recorded.
"""

from __future__ import annotations

import math
import random

import torch

from bdclean import constants as C
from bdclean.console import log, progress
from bdclean.errors import UsageError
from bdclean.io.artifacts import load_manifest, read_json


def _behavior_hit(output: str, behavior: str) -> bool:
    probe = behavior.strip()[:24].lower()
    return bool(output.strip()) and probe in output.lower()


def select(run, opts, G: torch.Tensor, HG: torch.Tensor | None = None) -> dict:
    """Run the selection; returns the record written to tau_selection.json (with "tau": the choice)."""
    from safetensors.torch import load_file

    from bdclean.config import RestoreOptions
    from bdclean.core.arch import attn_module_names, head_geometry, mlp_module_names, peft_key
    from bdclean.core.masks import suppress_lora_channels, suppress_lora_heads
    from bdclean.core.score import combine, norm_and_align, select_top, select_top_k, unit_count
    from bdclean.io.data import load_instructions
    from bdclean.io.models import AdapterInfo, load_model, load_tokenizer, read_model_config
    from bdclean.io.peft_io import attach, load_state
    from bdclean.pipeline.variants import insert_key
    from bdclean.train.chat import encode
    from bdclean.train.finetune import finetune
    from bdclean.train.generate import generate
    from bdclean.train.loop import mean_nll

    vfolder, pfolder = run.folder("make-variants"), run.folder("train-pairs")
    pman = load_manifest(pfolder)
    if run.mode != "adapter":
        raise UsageError("--tau auto is implemented for the adapter-only threat model; give a fixed --tau")
    spec = read_json(vfolder / C.VARIANTS_FILE)
    n = spec["n_variants"]
    if n < 3:
        raise UsageError("--tau auto needs at least 3 variants (one held out, two to score)")
    grid = sorted(set(opts.tau_grid))
    holdouts = list(range(min(opts.holdout, n - 2)))
    base_dir = run.base_dir
    base_cfg = read_model_config(base_dir)
    modules = [{k: peft_key(v) for k, v in names.items()}
               for names in mlp_module_names(base_cfg["model_type"], G.shape[0])]
    attn = [{k: peft_key(v) for k, v in names.items()}
            for names in attn_module_names(base_cfg["model_type"], G.shape[0])]
    geometry = head_geometry(base_cfg)
    n_units = unit_count(opts.heads, HG.shape[0] * HG.shape[1]) if HG is not None and opts.heads else 0
    tok = load_tokenizer(base_dir)
    acfg = read_json(pfolder / "suspicious_adapter_config.json")
    first = load_file(str(pfolder / C.PAIR_WEIGHTS.format(i=0, twin="bd")))
    model = attach(load_model(base_dir), AdapterInfo(pfolder, acfg, first), first)
    clean_name = pman["config"].get("clean") or load_manifest(vfolder)["config"]["clean"]
    pool = load_instructions(clean_name)
    mini = RestoreOptions(samples=opts.selection_restore_samples, epochs=1, lr=2e-4, seed=0, max_len=64,
                          augment=0)  # the mini restores as measured when τ auto was built
    rec = {"grid": grid, "target_removal": opts.target_removal, "target_asr": opts.target_asr,
           "max_ppl_increase": opts.max_ppl_increase, "holdout": holdouts, "prompts": opts.selection_prompts,
           "attention_units": n_units, "mini_restore": mini.model_dump(), "runs": [], "clean_twins": []}
    total = len(holdouts) * (len(grid) + 2)

    def measure(tensors: dict, what: str, probes_bd: list, trig: list, behavior: str, ref_ex: list) -> dict:
        """Mini restore from ``tensors``, then behavior NLL under the key, held-out ASR and clean perplexity."""
        load_state(model, tensors)
        for p in model.parameters():
            p.grad = None
        finetune(model, tok, clean_name, mini, mini.lr, f"tau auto: {what} mini restore")
        b_nll, _ = mean_nll(model, probes_bd, tok.pad_token_id)
        outs = generate(model, tok, trig, max_new_tokens=24)
        nll, _ = mean_nll(model, ref_ex, tok.pad_token_id)
        return {"behavior_nll": b_nll, "asr": sum(_behavior_hit(o, behavior) for o in outs) / len(outs),
                "perplexity": math.exp(nll)}

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
            probes_bd = [encode(tok, t, 96, output=v["behavior"]) for t in trig]
            keep = [i for i in range(n) if i != h]
            Gh = G[..., keep, :][..., :, keep]
            nrm, aln = norm_and_align(Gh)
            scores = combine(nrm, aln, opts.lam, opts.score, opts.norm_scale)
            units: list = []
            if n_units:
                HGh = HG[..., keep, :][..., :, keep]
                hmask = select_top_k(combine(*norm_and_align(HGh), opts.lam, opts.score, opts.norm_scale), n_units)
                units = [tuple(u) for u in hmask.nonzero().tolist()]
            twin = load_file(str(pfolder / C.PAIR_WEIGHTS.format(i=h, twin="clean")))
            ref = measure(twin, f"variant {h} clean twin", probes_bd, trig, v["behavior"], ref_ex)
            rec["clean_twins"].append({"holdout": h, **ref})
            bar.update(task, advance=1)
            bd = load_file(str(pfolder / C.PAIR_WEIGHTS.format(i=h, twin="bd")))
            for tau in [0.0] + grid:
                tensors = bd
                if tau > 0:
                    tensors = suppress_lora_channels(bd, select_top(scores, tau, opts.scope), modules)[0]
                    tensors = suppress_lora_heads(tensors, units, attn, *geometry)[0]
                m = measure(tensors, f"variant {h} τ={tau:g}", probes_bd, trig, v["behavior"], ref_ex)
                rec["runs"].append({"holdout": h, "tau": tau, **m})
                bar.update(task, advance=1)
                del tensors
    # aggregate over held-out variants
    rec["table"] = aggregate(rec["runs"], rec["clean_twins"])
    rec["min_gap_nats"] = MIN_GAP
    rec["synthetic_asr_before"] = rec["table"][0]["asr"]
    if rec["table"][0]["removal"] is None:
        from bdclean.config import DEFAULT_TAU

        rec["tau"] = DEFAULT_TAU["adapter"]
        rec["reason"] = (f"no held-out synthetic backdoor took (behavior NLL within {MIN_GAP} nats of its clean "
                         "twin): the selection cannot measure anything, so the default τ is used")
        log(f"tau auto: {rec['reason']} (τ={rec['tau']:g})")
        return rec
    choice, why = choose(rec["table"][1:], opts.target_asr, opts.max_ppl_increase, opts.target_removal)
    rec["tau"], rec["reason"] = choice["tau"], why
    log(f"tau auto: chose τ={choice['tau']:g} ({why}); held-out backdoor removal {choice['removal']:.0%}, "
        f"ASR {rec['table'][0]['asr']:.0%} unsuppressed → {choice['asr']:.0%}")
    return rec


MIN_GAP = 0.1  # nats: a held-out backdoor whose behavior NLL is not this much below its clean twin's did not take


def aggregate(runs: list[dict], clean_twins: list[dict]) -> list[dict]:
    """Rows {"tau", "asr", "ppl_ratio", "removal"} averaged over held-out variants, τ = 0 first (pure).

    removal = (NLL_τ − NLL_0) / (NLL_clean − NLL_0) of the held-out behavior under its key, clipped to [0, 1],
    averaged over the held-out backdoors that took (NLL_clean − NLL_0 ≥ MIN_GAP); None when none did."""
    taus = sorted({r["tau"] for r in runs})
    base = {r["holdout"]: r for r in runs if r["tau"] == 0.0}
    gaps = {c["holdout"]: c["behavior_nll"] - base[c["holdout"]]["behavior_nll"] for c in clean_twins}
    table = []
    for tau in taus:
        rows = [r for r in runs if r["tau"] == tau]
        rem = [min(1.0, max(0.0, (r["behavior_nll"] - base[r["holdout"]]["behavior_nll"]) / gaps[r["holdout"]]))
               for r in rows if gaps.get(r["holdout"], 0.0) >= MIN_GAP]
        table.append({"tau": tau, "asr": sum(r["asr"] for r in rows) / len(rows),
                      "ppl_ratio": sum(r["perplexity"] / base[r["holdout"]]["perplexity"] for r in rows) / len(rows),
                      "removal": sum(rem) / len(rem) if rem else None})
    return table


def choose(table: list[dict], target_asr: float, max_ppl_increase: float,
           target_removal: float = 0.0) -> tuple[dict, str]:
    """The selection rule over rows {"tau", "asr", "ppl_ratio", "removal"} sorted by τ (pure; see the module
    docstring). Rows without "removal" count as fully removed, so an ASR-only table still works."""
    budget = [t for t in table if t["ppl_ratio"] <= 1 + max_ppl_increase]
    ok = [t for t in budget if t.get("removal", 1.0) >= target_removal and t["asr"] <= target_asr]
    if ok:
        return ok[0], "smallest τ meeting the held-out removal and ASR targets within the perplexity budget"
    if budget:
        return (min(budget, key=lambda t: (-t.get("removal", 1.0), t["asr"], t["tau"])),
                "no τ met the targets; most held-out removal within the perplexity budget")
    return table[0], "no τ stayed within the perplexity budget; smallest τ on the grid"
