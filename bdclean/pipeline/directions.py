"""suppress --method directions (experimental, adapters only): project the variants' shared backdoor subspace out
of every LoRA module of the suspicious adapter (core.directions), instead of zeroing signature channels.

Writes OUT/suppressed like `suppress`, so `restore` follows unchanged."""

from __future__ import annotations

from pathlib import Path

from bdclean import constants as C
from bdclean.console import log
from bdclean.errors import UsageError
from bdclean.io.artifacts import Manifest, load_manifest, stage_fingerprint
from bdclean.pipeline.folders import up_to_date
from bdclean.pipeline.run import Run


def run(run: Run, side: str = "both", k: int = 8, min_share: float = 0.2, force: bool = False) -> Path:
    from bdclean.core.arch import mlp_module_names, peft_key
    from bdclean.core.channels import LowRank
    from bdclean.core.directions import project_out, shared_subspace
    from bdclean.io.peft_io import write_adapter
    from bdclean.pipeline.diff import load_twins
    from bdclean.pipeline.suppress import kept_update

    if side not in ("out", "in", "both"):
        raise UsageError(f"--side must be out | in | both, not {side!r}")
    pfolder, folder = run.folder("train-pairs"), run.folder("suppress")
    pman = load_manifest(pfolder)
    if run.mode != "adapter":
        raise UsageError("direction suppression works on adapters (a full checkpoint has no LoRA factors)")
    sus = run.suspicious()
    run.check_recorded()
    digest = run.digest()
    man = Manifest("suppress", {"mode": "adapter", "method": "directions", "side": side, "k": k,
                                "min_share": min_share}, {"pairs": stage_fingerprint(pfolder, "train-pairs"),
                                                          "adapter": digest})
    if up_to_date(folder, man.fingerprint, "suppress", force):
        return folder
    twins = load_twins(pfolder, pman["extra"]["n_variants"])
    tensors = dict(sus.info.tensors)
    removed: dict[str, list[int]] = {}
    shares = []
    for mod, (ka, kb) in sus.info.module_pairs().items():
        s = sus.info.scaling(mod, twins[0][0][ka].shape[0])  # the twins share the adapter's config
        deltas = [LowRank.lora_difference(bd[ka], bd[kb], cl[ka], cl[kb], s) for bd, cl in twins]
        U, eu = shared_subspace(deltas, "out", k, min_share) if side in ("out", "both") else (None, [])
        V, ev = shared_subspace(deltas, "in", k, min_share) if side in ("in", "both") else (None, [])
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
