"""suppress --method directions (experimental): project the variants' shared backdoor subspace out of every module,
instead of zeroing or re-initialising signature channels (core.directions).

An adapter: out of every LoRA module's factors (B ← (I − UUᵀ)B, A ← A(I − VVᵀ)), so only the adapter's update changes.
A full checkpoint: out of the module's whole weight, W ← (I − UUᵀ) W (I − VVᵀ), streaming one shard at a time; the
variants are LoRA on the checkpoint, so U and V come from the same twins. Without a base the checkpoint's own update
cannot be told from its pretrained weights, so this removes whatever of W lies in the subspace.

Writes OUT/suppressed like `suppress`, so `restore` follows unchanged."""

from __future__ import annotations

from pathlib import Path

from bdclean import constants as C
from bdclean.console import log
from bdclean.errors import InputError, UsageError, require
from bdclean.io.artifacts import Manifest, load_manifest, read_json, stage_fingerprint
from bdclean.pipeline.folders import check_out_inputs, up_to_date
from bdclean.pipeline.run import Run


def _subspaces(twins, key: str, scaling: float, side: str, k: int, min_share: float):
    """(U, its eigenvalues, V, its eigenvalues) of one module from the variants' twins (LoRA key prefix ``key``)."""
    from bdclean.core.channels import LowRank
    from bdclean.core.directions import shared_subspace

    ka, kb = key + ".lora_A.weight", key + ".lora_B.weight"
    deltas = [LowRank.lora_difference(bd[ka], bd[kb], cl[ka], cl[kb], scaling) for bd, cl in twins]
    U, eu = shared_subspace(deltas, "out", k, min_share) if side in ("out", "both") else (None, [])
    V, ev = shared_subspace(deltas, "in", k, min_share) if side in ("in", "both") else (None, [])
    return U, eu, V, ev


def _full(sus, twins, tokenizer: Path, pfolder: Path, pman: dict, folder: Path, side: str, k: int,
          min_share: float) -> dict:
    """Project the shared subspaces out of a full checkpoint's weights into ``folder`` (sharded like the source)."""
    from safetensors import safe_open

    from bdclean.core.arch import attn_module_names, mlp_module_names, peft_key
    from bdclean.core.directions import project_dense
    from bdclean.io.models import AdapterInfo, model_weight_files
    from bdclean.pipeline.suppress import rewrite_checkpoint

    info = AdapterInfo(pfolder, read_json(pfolder / "suspicious_adapter_config.json"), {})
    L = int(sus.model_cfg["num_hidden_layers"])
    targets = {}  # checkpoint weight key → the variants' LoRA key of that module
    for names in mlp_module_names(sus.model_cfg["model_type"], L) + attn_module_names(sus.model_cfg["model_type"], L):
        for name in names.values():
            if peft_key(name) + ".lora_A.weight" in twins[0][0]:
                targets[name + ".weight"] = peft_key(name)
    removed: dict[str, list[int]] = {}
    shares: list[float] = []
    energy = [0.0, 0.0]  # ‖W‖² and ‖W − W'‖² over the projected modules

    def edit(key: str, t):
        if key not in targets:
            return t
        lkey = targets[key]
        s = info.scaling(lkey, twins[0][0][lkey + ".lora_A.weight"].shape[0])
        U, eu, V, ev = _subspaces(twins, lkey, s, side, k, min_share)
        new = project_dense(t, U, V)
        t64 = t.double()
        energy[0] += float(t64.pow(2).sum())
        energy[1] += float((t64 - new.double()).pow(2).sum())
        removed[key] = [0 if U is None else U.shape[1], 0 if V is None else V.shape[1]]
        shares.extend([float(x) for x in eu] + [float(x) for x in ev])
        return new

    present: set[str] = set()
    for shard in model_weight_files(sus.path):  # names only, before anything is written
        with safe_open(str(shard), framework="pt") as fh:
            present.update(fh.keys())
    missing = sorted(set(targets) - present)
    require(not missing, f"{sus.path}: the variants train {len(missing)} weights the checkpoint does not have "
            f"(first: {missing[:1]}); was train-pairs run on another checkpoint?", InputError)
    rewrite_checkpoint(sus.path, folder, tokenizer, edit)
    dims = sum(a + b for a, b in removed.values())
    extra = {"directions_removed": dims, "per_module": removed, "tokenizer": pman["config"].get("tokenizer"),
             "weight_energy_removed": round(energy[1] / energy[0], 6) if energy[0] else 0.0,
             "mean_shared_eigenvalue": sum(shares) / len(shares) if shares else None}
    log(f"suppress (directions, side {side}, k ≤ {k}, share ≥ {min_share}): removed {dims} directions from "
        f"{len(removed)} weights of the checkpoint ({extra['weight_energy_removed']:.2%} of their ‖W‖²) → {folder}")
    return extra


def run(run: Run, side: str = "both", k: int = 8, min_share: float = 0.2, force: bool = False) -> Path:
    from bdclean.core.arch import mlp_module_names, peft_key
    from bdclean.core.directions import project_out
    from bdclean.io.peft_io import write_adapter
    from bdclean.pipeline.diff import load_twins
    from bdclean.pipeline.suppress import kept_update

    if side not in ("out", "in", "both"):
        raise UsageError(f"--side must be out | in | both, not {side!r}")
    pfolder, folder = run.folder("train-pairs"), run.folder("suppress")
    pman = load_manifest(pfolder)
    if pman is None:
        raise UsageError(f"{pfolder}: no train-pairs output; run `bdclean train-pairs` first")
    from bdclean.pipeline.pairs import dense_twins

    if dense_twins(read_json(pfolder / "suspicious_adapter_config.json")):
        raise UsageError("suppress --method directions needs LoRA twins; these were trained with "
                         "--variant-training full (use --method channels, or retrain the pairs with LoRA)")
    sus = run.suspicious()
    check_out_inputs(run.out, ("suppress",), sus.path, sus.base_dir)
    run.check_recorded()
    inputs = {"pairs": stage_fingerprint(pfolder, "train-pairs"), "adapter": run.digest()}
    tokenizer = None
    if sus.kind == "full":
        from bdclean.pipeline.suppress import _recorded_tokenizer

        tokenizer = _recorded_tokenizer(pman, pfolder)  # missing or changed: one line, before anything is skipped
        inputs["tokenizer"] = pman["inputs"]["tokenizer"]
    man = Manifest("suppress", {"mode": sus.kind, "method": "directions", "side": side, "k": k,
                                "min_share": min_share}, inputs)
    if up_to_date(folder, man.fingerprint, "suppress", force):
        return folder
    twins = load_twins(pfolder, pman["extra"]["n_variants"])
    if sus.kind == "full":
        man.extra = _full(sus, twins, tokenizer, pfolder, pman, folder, side, k, min_share)
        man.write(folder, sorted(p.name for p in folder.iterdir() if p.is_file() and p.name != C.MANIFEST))
        return folder
    tensors = dict(sus.info.tensors)
    removed: dict[str, list[int]] = {}
    shares = []
    for mod, (ka, kb) in sus.info.module_pairs().items():
        s = sus.info.scaling(mod, twins[0][0][ka].shape[0])  # the twins share the adapter's config
        U, eu, V, ev = _subspaces(twins, ka.removesuffix(".lora_A.weight"), s, side, k, min_share)
        tensors[ka], tensors[kb] = project_out(tensors[ka], tensors[kb], U, V)
        removed[mod] = [0 if U is None else U.shape[1], 0 if V is None else V.shape[1]]
        shares += [float(x) for x in eu] + [float(x) for x in ev]
    write_adapter(folder, sus.info.config, tensors, stage="suppress")
    mlp = {peft_key(name) for names in mlp_module_names(sus.model_cfg["model_type"],
                                                         int(sus.model_cfg["num_hidden_layers"]))
           for name in names.values()}
    kept = kept_update(sus.info, tensors, mlp)
    dims = sum(a + b for a, b in removed.values())
    man.extra = {"directions_removed": dims, "per_module": removed, "kept_update_share": kept,
                 "mean_shared_eigenvalue": sum(shares) / len(shares) if shares else None}
    man.write(folder, [C.ADAPTER_CONFIG, C.ADAPTER_WEIGHTS])
    log(f"suppress (directions, side {side}, k ≤ {k}, share ≥ {min_share}): removed {dims} directions in "
        f"{len(removed)} modules; the adapter keeps {kept.get('all', 0):.0%} of its weight update → {folder}")
    return folder
