"""diff: Δᵢ = θᵢᵇᵈ − θᵢᶜˡᵉᵃⁿ per MLP channel, stored as per-layer Gram matrices [channels, N, N] (float64).

The Gram matrices are sufficient statistics for every score variant (norm, alignment, combined, normalised), so
`score` reruns in seconds without touching weights. For adapters, the dot products of the suspicious adapter's own
update S with every Δᵢ are stored beside them (``own.*`` [channels, N]), for the projection score."""

from __future__ import annotations

from pathlib import Path

import torch

from bdclean import constants as C
from bdclean.console import log
from bdclean.io.artifacts import Manifest, load_manifest, read_json, save_tensors, stage_fingerprint
from bdclean.pipeline.folders import up_to_date
from bdclean.pipeline.run import Run


def run(run: Run, force: bool = False) -> Path:

    from bdclean.core.arch import attn_module_names, head_geometry, mlp_module_names
    from bdclean.core.channels import channel_gram, head_gram
    from bdclean.io.models import AdapterInfo, read_model_config
    from bdclean.pipeline.pairs import dense_twins

    pfolder, folder = run.folder("train-pairs"), run.folder("diff")
    man = Manifest("diff", {"own_update": True}, {"pairs": stage_fingerprint(pfolder, "train-pairs")})
    if up_to_date(folder, man.fingerprint, "diff", force):
        return folder
    pman = load_manifest(pfolder)
    own = own_update(run)  # the suspicious adapter's tensors, or None (full model / adapter moved)
    n = pman["extra"]["n_variants"]
    base_cfg = read_model_config(run.base_dir)
    acfg = read_json(pfolder / "suspicious_adapter_config.json")
    L = int(base_cfg["num_hidden_layers"])
    modules = mlp_module_names(base_cfg["model_type"], L)
    twins = Twins(pfolder, n, AdapterInfo(pfolder, acfg, {}), dense_twins(acfg))
    attn = attn_module_names(base_cfg["model_type"], L)
    n_q, n_kv, hd = head_geometry(base_cfg)
    # any layer: an adapter may train only some layers (layers_to_transform) or some projections
    has_attn = any(twins.has(names[p]) for names in attn for p in ("q", "k", "v", "o"))
    inter = int(base_cfg["intermediate_size"])
    grams = {}

    def deltas(name: str) -> list:
        """Every variant's Δ of one module, then the suspicious adapter's own update (None where absent)."""
        if not twins.has(name):
            return [None] * (n + 1)
        return [*twins.deltas(name), own_delta(own, *twins.lora_keys(name), twins.scaling(name))]

    for layer, names in enumerate(modules):
        parts = {part: deltas(names[part]) for part in ("gate", "up", "down")}
        if all(d is None for ds in parts.values() for d in ds):  # no MLP LoRA in this layer: nothing moves
            G = torch.zeros(inter, n + 1, n + 1, dtype=torch.float64)
        else:
            G = channel_gram(parts["gate"], parts["up"], parts["down"])
        _store(grams, f"layer.{layer}", G, n, own is not None)
        if has_attn:
            ap = {part: deltas(name) for part, name in attn[layer].items()}
            _store(grams, f"heads.{layer}", head_gram(ap["q"], ap["k"], ap["v"], ap["o"], n_q, n_kv, hd), n,
                   own is not None)
    save_tensors(folder / C.GRAM_FILE, grams)  # n_variants and layers: in the manifest
    man.extra = {"n_variants": n, "layers": L, "channels": int(grams["layer.0"].shape[0]),
                 "attention_units": n_kv if has_attn else 0, "query_heads_per_unit": n_q // n_kv,
                 "own_update": own is not None}
    man.write(folder, [C.GRAM_FILE])
    log(f"diff: channel Gram matrices for {L} layers × {grams['layer.0'].shape[0]} channels × N={n} → {folder}")
    return folder


class Twins:
    """The variants' Δᵢ = θᵢᵇᵈ − θᵢᶜˡᵉᵃⁿ per module, from train-pairs' files.

    LoRA twins are small and loaded whole; each Δ is a rank-2r factorisation. Dense twins (--variant-training full)
    hold a whole decoder's projections each, so their tensors are read one module at a time, each file opened and
    closed around the read: diff holds one module's N dense deltas, never the 2N twins (a mapping kept open would
    keep every page read so far resident: 5.5 GB peak RSS on SmolLM2, RESULTS.md 'Full fine-tuned variants')."""

    def __init__(self, pfolder: Path, n: int, info, dense: bool):
        self.info, self.dense, self.n = info, dense, n
        if dense:
            from safetensors import safe_open

            self.files = [(pfolder / C.PAIR_WEIGHTS.format(i=i, twin="bd"),
                           pfolder / C.PAIR_WEIGHTS.format(i=i, twin="clean")) for i in range(n)]
            with safe_open(str(self.files[0][0]), "pt") as f:
                self.keys = set(f.keys())
        else:
            self.tensors = load_twins(pfolder, n)
            self.keys = set(self.tensors[0][0])

    @staticmethod
    def _read(path: Path, name: str):
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            return f.get_tensor(name + ".weight")

    def lora_keys(self, name: str) -> tuple[str, str]:
        from bdclean.core.arch import peft_key

        key = peft_key(name)
        return key + ".lora_A.weight", key + ".lora_B.weight"

    def has(self, name: str) -> bool:
        return (name + ".weight" if self.dense else self.lora_keys(name)[0]) in self.keys

    def scaling(self, name: str) -> float:
        """The LoRA scaling of the module (1 for dense twins)."""
        if self.dense:
            return 1.0
        ka, _ = self.lora_keys(name)
        return self.info.scaling(ka.removesuffix(".lora_A.weight"), self.tensors[0][0][ka].shape[0])

    def deltas(self, name: str) -> list:
        from bdclean.core.channels import Dense, LowRank

        if self.dense:
            return [Dense(self._read(bd, name).double() - self._read(cl, name).double()) for bd, cl in self.files]
        ka, kb = self.lora_keys(name)
        s = self.scaling(name)
        return [LowRank.lora_difference(bd[ka], bd[kb], cl[ka], cl[kb], s) for bd, cl in self.tensors]


def load_twins(pfolder: Path, n: int) -> list[tuple[dict, dict]]:
    """(backdoored twin's, clean twin's) LoRA tensors of every variant, as train-pairs wrote them."""
    from safetensors.torch import load_file

    return [(load_file(str(pfolder / C.PAIR_WEIGHTS.format(i=i, twin="bd"))),
             load_file(str(pfolder / C.PAIR_WEIGHTS.format(i=i, twin="clean")))) for i in range(n)]


def own_update(run: Run) -> dict | None:
    """The suspicious adapter's tensors when train-pairs ran on an adapter that is still where it was and unchanged
    (its digest is in the train-pairs manifest); else None, and the projection score is unavailable."""
    from bdclean.errors import BdcleanError
    if run.mode != "adapter":
        return None
    try:
        sus = run.suspicious()
    except BdcleanError as e:
        log(f"diff: suspicious adapter not readable ({e}); the projection score will be unavailable")
        return None
    if sus.kind != "adapter" or run.digest() != run.recorded_digest:
        log(f"diff: {run.model} changed since train-pairs; the projection score will be unavailable")
        return None
    return sus.info.tensors


def own_delta(own: dict | None, ka: str, kb: str, scale: float):
    """The suspicious adapter's update of one module as a LowRank (None: no own tensors, or it lacks the module)."""
    from bdclean.core.channels import LowRank

    if own is None or ka not in own:
        return None
    return LowRank(own[kb].double() * scale, own[ka].double())


def _store(grams: dict, name: str, G: torch.Tensor, n: int, with_own: bool) -> None:
    """Split an (N+1)-Gram (variants, then the suspicious update) into the variants' Gram and the own dots.

    Entries are computed pairwise, so the variants' block is identical to a Gram of the N variants alone."""
    grams[name] = G[..., :n, :n].contiguous()
    if with_own:
        grams["own." + name] = G[..., n, :n].contiguous()


def load_own(folder: Path) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """<S_j, Δ_ij> for MLP channels [layers, channels, N] and attention units [layers, kv heads, N] (or None), or
    None when diff had no suspicious adapter update (full model, adapter moved)."""
    from safetensors.torch import load_file

    g = load_file(str(Path(folder) / C.GRAM_FILE))
    if "own.layer.0" not in g:
        return None
    L = sum(1 for k in g if k.startswith("layer."))
    mlp = torch.stack([g[f"own.layer.{i}"] for i in range(L)])
    heads = torch.stack([g[f"own.heads.{i}"] for i in range(L)]) if "own.heads.0" in g else None
    return mlp, heads


def load_grams(folder: Path) -> tuple[torch.Tensor, torch.Tensor | None]:
    """MLP channel Grams [layers, channels, N, N] and attention-unit Grams [layers, kv heads, N, N] (or None)."""
    from safetensors.torch import load_file

    g = load_file(str(Path(folder) / C.GRAM_FILE))
    L = sum(1 for k in g if k.startswith("layer."))
    mlp = torch.stack([g[f"layer.{i}"] for i in range(L)])
    heads = torch.stack([g[f"heads.{i}"] for i in range(L)]) if "heads.0" in g else None
    return mlp, heads
