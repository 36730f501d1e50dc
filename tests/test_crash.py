"""Crash safety: SIGKILL purify at several points, rerun, and get exactly the uninterrupted result."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _cmd(adapter, base, data, out, cfg):
    return [sys.executable, "-m", "bdclean", "purify", str(adapter), "--base", str(base), "--clean", str(data),
            "--out", str(out), "--config", str(cfg), "-n", "3", "--samples", "8"]


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _run_until(cmd, marker: Path, timeout=120):
    """Start the command, SIGKILL it as soon as ``marker`` exists."""
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env(),
                         start_new_session=True)
    t0 = time.time()
    while not marker.exists():
        if p.poll() is not None or time.time() - t0 > timeout:
            break
        time.sleep(0.05)
    if p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    return p.returncode


@pytest.fixture()
def fast_cfg(tmp_path):
    p = tmp_path / "fast.yaml"
    p.write_text("pairs: {epochs: 1, batch_size: 4, max_len: 48}\nrestore: {samples: 8, epochs: 1, max_len: 48}\n")
    return p


def test_sigkill_then_rerun_matches_uninterrupted(tiny_base, tiny_adapter, tiny_data, tmp_path, fast_cfg):
    ref = tmp_path / "ref"
    assert subprocess.run(_cmd(tiny_adapter, tiny_base, tiny_data, ref, fast_cfg), env=_env(),
                          capture_output=True).returncode == 0
    out = tmp_path / "killed"
    cmd = _cmd(tiny_adapter, tiny_base, tiny_data, out, fast_cfg)
    for marker in (out / "pairs" / "variant_00_bd.safetensors",  # inside train-pairs
                   out / "pairs" / "variant_02_bd.json",  # later inside train-pairs
                   out / "diff" / "manifest.json"):  # between stages
        rc = _run_until(cmd, marker)
        assert rc == -signal.SIGKILL or rc == 0
        assert marker.exists()
    # a write interrupted half-way: garbage under a final name without a matching manifest hash
    r = subprocess.run(cmd, env=_env(), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    (out / "score" / "signature.json").write_text('{"truncated": ')
    (out / "score" / ".scores.safetensors.123.tmp").write_bytes(b"partial")
    r = subprocess.run(cmd, env=_env(), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "recomputing" in r.stderr.replace("\n", " ")
    assert (out / "score" / "signature.json").read_bytes() == (ref / "score" / "signature.json").read_bytes()
    a = (out / "purified" / "adapter_model.safetensors").read_bytes()
    assert a == (ref / "purified" / "adapter_model.safetensors").read_bytes()


def test_ctrl_c_exits_130_with_one_line(tiny_base, tiny_adapter, tiny_data, tmp_path, fast_cfg):
    out = tmp_path / "int"
    # a shell that starts jobs in the background without job control (`cmd &`, nohup) leaves SIGINT ignored, and
    # Python keeps an inherited ignore; reset it so the test measures bdclean, not how the suite was launched
    p = subprocess.Popen(_cmd(tiny_adapter, tiny_base, tiny_data, out, fast_cfg), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=_env(),
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    marker = out / "pairs" / "variant_00_bd.safetensors"
    t0 = time.time()
    while not marker.exists() and time.time() - t0 < 120 and p.poll() is None:
        time.sleep(0.05)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    assert not list(out.rglob("*.tmp"))  # nothing half-written left behind


def _listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_atomic_dir_replaces_whole_folders_and_survives_failures(tmp_path, monkeypatch):
    from bdclean.io import artifacts
    from bdclean.io.artifacts import atomic_dir

    final = tmp_path / "out"
    with atomic_dir(final) as tmp:
        (tmp / "a.txt").write_text("one")
    # a leftover of an earlier interrupted replace does not block the next one
    (tmp_path / f".out.{os.getpid()}.old").mkdir()
    (tmp_path / f".out.old-{os.getpid()}").mkdir()
    with atomic_dir(final) as tmp:
        (tmp / "b.txt").write_text("two")
    assert _listing(final) == ["b.txt"]
    before = _listing(tmp_path)
    # the block fails: the previous output stays as it was
    with pytest.raises(RuntimeError), atomic_dir(final) as tmp:
        (tmp / "c.txt").write_text("three")
        raise RuntimeError("boom")
    assert _listing(final) == ["b.txt"] and _listing(tmp_path) == before
    # the final rename fails after the previous output was moved aside: it is put back
    real_replace, calls = os.replace, []

    def flaky(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:
            raise OSError("disk gone")
        return real_replace(src, dst)

    monkeypatch.setattr(artifacts.os, "replace", flaky)
    with pytest.raises(OSError), atomic_dir(final) as tmp:
        (tmp / "d.txt").write_text("four")
    assert _listing(final) == ["b.txt"] and _listing(tmp_path) == before
    monkeypatch.undo()


@pytest.mark.parametrize("umask,file_mode,dir_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700),
                                                      (0o002, 0o664, 0o775)])
def test_outputs_respect_the_umask(umask, file_mode, dir_mode, tmp_path, tiny_data, run_cli, monkeypatch):
    """Atomic writes go through tempfile (private 0600/0700); the outputs get the modes the umask gives."""
    import os

    import bdclean.io.artifacts as art

    monkeypatch.setattr(art, "_UMASK", None)
    old = os.umask(umask)
    try:
        code, _, err = run_cli("make-variants", "--clean", tiny_data, "--out", tmp_path / "run", "--samples", "4")
        assert code == 0, err
        with art.atomic_dir(tmp_path / "d") as tmp:
            art.write_text(tmp / "x.txt", "x")
    finally:
        os.umask(old)
    files = [p for p in (tmp_path / "run").rglob("*") if p.is_file()] + [tmp_path / "d" / "x.txt"]
    assert files and {p.stat().st_mode & 0o777 for p in files} == {file_mode}
    assert (tmp_path / "d").stat().st_mode & 0o777 == dir_mode


def test_interrupted_whole_folder_stage_is_recognised(tmp_path):
    """suppress/restore/extract/merge replace their folder as a whole and write the manifest just after: a run killed
    in between leaves a folder without a manifest, which the rerun may replace only because it carries the stage's
    mark; a folder without it (a user's own adapter there) is still refused."""
    from bdclean import constants as C
    from bdclean.errors import UsageError
    from bdclean.io.artifacts import Manifest, atomic_dir
    from bdclean.pipeline.folders import claim_stage_dir

    folder = tmp_path / "suppressed"
    with atomic_dir(folder, "suppress") as tmp:
        (tmp / C.ADAPTER_WEIGHTS).write_bytes(b"x")
    claim_stage_dir(folder, "suppress")  # killed before the manifest: recognised
    with pytest.raises(UsageError, match="holds|not made"):
        claim_stage_dir(folder.rename(tmp_path / "purified"), "restore")  # another stage's mark
    (tmp_path / "purified" / C.STAGE_MARK).unlink()
    with pytest.raises(UsageError, match="not made by `bdclean restore`"):
        claim_stage_dir(tmp_path / "purified", "restore")
    with atomic_dir(folder, "suppress") as tmp:
        (tmp / C.ADAPTER_WEIGHTS).write_bytes(b"x")
    rec = Manifest("suppress", {}, {}).write(folder, [C.ADAPTER_WEIGHTS, C.STAGE_MARK])
    assert list(rec["outputs"]) == [C.ADAPTER_WEIGHTS] and not (folder / C.STAGE_MARK).exists()
    claim_stage_dir(folder, "suppress")


def test_interrupted_defend_output_is_recognised(tmp_path):
    """defend writes its adapter folder as a whole, then the manifest: a defend killed in between may be rerun into
    the same --out (its mark says whose the folder is); a folder without it is still refused."""
    from bdclean import constants as C
    from bdclean.errors import UsageError
    from bdclean.io.artifacts import atomic_dir
    from bdclean.lab.defend import _check_out

    out = tmp_path / "reset"
    with atomic_dir(out, "defend") as tmp:
        (tmp / C.ADAPTER_WEIGHTS).write_bytes(b"x")
    _check_out(out, tmp_path / "suspicious")
    (out / C.STAGE_MARK).unlink()
    with pytest.raises(UsageError, match="not a defend output"):
        _check_out(out, tmp_path / "suspicious")
