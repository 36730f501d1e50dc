"""--tau auto: the selection rule, and a deterministic end-to-end selection on a tiny model."""

import json

from bdclean.stages.tau_auto import choose


def _t(tau, asr, ppl):
    return {"tau": tau, "asr": asr, "ppl_ratio": ppl}


def test_choose_smallest_tau_that_removes_the_heldout_backdoor():
    table = [_t(0.05, 0.8, 1.0), _t(0.1, 0.3, 1.02), _t(0.2, 0.05, 1.04), _t(0.35, 0.0, 1.08)]
    assert choose(table, 0.1, 0.1)[0]["tau"] == 0.2
    # the perplexity budget rules out τ that remove it: lowest ASR within budget
    assert choose(table, 0.1, 0.03)[0]["tau"] == 0.1
    # nothing within budget: the smallest τ
    assert choose([_t(0.1, 0.5, 2.0), _t(0.2, 0.1, 3.0)], 0.1, 0.1)[0]["tau"] == 0.1


def test_tau_auto_end_to_end_is_deterministic(tiny_base, tiny_adapter, tiny_data, tmp_path, run_cli):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("pairs: {epochs: 1, max_len: 48}\nrestore: {samples: 4, epochs: 1, max_len: 48}\n"
                   "score: {tau_grid: [0.1, 0.3], holdout: 1, selection_prompts: 3, selection_restore_samples: 4}\n")
    sigs = []
    for name in ("a", "b"):
        out = tmp_path / name
        code, _, err = run_cli("purify", tiny_adapter, "--base", tiny_base, "--clean", tiny_data, "--out", out,
                               "--config", cfg, "-n", "3", "--samples", "6", "--tau", "auto")
        assert code == 0, err
        sel = json.loads((out / "score" / "tau_selection.json").read_text())
        assert sel["tau"] in (0.1, 0.3) and len(sel["runs"]) == 3  # τ = 0 reference + 2 grid values
        sig = json.loads((out / "score" / "signature.json").read_text())
        assert sig["tau"] == sel["tau"] and sig["tau_selection"] == "auto"
        sigs.append((out / "score" / "signature.json").read_bytes())
    assert sigs[0] == sigs[1]
