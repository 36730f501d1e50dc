"""ablate: where does a planted backdoor live? Triggered and clean ASR of masked copies of a suspicious adapter
(in memory, no restore); the paper's Table 1 sanity checks. Uses the implant's attack.json (ground truth): lab only.

Masks (``--masks``, comma-separated):
none            the suspicious adapter as it is
signature       the run's signature (score/scores.safetensors): its MLP channels and attention units
mlp, attn       every MLP / every attention LoRA entry
oracle          top-τ channels by the suspicious adapter's own ΔW norms (what bdclean cannot know), τ = the
                signature's; its row records the overlap with the signature
random          a seeded random channel set of the signature's size (control)
signature+attn  the signature's channels and every attention LoRA entry
sig:KIND:TAU:HEADS  scores KIND (combined | norm | align | projection) recomputed from RUN/diff at ratio TAU, plus a
                HEADS fraction (or 'all') of attention units
proj:TAU:HEADS  = sig:projection:TAU:HEADS (experimental: ranked by how far the adapter's own update reaches along
                the variants' backdoor directions)
zero:PART:A-B   a layer band: every PART (all | mlp | attn) LoRA of layers A..B-1 zeroed

Each mask zeroes LoRA entries in memory; triggered and clean ASR are measured on the first N test prompts (greedy,
``tokens`` new tokens: 8 is enough for the BackdoorLLM targets), with the share of the adapter's update ‖ΔW‖² the
mask keeps. Writes OUT/ablate.json (settings and one row per mask) and OUT/ablate.md (the table).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from bdclean import constants as C
from bdclean.console import log
from bdclean.errors import InputError, UsageError, at_least

DEFAULT_MASKS = "none,signature,mlp,attn,oracle,signature+attn"
NAMED = ("none", "signature", "mlp", "attn", "oracle", "random", "signature+attn")
RESULT_JSON, RESULT_MD = "ablate.json", "ablate.md"
SCORE_KINDS = ("combined", "norm", "align", "projection")
ZERO_PARTS = ("all", "mlp", "attn")


def parse_masks(masks: str, layers: int | None = None) -> list[str]:
    """The mask names of ``--masks``, each checked (UsageError, one line, naming the bad one)."""
    names = [m.strip() for m in masks.split(",") if m.strip()]
    if not names:
        raise UsageError("--masks: give one or more masks, comma-separated (e.g. none,signature,mlp)")
    for name in names:
        _check_mask(name, layers)
    return names


def _check_mask(name: str, layers: int | None) -> None:
    parts = name.split(":")
    if parts[0] in ("sig", "proj"):
        fields = ("projection", *parts[1:]) if parts[0] == "proj" else parts[1:]
        if len(fields) != 3:
            raise UsageError(f"--masks: {name!r} must be sig:KIND:TAU:HEADS or proj:TAU:HEADS")
        kind, tau, heads = fields
        if kind not in SCORE_KINDS:
            raise UsageError(f"--masks: {name!r}: score {kind!r} must be one of {', '.join(SCORE_KINDS)}")
        if not 0 < _number(name, tau) <= 1:
            raise UsageError(f"--masks: {name!r}: TAU must lie in (0, 1]")
        if heads != "all" and not 0 <= _number(name, heads) <= 1:
            raise UsageError(f"--masks: {name!r}: HEADS must be 'all' or a fraction in [0, 1]")
        return
    if parts[0] == "zero":
        if len(parts) != 3 or parts[1] not in ZERO_PARTS or parts[2].count("-") != 1:
            raise UsageError(f"--masks: {name!r} must be zero:PART:A-B with PART one of {', '.join(ZERO_PARTS)}")
        lo, hi = (_integer(name, x) for x in parts[2].split("-"))
        if not 0 <= lo < hi or (layers is not None and hi > layers):
            top = f" and B <= {layers} (the base's layers)" if layers is not None else ""
            raise UsageError(f"--masks: {name!r}: the layer band needs 0 <= A < B{top}")
        return
    if name not in NAMED:
        raise UsageError(f"--masks: unknown mask {name!r}; choose from {', '.join(NAMED)}, sig:KIND:TAU:HEADS, "
                         "proj:TAU:HEADS or zero:PART:A-B")


def _number(name: str, text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise UsageError(f"--masks: {name!r}: {text!r} is not a number") from None


def _integer(name: str, text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise UsageError(f"--masks: {name!r}: {text!r} is not a layer index") from None


def markdown(rows: list[dict]) -> str:
    """The rows as a markdown table (ASR and kept update in percent)."""
    pct = lambda v: "–" if v is None else f"{100 * v:.1f}"  # noqa: E731
    lines = ["| mask | triggered ASR % | clean ASR % | τ | units | kept update % | seconds |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| `{r['mask']}` | {pct(r['triggered_asr'])} | {pct(r['clean_asr'])} | {r['tau']} | "
                     f"{r['heads']} | {pct(r['kept_update_share'].get('all'))} | {r['seconds']} |")
    return "\n".join(lines) + "\n"


def run(run_dir: Path, out: Path, adapter: Path | None = None, base: str = "smollm2", masks: str = DEFAULT_MASKS,
        n: int = 50, tokens: int = 8, force: bool = False) -> list[dict]:
    import torch
    from safetensors.torch import load_file

    from bdclean.core.arch import attn_module_names, head_geometry, mlp_module_names, peft_key
    from bdclean.core.masks import suppress_lora_channels, suppress_lora_heads
    from bdclean.core.score import combine, norm_and_align, projection, select_top, select_top_k, unit_count
    from bdclean.io.artifacts import read_json, write_json, write_text
    from bdclean.io.data import load_instructions
    from bdclean.io.models import load_model, load_tokenizer, read_model_config
    from bdclean.io.peft_io import attach, load_state
    from bdclean.lab.attacks import RULES, is_success
    from bdclean.pipeline import diff as diff_stage
    from bdclean.pipeline.diff import load_grams, load_own
    from bdclean.pipeline.run import load_suspicious
    from bdclean.pipeline.suppress import kept_update
    from bdclean.train.generate import generate

    at_least("--n", n)
    at_least("--tokens", tokens)
    run_dir, out = Path(run_dir), Path(out)
    sus_dir = Path(adapter) if adapter is not None else run_dir / "suspicious"
    if not run_dir.is_dir():
        raise InputError(f"{run_dir}: run folder not found")
    if (out / RESULT_JSON).exists() and not force:
        raise UsageError(f"{out / RESULT_JSON}: already exists; pass --force to overwrite")
    scores_file = run_dir / C.STAGE_DIRS["score"] / C.SCORES
    if not scores_file.is_file():
        raise InputError(f"{scores_file}: not found; run `bdclean purify` (or up to `bdclean score`) on {run_dir} first")
    if not (sus_dir / C.ATTACK_RECORD).is_file():
        raise InputError(f"{sus_dir}: no {C.ATTACK_RECORD}; ablate needs an implant (`bdclean implant`) with its "
                         "ground truth and test sets")
    record = read_json(sus_dir / C.ATTACK_RECORD)
    if record.get("task") not in RULES:
        raise InputError(f"{sus_dir / C.ATTACK_RECORD}: task {record.get('task')!r} is not one of {', '.join(RULES)}")
    sus = load_suspicious(sus_dir, base)
    if sus.kind != "adapter":
        raise UsageError(f"{sus_dir}: ablate masks LoRA adapters; this is a full checkpoint")
    info, base_dir = sus.info, sus.base_dir
    cfg = read_model_config(base_dir)
    L = cfg["num_hidden_layers"]
    names = parse_masks(masks, L)
    trig = load_instructions(sus_dir / "test_triggered.jsonl")[:n]
    clean = load_instructions(sus_dir / "test_clean.jsonl")[:n]
    rule = RULES[record["task"]]
    mlp = [{k: peft_key(v) for k, v in d.items()} for d in mlp_module_names(cfg["model_type"], L)]
    attn = [{k: peft_key(v) for k, v in d.items()} for d in attn_module_names(cfg["model_type"], L)]
    scores = load_file(str(scores_file))
    sig = scores["mask"].bool()
    units = [tuple(u) for u in scores["head_mask"].bool().nonzero().tolist()] if "head_mask" in scores else []
    tok = load_tokenizer(base_dir)
    model = attach(load_model(base_dir), info)
    T = info.tensors

    def own_norms() -> torch.Tensor:
        """Per-channel norm of the suspicious adapter's own ΔW (gate row, up row, down column)."""
        rows = []
        for names_ in mlp:
            norm = 0
            for part in ("gate", "up"):
                d = T[names_[part] + ".lora_B.weight"].double() @ T[names_[part] + ".lora_A.weight"].double()
                norm = norm + (d ** 2).sum(1)
            d = T[names_["down"] + ".lora_B.weight"].double() @ T[names_["down"] + ".lora_A.weight"].double()
            rows.append((norm + (d ** 2).sum(0)).sqrt())
        return torch.stack(rows)

    def top_mask(s: torch.Tensor, k: int) -> torch.Tensor:
        m = torch.zeros(s.numel(), dtype=torch.bool)
        m[s.flatten().topk(k).indices] = True
        return m.view_as(s)

    grams: list = []  # (G, HG, own) from RUN/diff, read on the first ablation only

    def ablation(spec: str) -> tuple[dict, torch.Tensor, list]:
        """``sig:KIND:TAU:HEADS`` or ``proj:TAU:HEADS`` → (masked tensors, channel mask, units), scores recomputed
        from the Gram files."""
        parts = spec.split(":")
        kind, tau, heads = ("projection", *parts[1:]) if parts[0] == "proj" else parts[1:]
        if not grams:
            diff_stage.run(run_dir)  # a no-op when up to date; adds the projection terms to older runs
            grams.extend((*load_grams(run_dir / "diff"), load_own(run_dir / "diff")))
        G, HG, own = grams
        if kind == "projection" and own is None:
            raise UsageError(f"{run_dir}/diff has no projection terms (full-model run, or the adapter moved)")

        def rank(g: torch.Tensor, part: int) -> torch.Tensor:
            return projection(own[part], g) if kind == "projection" else combine(*norm_and_align(g), 0.01, kind,
                                                                                    "none")

        m = select_top(rank(G, 0), float(tau), "global")
        us: list = []
        if HG is not None:
            k = unit_count(heads if heads == "all" else float(heads), HG.shape[0] * HG.shape[1])
            us = [tuple(u) for u in select_top_k(rank(HG, 1), k).nonzero().tolist()]
        t = suppress_lora_heads(suppress_lora_channels(T, m, mlp)[0], us, attn, *head_geometry(cfg))[0]
        return t, m, us

    def zero_b(t: dict, modules: list[dict]) -> dict:
        """``t`` with lora_B of every module in ``modules`` (name dicts, one per layer) zeroed."""
        t = dict(t)
        for key in (name + ".lora_B.weight" for names_ in modules for name in names_.values()):
            if key in t:
                t[key] = torch.zeros_like(t[key])
        return t

    def zero_attn(t: dict) -> dict:
        return zero_b(t, attn)

    def zero_layers(spec: str) -> dict:
        """``zero:PART:A-B``: every LoRA of PART (all|mlp|attn) in layers A..B-1 zeroed (lora_B := 0)."""
        _, part, span = spec.split(":")
        lo, hi = (int(x) for x in span.split("-"))
        groups = {"mlp": [mlp], "attn": [attn], "all": [mlp, attn]}[part]
        return zero_b(T, [g[layer] for g in groups for layer in range(lo, hi)])

    oracle = top_mask(own_norms(), int(sig.sum()))  # what bdclean cannot know: the suspicious adapter's own norms
    named = {
        "none": lambda: T,
        "signature": lambda: suppress_lora_heads(suppress_lora_channels(T, sig, mlp)[0], units, attn,
                                                 *head_geometry(cfg))[0],
        "mlp": lambda: suppress_lora_channels(T, torch.ones_like(sig), mlp)[0],
        "attn": lambda: zero_attn(T),
        "oracle": lambda: suppress_lora_channels(T, oracle, mlp)[0],
        "random": lambda: suppress_lora_channels(
            T, (torch.rand(sig.shape, generator=torch.Generator().manual_seed(0)) < sig.float().mean()), mlp)[0],
        "signature+attn": lambda: zero_attn(suppress_lora_channels(T, sig, mlp)[0]),
    }
    mlp_keys = {k for names_ in mlp for k in names_.values()}
    rows = []
    for name in names:
        t0 = time.time()
        m_, u_ = sig, units
        if name.startswith(("sig:", "proj:")):
            tensors, m_, u_ = ablation(name)
        elif name.startswith("zero:"):
            tensors = zero_layers(name)
        else:
            tensors = named[name]()
        load_state(model, tensors)
        overlap = (oracle & sig).sum().item() / sig.sum().item() if name == "oracle" and sig.any() else None
        to = generate(model, tok, trig, max_new_tokens=tokens)
        co = generate(model, tok, clean, max_new_tokens=tokens)
        res = {"mask": name,
               "triggered_asr": sum(is_success(o, rule) for o in to) / len(to) if to else None,
               "clean_asr": sum(is_success(o, rule) for o in co) / len(co) if co else None, "n": n,
               "signature_overlap": overlap, "tau": round(float(m_.float().mean()), 4), "heads": len(u_),
               "kept_update_share": kept_update(info, tensors, mlp_keys),
               "seconds": round(time.time() - t0, 1)}
        log(f"ablate {name}: {json.dumps({k: v for k, v in res.items() if k != 'mask'})}")
        rows.append(res)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / RESULT_JSON, {"run": str(run_dir), "adapter": str(sus_dir), "base": str(base_dir),
                                   "task": record["task"], "n": n, "tokens": tokens, "rows": rows})
    write_text(out / RESULT_MD, f"# Ablation of {sus_dir}\n\nFirst {n} test prompts of each set, {tokens} new "
                                f"tokens, greedy; no restore.\n\n" + markdown(rows))
    log(f"ablate: {len(rows)} masks → {out / RESULT_MD}")
    return rows
