"""train-pairs --executor ray on a local Ray cluster: the same twins as the local executor, bit for bit; a lost
worker gives one line and a rerun resumes; bad input gives one line and writes nothing."""

import hashlib
import json
import shutil
import sys
import time

import pytest

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'bdclean[ray]'); --executor ray untested")

FAST = ["--n-variants", "2", "--samples", "6"]
YAML = "pairs:\n  epochs: 1\n  batch_size: 3\n  max_len: 48\n"
TWINS = [f"variant_0{i}_{t}" for i in range(2) for t in ("bd", "clean")]


def cli(*args):
    from typer.testing import CliRunner

    from bdclean.cli import app

    r = CliRunner().invoke(app, [str(a) for a in args])
    return r.exit_code, r.stdout, r.stderr


def sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def cluster():
    """One local cluster for the module: bdclean uses a Ray it finds initialised and leaves it running."""
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def local(tiny_base, tiny_adapter, tiny_data, tmp_path_factory):
    """Variants and the local executor's twins (in this process), once."""
    root = tmp_path_factory.mktemp("ray_local")
    cfg = root / "fast.yaml"
    cfg.write_text(YAML)
    run = root / "local"
    assert cli("make-variants", "--clean", tiny_data, "--out", run, "--config", cfg, *FAST)[0] == 0
    code, _, err = cli("train-pairs", tiny_adapter, "--base", tiny_base, "--out", run, "--config", cfg)
    assert code == 0, err
    return run, cfg


def fresh(local, tmp_path, name):
    run = tmp_path / name
    shutil.copytree(local[0] / "variants", run / "variants")
    return run


def test_cli_cluster_sigterm(local, tiny_base, tiny_adapter, tmp_path):
    """The real CLI starts its own local cluster; SIGTERM mid-run: exit 143, one line, cluster stopped."""
    import os
    import signal
    import subprocess

    run = fresh(local, tmp_path, "sigterm")
    err_path = tmp_path / "err.txt"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")]))}
    with open(err_path, "w") as err:
        p = subprocess.Popen([sys.executable, "-m", "bdclean", "train-pairs", str(tiny_adapter), "--base",
                              str(tiny_base), "--out", str(run), "--config", str(local[1]), "--executor", "ray"],
                             stdout=subprocess.PIPE, stderr=err, env=env)
        deadline = time.time() + 120
        while "as Ray tasks" not in err_path.read_text() and p.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        p.send_signal(signal.SIGTERM)
        out, _ = p.communicate(timeout=60)
    lines = err_path.read_text().strip().splitlines()
    assert p.returncode == 143, lines
    assert lines[-1].startswith("error: terminated (SIGTERM)") and out == b""
    assert "starting a local Ray cluster" in lines[0] and not any("Traceback" in x for x in lines)
    assert not (run / "pairs" / "manifest.json").exists()


def test_ray_twins_are_the_local_twins(cluster, local, tiny_base, tiny_adapter, tmp_path):
    run = fresh(local, tmp_path, "ray")
    code, out, err = cli("train-pairs", tiny_adapter, "--base", tiny_base, "--out", run, "--config", local[1],
                         "--executor", "ray")
    assert code == 0, err
    assert "as Ray tasks" in err and "Traceback" not in err and out == ""
    for t in TWINS:
        assert sha(run / "pairs" / f"{t}.safetensors") == sha(local[0] / "pairs" / f"{t}.safetensors"), t
    ml, mr = (json.loads((d / "pairs" / "manifest.json").read_text()) for d in (local[0], run))
    assert ml["fingerprint"] == mr["fingerprint"] and ml["outputs"] == mr["outputs"]
    assert mr["extra"]["executor"]["name"] == "ray" and ml["extra"]["executor"] == {"name": "local"}
    assert mr["extra"]["executor"]["num_gpus"] == 0
    # the executor is not an input: the local executor finds the stage up to date
    code, _, err = cli("train-pairs", tiny_adapter, "--base", tiny_base, "--out", run, "--config", local[1])
    assert code == 0 and "skip" in err


def test_lost_worker_then_rerun_resumes(cluster, local, tiny_base, tiny_adapter, tmp_path, monkeypatch):
    from bdclean.pipeline import pairs_ray

    orig = pairs_ray._twin_task

    def crashing(ctx, base, adapter, tokenizer, data, i, twin, steps):
        if (i, twin) == (1, "clean"):  # submitted last: starts once a slot is free, i.e. after a twin finished
            import os

            os._exit(1)  # the worker process dies as if killed (or out of memory)
        return orig(ctx, base, adapter, tokenizer, data, i, twin, steps)

    run = fresh(local, tmp_path, "crash")
    monkeypatch.setattr(pairs_ray, "_twin_task", crashing)
    args = ("train-pairs", tiny_adapter, "--base", tiny_base, "--out", run, "--config", local[1], "--executor", "ray")
    code, out, err = cli(*args)
    assert code == 1 and "Traceback" not in err and out == ""
    last = err.strip().splitlines()[-1]
    assert "Ray worker training variant 1 clean died" in last and "rerun to resume" in last
    pairs = run / "pairs"
    assert not (pairs / "manifest.json").exists()
    assert not [p for p in pairs.iterdir() if p.name.endswith(".tmp")]  # nothing half-written
    done = [t for t in TWINS if (pairs / f"{t}.json").is_file()]
    assert 1 <= len(done) < 4 and "variant_01_clean" not in done
    mtimes = {t: (pairs / f"{t}.safetensors").stat().st_mtime_ns for t in done}

    monkeypatch.setattr(pairs_ray, "_twin_task", orig)
    code, _, err = cli(*args)
    assert code == 0, err
    assert f"resuming, {len(done)} of 4 jobs already done" in err
    assert {t: (pairs / f"{t}.safetensors").stat().st_mtime_ns for t in done} == mtimes  # not retrained
    for t in TWINS:
        assert sha(pairs / f"{t}.safetensors") == sha(local[0] / "pairs" / f"{t}.safetensors"), t


def test_interrupt_cancels_the_tasks(cluster, local, tiny_base, tiny_adapter, tmp_path, monkeypatch):
    from bdclean.pipeline import pairs_ray

    def interrupted(*a, **k):
        raise KeyboardInterrupt  # Ctrl-C while the driver writes the first twin

    monkeypatch.setattr(pairs_ray, "write_twin", interrupted)
    run = fresh(local, tmp_path, "interrupted")
    code, _, err = cli("train-pairs", tiny_adapter, "--base", tiny_base, "--out", run, "--config", local[1],
                       "--executor", "ray")
    assert code == 130 and "interrupted" in err.strip().splitlines()[-1] and "Traceback" not in err
    deadline = time.time() + 30  # the other twins' tasks were cancelled: the cluster's CPUs come back
    while ray.available_resources().get("CPU", 0) < 2 and time.time() < deadline:
        time.sleep(0.5)
    assert ray.available_resources().get("CPU", 0) == 2
    assert not (run / "pairs" / "manifest.json").exists()


def test_ray_not_installed(local, tiny_base, tiny_adapter, tiny_data, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now raises ImportError
    run = fresh(local, tmp_path, "noray")
    code, out, err = cli("train-pairs", tiny_adapter, "--base", tiny_base, "--out", run, "--config", local[1],
                         "--executor", "ray")
    assert code == 2 and out == "" and "Traceback" not in err
    assert err.strip().splitlines() == ["error: --executor ray needs Ray: install it with pip install 'bdclean[ray]'"]
    assert not (run / "pairs").exists()
    # purify checks it before its first stage
    code, _, err = cli("purify", tiny_adapter, "--base", tiny_base, "--clean", tiny_data, "--out", tmp_path / "p",
                       "--executor", "ray")
    assert code == 2 and "pip install 'bdclean[ray]'" in err and not (tmp_path / "p").exists()


def test_unreachable_address_fails_fast(local, tiny_base, tiny_adapter, tmp_path):
    run = fresh(local, tmp_path, "unreachable")
    t0 = time.time()
    code, _, err = cli("train-pairs", tiny_adapter, "--base", tiny_base, "--out", run, "--config", local[1],
                       "--executor", "ray", "--ray-address", "127.0.0.1:1")
    assert code == 2 and time.time() - t0 < 20
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "127.0.0.1:1" in lines[0] and "no Ray cluster reachable" in lines[0]
    assert not (run / "pairs").exists()
    code, _, err = cli("train-pairs", tiny_adapter, "--base", tiny_base, "--out", run, "--config", local[1],
                       "--ray-address", "127.0.0.1:6379")  # without --executor ray
    assert code == 2 and "executor ray" in err and not (run / "pairs").exists()
