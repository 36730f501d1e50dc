"""Weight-name templates per architecture family, kept as data: a new family is one entry."""

from __future__ import annotations

import re

from bdclean.errors import InputError

# {layer} is the block index. Names are relative to the CausalLM (as in a full checkpoint's safetensors).
FAMILIES: dict[str, dict[str, str]] = {
    "llama": {
        "layer": "model.layers.{layer}",
        "gate": "model.layers.{layer}.mlp.gate_proj",
        "up": "model.layers.{layer}.mlp.up_proj",
        "down": "model.layers.{layer}.mlp.down_proj",
        "q": "model.layers.{layer}.self_attn.q_proj",
        "k": "model.layers.{layer}.self_attn.k_proj",
        "v": "model.layers.{layer}.self_attn.v_proj",
        "o": "model.layers.{layer}.self_attn.o_proj",
    },
}
MODEL_TYPES = {"llama": "llama", "mistral": "llama", "qwen2": "llama", "qwen3": "llama", "gemma": "llama",
               "gemma2": "llama", "smollm3": "llama"}
LAYER_RE = re.compile(r"layers\.(\d+)\.")


def family(model_type: str | None, where: object = None) -> dict[str, str]:
    """The weight-name templates of ``model_type`` (read from the config file ``where``, named in the error)."""
    fam = MODEL_TYPES.get(model_type) if isinstance(model_type, str) else None
    if fam is None:
        known = ", ".join(sorted(MODEL_TYPES))
        at = f"{where}: " if where is not None else ""
        raise InputError(f"{at}unsupported architecture (model_type {model_type!r}); supported model types: {known}")
    return FAMILIES[fam]


def mlp_module_names(model_type: str, num_layers: int) -> list[dict[str, str]]:
    """For each layer: {"gate": name, "up": name, "down": name} relative to the CausalLM."""
    fam = family(model_type)
    return [{k: fam[k].format(layer=i) for k in ("gate", "up", "down")} for i in range(num_layers)]


def peft_key(module: str) -> str:
    """The key prefix PEFT uses for a CausalLM module in adapter files."""
    return f"base_model.model.{module}"


def attn_module_names(model_type: str, num_layers: int) -> list[dict[str, str]]:
    """For each layer: {"q", "k", "v", "o"} module names relative to the CausalLM."""
    fam = family(model_type)
    return [{k: fam[k].format(layer=i) for k in ("q", "k", "v", "o")} for i in range(num_layers)]


def head_geometry(cfg: dict) -> tuple[int, int, int]:
    """(query heads, kv heads, head dim) from a config.json dict."""
    n_q = int(cfg["num_attention_heads"])
    n_kv = int(cfg.get("num_key_value_heads") or n_q)
    d = int(cfg.get("head_dim") or cfg["hidden_size"] // n_q)
    if n_q % n_kv:
        raise InputError(f"num_attention_heads {n_q} is not a multiple of num_key_value_heads {n_kv}")
    return n_q, n_kv, d
