"""--tau auto: the selection rule, and a deterministic end-to-end selection on a tiny model."""

import json

from bdclean.config import DEFAULT_TAU
from bdclean.pipeline.tau_auto import aggregate, choose


def _t(tau, asr, ppl, removal=1.0):
    return {"tau": tau, "asr": asr, "ppl_ratio": ppl, "removal": removal}


def test_choose_smallest_tau_that_removes_the_heldout_backdoor():
    table = [_t(0.05, 0.8, 1.0), _t(0.1, 0.3, 1.02), _t(0.2, 0.05, 1.04), _t(0.35, 0.0, 1.08)]
    assert choose(table, 0.1, 0.1)[0]["tau"] == 0.2
    # the perplexity budget rules out τ that remove it: most removal (then lowest ASR) within budget
    assert choose(table, 0.1, 0.03)[0]["tau"] == 0.1
    # nothing within budget: the smallest τ
    assert choose([_t(0.1, 0.5, 2.0), _t(0.2, 0.1, 3.0)], 0.1, 0.1)[0]["tau"] == 0.1


def test_choose_needs_the_removal_target_too():
    # a weak held-out backdoor meets the ASR target at once; the likelihood removal decides
    table = [_t(0.1, 0.0, 1.01, 0.2), _t(0.2, 0.0, 1.02, 0.6), _t(0.35, 0.0, 1.04, 0.93), _t(0.5, 0.0, 1.06, 1.0)]
    assert choose(table, 0.1, 0.1, 0.9)[0]["tau"] == 0.35
    assert choose(table, 0.1, 0.1, 0.0)[0]["tau"] == 0.1
    # no τ reaches it within budget: the most removal within budget
    assert choose(table, 0.1, 0.03, 0.9)[0]["tau"] == 0.2


def test_aggregate_places_the_behavior_likelihood_between_bd_and_clean_twin():
    runs = [{"holdout": 0, "tau": 0.0, "asr": 0.5, "perplexity": 2.0, "behavior_nll": 1.0},
            {"holdout": 0, "tau": 0.3, "asr": 0.0, "perplexity": 2.2, "behavior_nll": 2.5},
            {"holdout": 1, "tau": 0.0, "asr": 0.0, "perplexity": 4.0, "behavior_nll": 3.0},
            {"holdout": 1, "tau": 0.3, "asr": 0.0, "perplexity": 4.0, "behavior_nll": 9.0}]
    twins = [{"holdout": 0, "behavior_nll": 4.0}, {"holdout": 1, "behavior_nll": 2.0}]  # variant 1 never took
    t0, t3 = aggregate(runs, twins)
    assert t0["tau"] == 0.0 and t0["removal"] == 0.0 and t0["ppl_ratio"] == 1.0  # variant 1 is left out
    assert abs(t3["removal"] - 0.5) < 1e-9 and abs(t3["ppl_ratio"] - 1.05) < 1e-9 and t3["asr"] == 0.0
    # neither took: removal cannot be measured
    assert all(t["removal"] is None for t in aggregate(runs, [{"holdout": 0, "behavior_nll": 1.05},
                                                              {"holdout": 1, "behavior_nll": 2.0}]))


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
        assert len(sel["runs"]) == 3 and len(sel["clean_twins"]) == 1  # τ = 0 reference + 2 grid values
        if sel["table"][0]["removal"] is None:  # the tiny held-out backdoor did not take: default τ, said so
            assert sel["tau"] == DEFAULT_TAU["adapter"] and "no held-out synthetic backdoor took" in sel["reason"]
        else:
            assert sel["tau"] in (0.1, 0.3) and all(0 <= t["removal"] <= 1 for t in sel["table"])
        sig = json.loads((out / "score" / "signature.json").read_text())
        assert sig["tau"] == sel["tau"] and sig["tau_selection"] == "auto"
        sigs.append((out / "score" / "signature.json").read_bytes())
    assert sigs[0] == sigs[1]
