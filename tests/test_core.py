"""Pure tensor functions on small random tensors."""

import math

import pytest
import torch

from bdclean.core.channels import Dense, LowRank, channel_gram, channel_vectors
from bdclean.core.masks import suppress_lora_channels
from bdclean.core.score import combine, norm_and_align, select_top


def _lora(out, inp, r, g):
    return torch.randn(r, inp, generator=g, dtype=torch.float64), torch.randn(out, r, generator=g, dtype=torch.float64)


def test_lowrank_gram_matches_dense_channel_vectors():
    g = torch.Generator().manual_seed(0)
    H, I, r, N = 6, 10, 3, 4
    gate, up, down, dense_vecs = [], [], [], []
    for _ in range(N):
        mods = {}
        for name, (o, i) in {"gate": (I, H), "up": (I, H), "down": (H, I)}.items():
            a_bd, b_bd = _lora(o, i, r, g)
            a_cl, b_cl = _lora(o, i, r, g)
            mods[name] = LowRank.lora_difference(a_bd, b_bd, a_cl, b_cl, scale=2.0)
            assert torch.allclose(mods[name].dense(), 2.0 * (b_bd @ a_bd - b_cl @ a_cl))
        gate.append(mods["gate"]); up.append(mods["up"]); down.append(mods["down"])
        dense_vecs.append(channel_vectors(mods["gate"].dense(), mods["up"].dense(), mods["down"].dense()))
    G = channel_gram(gate, up, down)
    V = torch.stack(dense_vecs, dim=1)  # [I, N, 3H]
    expect = V @ V.transpose(1, 2)
    assert G.shape == (I, N, N)
    assert torch.allclose(G, expect, rtol=1e-10, atol=1e-10)
    # dense deltas give the same Gram
    Gd = channel_gram([Dense(x.dense()) for x in gate], [Dense(x.dense()) for x in up],
                      [Dense(x.dense()) for x in down])
    assert torch.allclose(Gd, expect)


def test_missing_module_contributes_zero():
    g = torch.Generator().manual_seed(1)
    a, b = _lora(5, 3, 2, g)
    d = LowRank(b, a)
    G = channel_gram([d, d], [None, None], [None, None])
    assert torch.allclose(G[:, 0, 0], (d.dense() ** 2).sum(1))


def test_norm_and_align_definitions():
    # two channels, three variants: channel 0 aligned, channel 1 opposite directions
    v = torch.tensor([[[1.0, 0.0], [2.0, 0.0], [3.0, 0.0]],
                      [[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]]], dtype=torch.float64)
    G = v @ v.transpose(1, 2)
    norm, align = norm_and_align(G)
    assert torch.allclose(norm, torch.tensor([2.0, 1.0], dtype=torch.float64))
    assert math.isclose(align[0].item(), 1.0)
    assert math.isclose(align[1].item(), 0.0, abs_tol=1e-12)  # negative and zero cosines ignored


def test_zero_delta_has_zero_alignment():
    G = torch.zeros(3, 4, 4, dtype=torch.float64)
    norm, align = norm_and_align(G)
    assert torch.all(norm == 0) and torch.all(align == 0)


def test_planted_aligned_channels_rank_on_top():
    g = torch.Generator().manual_seed(2)
    L, I, N, D = 3, 50, 6, 12
    v = torch.randn(L, I, N, D, generator=g, dtype=torch.float64) * 0.1
    planted = [(0, 3), (1, 7), (2, 11), (2, 40)]
    direction = torch.randn(D, generator=g, dtype=torch.float64)
    for l, j in planted:
        v[l, j] = direction * 3 + 0.05 * torch.randn(N, D, generator=g, dtype=torch.float64)
    G = v @ v.transpose(-1, -2)
    norm, align = norm_and_align(G)
    s = combine(norm, align, 0.01)
    mask = select_top(s, len(planted) / (L * I))
    assert {tuple(x) for x in mask.nonzero().tolist()} == set(planted)


def test_norm_only_and_align_only_differ_as_defined():
    # channel A: big but random directions; channel B: small but perfectly aligned
    g = torch.Generator().manual_seed(3)
    N, D = 6, 8
    big = torch.randn(N, D, generator=g, dtype=torch.float64) * 10
    small = torch.ones(N, D, dtype=torch.float64) * 0.01
    v = torch.stack([big, small]).unsqueeze(0)  # [1 layer, 2 channels, N, D]
    G = v @ v.transpose(-1, -2)
    norm, align = norm_and_align(G)
    assert select_top(combine(norm, align, 0.01, "norm"), 0.5)[0].tolist() == [True, False]
    assert select_top(combine(norm, align, 0.01, "align"), 0.5)[0].tolist() == [False, True]
    # median normalisation makes λ matter: with raw norms of 10 vs 0.01, λ=0.01 cannot flip the order
    raw = combine(norm, align, 0.01, "combined", "none")
    assert raw[0, 0] > raw[0, 1]


def test_select_top_counts_and_scope():
    s = torch.arange(20, dtype=torch.float64).reshape(2, 10)
    m = select_top(s, 0.25)
    assert m.sum() == 5 and m[1].sum() == 5  # global: all from the higher-scoring layer
    m2 = select_top(s, 0.25, "per-layer")
    assert m2.sum(dim=1).tolist() == [3, 3]
    with pytest.raises(ValueError):
        select_top(s, 1.0)
    with pytest.raises(ValueError):
        select_top(s, 0.0)
    # 0.07 × 100 is 7.000000000000001 in floating point: still 7 channels, not 8
    assert select_top(torch.arange(100.0).reshape(1, 100), 0.07).sum() == 7


def test_suppress_zeroes_exactly_the_masked_channels():
    g = torch.Generator().manual_seed(4)
    H, I, r, L = 6, 10, 3, 2
    tensors, modules = {}, []
    for layer in range(L):
        names = {}
        for part, (o, i) in {"gate": (I, H), "up": (I, H), "down": (H, I)}.items():
            key = f"base_model.model.model.layers.{layer}.mlp.{part}_proj"
            a, b = _lora(o, i, r, g)
            tensors[key + ".lora_A.weight"], tensors[key + ".lora_B.weight"] = a, b
            names[part] = key
        modules.append(names)
    mask = torch.zeros(L, I, dtype=torch.bool)
    mask[0, [1, 4]] = True
    mask[1, 9] = True
    new, changed = suppress_lora_channels(tensors, mask, modules)
    assert changed == 6
    for layer, names in enumerate(modules):
        dw = {p: new[names[p] + ".lora_B.weight"] @ new[names[p] + ".lora_A.weight"] for p in names}
        old = {p: tensors[names[p] + ".lora_B.weight"] @ tensors[names[p] + ".lora_A.weight"] for p in names}
        vec_new = channel_vectors(dw["gate"], dw["up"], dw["down"])
        vec_old = channel_vectors(old["gate"], old["up"], old["down"])
        for j in range(I):
            if mask[layer, j]:
                assert torch.count_nonzero(vec_new[j]) == 0
            else:
                assert torch.equal(vec_new[j], vec_old[j])
    # inputs untouched
    assert torch.count_nonzero(tensors[modules[0]["gate"] + ".lora_B.weight"][1]) > 0


def test_head_gram_matches_dense_units_under_gqa():
    from bdclean.core.channels import head_gram, head_slices

    g = torch.Generator().manual_seed(5)
    n_q, n_kv, d, H, N = 4, 2, 3, 12, 3
    mods = {p: [] for p in "qkvo"}
    for _ in range(N):
        for p, (o, i) in {"q": (n_q * d, H), "k": (n_kv * d, H), "v": (n_kv * d, H), "o": (H, n_q * d)}.items():
            a, b = _lora(o, i, 2, g)
            mods[p].append(LowRank(b, a))
    G = head_gram(mods["q"], mods["k"], mods["v"], mods["o"], n_q, n_kv, d)
    for unit in range(n_kv):
        sl = head_slices(unit, n_q, n_kv, d)
        vecs = [torch.cat([mods["q"][i].dense()[sl["q"]].flatten(), mods["k"][i].dense()[sl["k"]].flatten(),
                           mods["v"][i].dense()[sl["v"]].flatten(), mods["o"][i].dense()[:, sl["o"]].flatten()])
                for i in range(N)]
        V = torch.stack(vecs)
        assert torch.allclose(G[unit], V @ V.T)


def test_suppress_heads_zeroes_only_the_unit():
    from bdclean.core.channels import head_slices
    from bdclean.core.masks import suppress_lora_heads

    g = torch.Generator().manual_seed(6)
    n_q, n_kv, d, H = 4, 2, 3, 12
    tensors, names = {}, {}
    for p, (o, i) in {"q": (n_q * d, H), "k": (n_kv * d, H), "v": (n_kv * d, H), "o": (H, n_q * d)}.items():
        key = f"m.{p}"
        tensors[key + ".lora_A.weight"], tensors[key + ".lora_B.weight"] = _lora(o, i, 2, g)
        names[p] = key
    new, changed = suppress_lora_heads(tensors, [(0, 1)], [names], n_q, n_kv, d)
    assert changed == 4
    sl = head_slices(1, n_q, n_kv, d)
    for p in "qkv":
        dw = new[f"m.{p}.lora_B.weight"] @ new[f"m.{p}.lora_A.weight"]
        old = tensors[f"m.{p}.lora_B.weight"] @ tensors[f"m.{p}.lora_A.weight"]
        assert torch.count_nonzero(dw[sl[p]]) == 0
        keep = torch.ones(dw.shape[0], dtype=torch.bool)
        keep[sl[p]] = False
        assert torch.equal(dw[keep], old[keep])
    dwo = new["m.o.lora_B.weight"] @ new["m.o.lora_A.weight"]
    assert torch.count_nonzero(dwo[:, sl["o"]]) == 0


def test_frobenius_sq_matches_dense():
    g = torch.Generator().manual_seed(3)
    x = LowRank(torch.randn(12, 4, generator=g), torch.randn(4, 9, generator=g))
    assert math.isclose(x.frobenius_sq(), float(((x.B.double() @ x.A.double()) ** 2).sum()), rel_tol=1e-9)


def test_kept_update_share_by_module_kind():
    from pathlib import Path

    from bdclean.io.models import AdapterInfo
    from bdclean.pipeline.suppress import kept_update

    g = torch.Generator().manual_seed(4)
    mods = {"m.layers.0.mlp.gate_proj": (6, 5), "m.layers.0.self_attn.q_proj": (5, 5)}
    before = {}
    for m, (o, i) in mods.items():
        before[m + ".lora_A.weight"] = torch.randn(2, i, generator=g)
        before[m + ".lora_B.weight"] = torch.randn(o, 2, generator=g)
    info = AdapterInfo(Path("."), {"r": 2, "lora_alpha": 4, "alpha_pattern": {"q_proj": 2}}, before)
    after = dict(before)
    after["m.layers.0.mlp.gate_proj.lora_B.weight"] = before["m.layers.0.mlp.gate_proj.lora_B.weight"].clone()
    after["m.layers.0.mlp.gate_proj.lora_B.weight"][:3] = 0  # half the MLP channels zeroed, attention untouched

    def energy(t, m, s):
        return float(((s * t[m + ".lora_B.weight"] @ t[m + ".lora_A.weight"]).double() ** 2).sum())

    kept = kept_update(info, after, {"m.layers.0.mlp.gate_proj"})
    mlp, q = "m.layers.0.mlp.gate_proj", "m.layers.0.self_attn.q_proj"
    assert kept["attention"] == 1.0
    assert math.isclose(kept["mlp"], energy(after, mlp, 2.0) / energy(before, mlp, 2.0), abs_tol=1e-4)
    total_after, total_before = energy(after, mlp, 2.0) + energy(after, q, 1.0), energy(before, mlp, 2.0) + energy(
        before, q, 1.0)
    assert math.isclose(kept["all"], total_after / total_before, abs_tol=1e-4)
    assert 0 < kept["mlp"] < kept["all"] < 1


def test_projection_ranks_what_the_suspicious_update_moved_along_the_variants():
    from bdclean.core.score import projection

    g = torch.Generator().manual_seed(5)
    n, d = 4, 16
    shared = torch.randn(d, generator=g)
    deltas = torch.stack([shared + 0.1 * torch.randn(d, generator=g) for _ in range(n)])  # variants agree
    # channel 0: S along the shared direction; 1: S orthogonal to it; 2: S against it; 3: S along it, but small
    ortho = torch.randn(d, generator=g)
    ortho -= (ortho @ shared) / (shared @ shared) * shared
    S = torch.stack([2 * shared, 2 * ortho / ortho.norm() * shared.norm(), -2 * shared, 0.2 * shared])
    own = S @ deltas.T  # [channels, N]
    G = (deltas @ deltas.T).expand(4, n, n)
    p = projection(own.double(), G.double())
    expected = ((S @ deltas.T) / deltas.norm(dim=1)).clamp_min(0).mean(-1)
    assert torch.allclose(p, expected.double(), rtol=1e-5)
    assert p[0] > p[3] > p[1] >= 0 and p[2] == 0
    with pytest.raises(ValueError):
        projection(own[:, :2].double(), G.double())
    with pytest.raises(ValueError):
        combine(p, p, 0.01, "projection")


def test_save_tensors_bytes_do_not_depend_on_the_process(tmp_path):
    """safetensors writes metadata keys in a per-process hash order: bdclean writes one key at most, so the same
    tensors give the same bytes (same seed, same artifacts)."""
    import subprocess
    import sys

    import pytest
    import torch

    from bdclean.errors import BdcleanError
    from bdclean.io.artifacts import save_tensors, sha256_file

    with pytest.raises(BdcleanError, match="more than one key"):
        save_tensors(tmp_path / "x.safetensors", {"a": torch.ones(2)}, {"k1": "1", "k2": "2"})
    code = ("import sys, torch; from bdclean.io.artifacts import save_tensors; "
            "save_tensors(__import__('pathlib').Path(sys.argv[1]), {'b': torch.arange(4.), 'a': torch.ones(2)}, "
            "{'format': 'pt'})")
    digests = set()
    for i in range(3):
        subprocess.run([sys.executable, "-c", code, str(tmp_path / f"{i}.safetensors")], check=True)
        digests.add(sha256_file(tmp_path / f"{i}.safetensors"))
    assert len(digests) == 1


def test_cli_import_loads_no_heavy_library():
    """`bdclean --help` builds every command's flags: it must not import torch, transformers or peft (commands import
    them when they run), or the help takes seconds."""
    import subprocess
    import sys

    code = ("import sys, bdclean.cli; heavy = [m for m in ('torch', 'transformers', 'peft', 'safetensors') "
            "if m in sys.modules]; print(heavy); sys.exit(1 if heavy else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
