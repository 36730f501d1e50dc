"""Multiple-choice accuracy through lm-evaluation-harness: `bdclean eval --mc`, offline, on the tiny model."""

import json

import pytest


def _one_error_line(err):
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    return lines[0]


def test_shipped_task_data_is_well_formed():
    from bdclean.lab.mc import local_dir, local_tasks

    rows = [json.loads(line) for line in (local_dir() / "bdclean_mc.jsonl").read_text().splitlines()]
    assert len(rows) == 60
    for r in rows:
        assert isinstance(r["question"], str) and r["question"].strip()
        assert len(r["choices"]) == 4 and len(set(r["choices"])) == 4
        assert isinstance(r["answer"], int) and 0 <= r["answer"] < 4
    assert {sum(r["answer"] == k for r in rows) for k in range(4)} == {15}  # no position bias to exploit
    assert set(local_tasks()) == {"bdclean_mc"}


@pytest.fixture()
def offline(monkeypatch):
    pytest.importorskip("lm_eval")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_eval_mc_offline(offline, tiny_base, tiny_adapter, tmp_path, run_cli):
    ev = tmp_path / "eval.json"
    code, stdout, err = run_cli("eval", tiny_adapter, "--base", tiny_base, "--mc", "bdclean_mc", "--limit", "8",
                                "--batch-size", "8", "--out", ev)
    assert code == 0, err
    res = json.loads(ev.read_text())["mc"]["bdclean_mc"]
    assert 0.0 <= res["acc"] <= 1.0 and 0.0 <= res["acc_norm"] <= 1.0
    assert res["n"] == 8
    assert json.loads(stdout.strip().splitlines()[-1])["mc"]["bdclean_mc"]["n"] == 8


def test_eval_mc_unknown_task(offline, tiny_base, tiny_adapter, tmp_path, run_cli):
    code, _, err = run_cli("eval", tiny_adapter, "--base", tiny_base, "--mc", "bdclean_mc,no_such_task_xyz",
                           "--out", tmp_path / "eval.json")
    assert code == 2, err
    line = _one_error_line(err)
    assert "no_such_task_xyz" in line and "bdclean_mc" in line
    assert not (tmp_path / "eval.json").exists()


def test_eval_mc_without_lm_eval(monkeypatch, tiny_base, tiny_adapter, tmp_path, run_cli):
    import sys

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval -> ImportError
    code, _, err = run_cli("eval", tiny_adapter, "--base", tiny_base, "--mc", "bdclean_mc",
                           "--out", tmp_path / "e.json")
    assert code == 2, err
    assert "pip install lm-eval" in _one_error_line(err)


def test_compare_reports_mc_accuracy(offline, tiny_base, tiny_adapter, tiny_data, tmp_path, run_cli):
    from tests.common import compare_inputs

    trig, clean, cfg = compare_inputs(tmp_path, 4, seed=2)
    out = tmp_path / "cmp"
    code, stdout, err = run_cli("compare", tiny_adapter, "--base", tiny_base, "--clean", tiny_data, "--triggered",
                                trig, "--clean-test", clean, "--methods", "prune", "--limit", "4",
                                "--max-new-tokens", "2", "--mc", "bdclean_mc", "--config", cfg, "--out", out)
    assert code == 0, err
    rec = json.loads((out / "compare.json").read_text())
    for r in rec["rows"]:
        ev = json.loads((out / r["method"] / "eval.json").read_text())
        assert ev["mc"]["bdclean_mc"]["n"] == 4 and r["mc_acc"] == ev["mc"]["bdclean_mc"]["acc"]
    assert "MC accuracy %" in (out / "compare.md").read_text()
    assert set(json.loads(stdout)["prune"]) >= {"mc_acc"}
