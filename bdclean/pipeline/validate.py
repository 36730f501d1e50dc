"""validate: every check purify makes before it starts work, and a summary of what it would purify.

For hubs and scripts vetting third-party adapters: the suspicious model is read and checked exactly as purify
reads it (safetensors only, no pickles, no remote code, LoRA factors of MLP/attention projections only, shapes
against the base, finite values), the options are resolved (CLI > YAML > defaults) and the clean data is parsed.
Nothing is trained and nothing is written.
"""

from __future__ import annotations

from pathlib import Path

from bdclean.config import PurifyConfig


def run(model: Path, cfg: PurifyConfig, out: Path | None = None) -> dict:
    from bdclean.core.arch import ATTN_PROJ, LAYER_RE
    from bdclean.io.data import load_instructions
    from bdclean.pipeline.purify import check_out, preflight
    from bdclean.pipeline.variants import check_pool

    sus = preflight(Path(model), cfg)
    if out is not None:  # what purify would refuse to overwrite
        check_out(Path(out), sus, cfg)
    rows = load_instructions(cfg.clean)
    check_pool(cfg.clean, rows, cfg.variants.samples)
    mc = sus.model_cfg
    summary = {
        "model": str(sus.path),  # the suspicious adapter or checkpoint
        "kind": sus.kind,  # "adapter" (adapter-only threat model) or "full" (full-model threat model)
        "sha256": sus.digest(),  # what train-pairs will record as its input
        "base": str(sus.base_dir),  # the model the adapter is attached to (the checkpoint itself when full)
        "model_type": mc.get("model_type"),
        "layers": mc.get("num_hidden_layers"),
        "mlp_channels_per_layer": mc.get("intermediate_size"),
        "clean_samples": len(rows),  # rows of the clean data (variants draw --samples each, restore its own)
        "config": cfg.model_dump(by_alias=True),  # the resolved options purify would run with
        "memory": sus.memory,  # bytes per training process, from the weight headers (purify.memory_estimate)
    }
    if cfg.prompts is not None:  # preflight has parsed it; the count is what --prompts would draw from
        from bdclean.io.data import sample_prompts

        summary["task_prompts"] = sample_prompts(cfg.prompts, 1, 0)[1]
    if sus.tokenizer is not None:  # full checkpoints: where the purified model's tokenizer will come from
        summary["tokenizer"] = sus.tokenizer.record()
    if sus.kind == "adapter":
        pairs = sus.info.module_pairs()
        projs = sorted({m.rsplit(".", 1)[-1] for m in pairs})
        layers = sorted({int(x.group(1)) for m in pairs if (x := LAYER_RE.search(m))})
        summary["lora"] = {
            "modules": len(pairs),  # LoRA-adapted projections in the file
            "projections": projs,  # which of q/k/v/o/gate/up/down are adapted
            "layers": layers,  # decoder layers with any LoRA
            "ranks": sorted({int(sus.info.shapes[a][0]) for a, _ in pairs.values()}),
            "attention": any(p in projs for p in ATTN_PROJ),
        }
    if cfg.extract is not None:  # the known-base route: what purify --extract will turn the checkpoint into
        from bdclean.io.models import read_model_config, resolve_base
        from bdclean.pipeline.extract import projections

        base_dir = resolve_base(cfg.base)
        summary["base"] = str(base_dir)
        summary["extract"] = {"rank": cfg.extract, "projections": len(projections(read_model_config(base_dir)))}
    return summary


__all__ = ["run"]
