"""train-pairs on several worker processes: same twins as in-process training at the same thread count."""

import json
import shutil


from bdclean.pipeline import pairs_jobs

FAST = ["--n-variants", "2", "--samples", "6"]
YAML = "pairs:\n  epochs: 1\n  batch_size: 3\n  max_len: 48\n"


def test_plan_workers(tiny_base, monkeypatch):
    monkeypatch.setattr("bdclean.train.loop.cpu_count", lambda: 4)
    assert pairs_jobs.plan_workers(0, 12, tiny_base) == (1, 4)  # tiny model: in-process, all cores
    assert pairs_jobs.plan_workers(2, 12, tiny_base) == (2, 2)
    assert pairs_jobs.plan_workers(8, 3, tiny_base) == (3, 1)
    monkeypatch.setattr(pairs_jobs, "MIN_PARALLEL_WEIGHT_BYTES", 0)
    assert pairs_jobs.plan_workers(0, 12, tiny_base) == (4, 1)
    monkeypatch.setattr(pairs_jobs, "available_memory", lambda: pairs_jobs.WORKER_OVERHEAD_BYTES * 2)
    assert pairs_jobs.plan_workers(0, 12, tiny_base)[0] == 1  # memory for one worker only


def test_parallel_twins_equal_inline_twins(tiny_base, tiny_adapter, tiny_data, tmp_path, run_cli, monkeypatch):
    cfg = tmp_path / "fast.yaml"
    cfg.write_text(YAML)
    a, b = tmp_path / "inline", tmp_path / "parallel"
    assert run_cli("make-variants", "--clean", tiny_data, "--out", a, "--config", cfg, *FAST)[0] == 0
    shutil.copytree(a / "variants", b / "variants")
    monkeypatch.setattr("bdclean.train.loop.cpu_count", lambda: 1)  # in-process with 1 thread, as each worker
    code, _, err = run_cli("train-pairs", tiny_adapter, "--base", tiny_base, "--out", a, "--config", cfg,
                           "--workers", "1")
    assert code == 0, err
    monkeypatch.setattr("bdclean.train.loop.cpu_count", lambda: 2)
    code, _, err = run_cli("train-pairs", tiny_adapter, "--base", tiny_base, "--out", b, "--config", cfg,
                           "--workers", "2")
    assert code == 0, err
    assert "on 2 processes × 1 thread" in err
    ma, mb = (json.loads((d / "pairs" / "manifest.json").read_text()) for d in (a, b))
    assert ma["extra"]["workers"] == 1 and mb["extra"]["workers"] == 2
    # scheduling is not an input: same fingerprint, and every twin bit-identical
    assert ma["fingerprint"] == mb["fingerprint"]
    assert ma["outputs"] == mb["outputs"]
    for i in range(2):
        for twin in ("bd", "clean"):
            rec = json.loads((b / "pairs" / f"variant_0{i}_{twin}.json").read_text())
            assert rec["threads"] == 1 and rec["fingerprint"] == mb["fingerprint"]
    # so a rerun with another worker count is up to date
    code, _, err = run_cli("train-pairs", tiny_adapter, "--base", tiny_base, "--out", b, "--config", cfg,
                           "--workers", "1")
    assert code == 0 and "skip" in err


def test_workers_option_is_validated(tiny_base, tiny_adapter, tmp_path, run_cli):
    code, _, err = run_cli("train-pairs", tiny_adapter, "--base", tiny_base, "--out", tmp_path, "--workers", "-1")
    assert code != 0 and "workers" in err and "Traceback" not in err


def test_line_progress_ids_are_not_reused(capsys):
    from bdclean.console import LineProgress

    p = LineProgress()
    a, b = p.add_task("a", total=2), p.add_task("b", total=2)
    p.remove_task(a)
    c = p.add_task("c", total=None)
    assert c not in (a, b)
    p.update(b, completed=2)  # b is still b, not overwritten by c
    p.update(c, completed=1, total=4)  # a total given later is used
    p.update(a, completed=1)  # removed: ignored
    err = capsys.readouterr().err
    assert "b: 2/2" in err and "c: 1/4" in err and "a:" not in err
