"""The model card (README.md) restore writes into the purified folder, in the form PEFT's ``save_pretrained``
writes one (YAML front matter, then markdown), so a model hub shows its users what the model is.

Everything in it comes from bdclean's own records of the run (the stage manifests and signature.json) and the
restore options: nothing from the suspicious model's files (its README, model card or adapter config are hostile
input and their text never passes into the card). The card is no fingerprint input; restore lists it among its
outputs.
"""

from __future__ import annotations

import json
from pathlib import Path

from bdclean import constants as C
from bdclean import schemas
from bdclean.config import RestoreOptions
from bdclean.console import printable
from bdclean.io.artifacts import load_manifest

SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the model the smollm2 alias's GGUF is converted from
TAGS = ("bdclean", "backdoor-purified", "lora")

ALL = ("adapter", "full")
LIMITS = (  # (the modes a limit applies to, the limit)
    (ALL, "Attack success was measured with keyword rules on SmolLM2-135M-Instruct only (BENCHMARKS.md); on "
     "another model, check it with `bdclean eval` and your own triggered and clean test sets."),
    (ALL, "Purification removes what bdclean's suppression finds; it is no proof that no backdoor is left, and the "
     "trigger stays unknown to bdclean."),
    (("adapter",), "The adapter default (channel suppression) keeps roughly 8–11 % of the suspicious adapter's weight "
     "update: skills the restore data lacks may be lost (see the project README and RESULTS.md, 'Skill "
     "retention')."),
    (("full",), "Full-model mode (a suspicious full checkpoint) broke the model on SmolLM2 (RESULTS.md): evaluate "
     "it before use."),
)


def _text(value) -> str:
    """A value for the markdown body: one line, control characters escaped, backticks dropped (they would end the
    code span a value stands in)."""
    return printable(str(value)).replace("`", "'")


def _hub_name(base: str) -> str:
    """The base model's name for the front matter: the hub id for the smollm2 alias's cache, else the path."""
    return SMOLLM2_HUB_ID if Path(base).name == C.SMOLLM2_CACHE_DIR or base == C.SMOLLM2_ALIAS else base


def _suppress_lines(sig, sman: dict, adapter: bool) -> list[str]:
    """What the variants, the signature (if any) and suppress did, from signature.json and suppress's manifest."""
    cfg, extra = sman.get("config", {}), sman.get("extra", {})
    kept = extra.get("kept_update_share") or {}
    left = f"; the adapter keeps {100 * kept['all']:.1f} % of its weight update ‖ΔW‖²" if "all" in kept else ""
    if sig is None:
        energy = extra.get("weight_energy_removed")
        return [f"- suppress (experimental, no signature): projected the subspace the variants' backdoor deltas "
                f"share out of every {'LoRA module' if adapter else 'weight the variants train'} (side "
                f"{cfg.get('side')}, at most {cfg.get('k')} directions per side, eigenvalue ≥ {cfg.get('min_share')}"
                f"): {extra.get('directions_removed', '?')} directions" + left
                + (f", {100 * energy:.2f} % of those weights' ‖W‖²" if energy is not None else "")]
    shown = f"{sig.tau:g}"
    if sig.tau_selection == "auto":
        shown += " (chosen by --tau auto, score/tau_selection.json)"
    return [f"- variants: {sig.n_variants} pairs of twin fine-tunes with known synthetic backdoors",
            f"- signature: {sig.n_selected} of {sig.layers * sig.channels_per_layer} MLP channels (τ = {shown}, "
            f"{sig.scope}, score = {sig.score}) and {len(sig.heads)} attention units",
            f"- suppress: {'zeroed their LoRA entries' if adapter else 're-initialised their weights'}" + left]


def model_card(run, opts: RestoreOptions, clean: str, prompts: str | None, inputs: dict[str, str]) -> str:
    """The card for ``run``'s purified model; ``inputs``: restore's fingerprint inputs (their hashes)."""
    sman = load_manifest(run.folder("suppress")) or {}
    directions = sman.get("config", {}).get("method") == "directions"  # no signature: `suppress --method directions`
    sig = None if directions else schemas.read(schemas.Signature, run.folder("score") / C.SIGNATURE)
    source, base = str(Path(run.model).resolve()), str(Path(run.base_dir).resolve())
    adapter = run.mode == "adapter"
    # json.dumps: a JSON string is a valid YAML scalar, whatever characters the path holds
    front = ["---", f"base_model: {json.dumps(_hub_name(base) if adapter else _text(source))}",
             f"library_name: {'peft' if adapter else 'transformers'}", "tags:", *[f"- {t}" for t in TAGS], "---"]
    what = "adapter" if adapter else "checkpoint"
    lines = [
        *front, "",
        f"# Purified {'LoRA adapter' if adapter else 'model'} (bdclean)", "",
        f"This {'PEFT LoRA adapter' if adapter else 'model'} is a suspicious {what} after `bdclean purify`, which "
        "removes backdoors from LoRA-adapted LLMs without knowing the trigger. This card is bdclean's own: nothing "
        f"in it comes from the suspicious {what}'s files.", "",
        "## Made from", "",
        f"- suspicious {what}: `{_text(source)}` (sha256 fingerprint `{run.recorded_digest or '?'}`)",
    ]
    if adapter:
        lines.append(f"- base model: `{_text(base)}` (sha256 fingerprint `{inputs.get('base', '?')}`)")
    xman = load_manifest(Path(source)) if source != "?" and Path(source).is_dir() else None
    if xman is not None and xman.get("stage") == "extract":  # the known-base route: the adapter is extracted
        xe = xman.get("extra", {})
        lines.append(f"- the suspicious adapter was extracted by `bdclean extract` from the full checkpoint "
                     f"`{_text(xman['config'].get('checkpoint', '?'))}` (sha256 fingerprint "
                     f"`{xman.get('inputs', {}).get('checkpoint', '?')}`): rank {xman['config'].get('rank')}, "
                     f"{100 * xe.get('kept_energy_share', 0):.1f} % of its update's energy; "
                     f"{xe.get('dropped_changed_tensors', 0)} other changed tensors dropped (the base's used)")
    lines += [
        "", "## What bdclean did", "",
        "Stages: make-variants → train-pairs → diff → score → suppress → restore (the run folder's manifests "
        "record every input and output by sha256).", "",
        *_suppress_lines(sig, sman, adapter),
        f"- restore: fine-tuned on {opts.samples} samples of `{_text(clean)}` (data fingerprint "
        f"`{inputs.get('clean', '?')}`), {opts.epochs} epoch(s), seed {opts.seed}",
    ]
    if prompts is not None:
        lines.append(f"- restore also trained on the suspicious model's answers to {opts.prompt_samples} task "
                     f"prompts from `{_text(prompts)}`")
    if opts.augment:
        lines.append(f"- trigger-invariance augmentation: {opts.augment:g} copies per sample")
    if opts.self_distill:
        lines.append(f"- self-distillation: loss {1 - opts.self_distill:g}·CE + {opts.self_distill:g}·KL to the "
                     "suspicious model's next-token distributions on the same rows")
    if opts.adversarial:
        lines.append(f"- adversarial unlearning: trained to give the clean answers also with a universal hidden-state "
                     f"shift of radius {opts.adversarial:g} × the median hidden norm, searched to change the answers "
                     "most")
    lines += [
        "", "## Evaluation", "",
        "purify does not evaluate. Measure the attack success rate and perplexity on your own test sets:", "",
        "```",
        "bdclean eval PURIFIED_DIR " + ("--base BASE " if adapter else "")
        + "--triggered triggered.jsonl --clean clean.jsonl --task TASK --out eval.json",
        "```", "",
        "## Limits", "",
        *[f"- {x}" for modes, x in LIMITS if run.mode in modes], "",
    ]
    return "\n".join(lines)


def merged_card(out: Path) -> str:
    """The card of OUT/merged (`purify --merge`): the purified adapter's card (bdclean's own, in OUT/purified) as a
    full checkpoint's: transformers instead of peft, and what the merge did."""
    text = (Path(out) / C.STAGE_DIRS["restore"] / C.MODEL_CARD).read_text()
    _, front, body = text.split("---\n", 2)
    front = front.replace("library_name: peft", "library_name: transformers").replace("- lora\n", "- merged\n")
    note = ("This full checkpoint is the base model with the purified LoRA adapter below merged into its weights "
            "(`bdclean purify --merge`); its tokenizer files and generation config are the base's.\n\n")
    head, _, rest = body.partition("\n\n")  # the title, then the body
    head = head.replace("Purified LoRA adapter", "Purified model, merged")
    return f"---\n{front}---\n{head}\n\n{note}{rest}"
