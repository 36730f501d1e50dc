"""Bad input: one clear line on stderr, exit code 2 (usage) or 1 (runtime), never a traceback."""

import json
import shutil

import pytest
from safetensors.torch import load_file, save_file


def _check(result, code, needle):
    got, out, err = result
    assert got == code, (got, err)
    assert "Traceback" not in err and "Traceback" not in out
    assert needle.lower() in err.lower(), err
    assert len([line for line in err.strip().splitlines() if line.strip()]) <= 3  # rich may wrap one long line


def _copy_adapter(src, dst):
    shutil.copytree(src, dst)
    return dst


@pytest.fixture()
def bad(tmp_path, tiny_adapter):
    return tmp_path, tiny_adapter


def test_missing_data_file(run_cli, tmp_path):
    _check(run_cli("make-variants", "--clean", tmp_path / "nope.jsonl", "--out", tmp_path / "r"), 2, "not found")


def test_empty_data_file(run_cli, tmp_path):
    p = tmp_path / "e.jsonl"
    p.write_text("")
    _check(run_cli("make-variants", "--clean", p, "--out", tmp_path / "r"), 2, "empty")


def test_malformed_jsonl_names_line(run_cli, tmp_path):
    p = tmp_path / "m.jsonl"
    p.write_text('{"instruction": "a", "output": "b"}\n{"instruction": oops}\n')
    _check(run_cli("make-variants", "--clean", p, "--out", tmp_path / "r"), 2, "line 2")


def test_missing_instruction_field(run_cli, tmp_path):
    p = tmp_path / "m.jsonl"
    p.write_text('{"output": "b"}\n')
    _check(run_cli("make-variants", "--clean", p, "--out", tmp_path / "r"), 2, "instruction")


def test_json_list_bad_item(run_cli, tmp_path):
    p = tmp_path / "m.json"
    p.write_text(json.dumps([{"instruction": "a", "output": "b"}, 5]))
    _check(run_cli("make-variants", "--clean", p, "--out", tmp_path / "r"), 2, "item 1")


def test_tau_out_of_range(run_cli, tmp_path):
    _check(run_cli("score", "--out", tmp_path, "--tau", "1.5"), 2, "score.tau")
    _check(run_cli("score", "--out", tmp_path, "--tau", "0"), 2, "score.tau")


def test_n_variants_too_small(run_cli, tmp_path, tiny_data):
    _check(run_cli("make-variants", "--clean", tiny_data, "--out", tmp_path, "-n", "1"), 2, "n_variants")


def test_unknown_yaml_key_is_named(run_cli, tmp_path, tiny_data):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("score:\n  taux: 0.3\n")
    _check(run_cli("make-variants", "--clean", tiny_data, "--out", tmp_path, "--config", cfg), 2, "score.taux")


def test_adapter_without_config(run_cli, tmp_path, tiny_adapter, tiny_base):
    a = _copy_adapter(tiny_adapter, tmp_path / "a")
    (a / "adapter_config.json").unlink()
    _check(run_cli("train-pairs", a, "--base", tiny_base, "--out", tmp_path), 2, "adapter_config.json")


def test_pickle_adapter_refused_never_unpickled(run_cli, tmp_path, tiny_adapter, tiny_base):
    import pickle

    a = _copy_adapter(tiny_adapter, tmp_path / "a")
    (a / "adapter_model.safetensors").unlink()
    marker = tmp_path / "PWNED"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (a / "adapter_model.bin").write_bytes(pickle.dumps(Evil()))
    _check(run_cli("train-pairs", a, "--base", tiny_base, "--out", tmp_path), 2, "pickle")
    assert not marker.exists()


def test_adapter_without_mlp_targets(run_cli, tmp_path, tiny_base):
    from tests.common import make_adapter

    a = make_adapter(tiny_base, tmp_path / "attn_only", targets=["q_proj", "v_proj"])
    _check(run_cli("train-pairs", a, "--base", tiny_base, "--out", tmp_path), 2, "no MLP targets")


def test_dora_adapter_refused(run_cli, tmp_path, tiny_base):
    from tests.common import make_adapter

    a = make_adapter(tiny_base, tmp_path / "dora", dora=True)
    _check(run_cli("train-pairs", a, "--base", tiny_base, "--out", tmp_path), 2, "DoRA")


def test_truncated_safetensors(run_cli, tmp_path, tiny_adapter, tiny_base):
    a = _copy_adapter(tiny_adapter, tmp_path / "a")
    w = a / "adapter_model.safetensors"
    w.write_bytes(w.read_bytes()[:100])
    _check(run_cli("train-pairs", a, "--base", tiny_base, "--out", tmp_path), 2, "corrupted or truncated")


def test_nan_weights(run_cli, tmp_path, tiny_adapter, tiny_base):
    a = _copy_adapter(tiny_adapter, tmp_path / "a")
    w = a / "adapter_model.safetensors"
    t = load_file(str(w))
    k = next(iter(t))
    t[k][0, 0] = float("nan")
    save_file(t, str(w))
    _check(run_cli("train-pairs", a, "--base", tiny_base, "--out", tmp_path), 2, "NaN")


def test_adapter_for_another_base(run_cli, tmp_path, tiny_adapter):
    from tests.common import make_tiny_llama

    other = make_tiny_llama(tmp_path / "other", hidden=16, inter=24)
    _check(run_cli("train-pairs", tiny_adapter, "--base", other, "--out", tmp_path), 2, "different base")


def test_remote_code_config_refused(run_cli, tmp_path, tiny_adapter, tiny_base):
    b = tmp_path / "b"
    shutil.copytree(tiny_base, b)
    cfg = json.loads((b / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "evil.Model"}
    (b / "config.json").write_text(json.dumps(cfg))
    _check(run_cli("train-pairs", tiny_adapter, "--base", b, "--out", tmp_path), 2, "remote code")


def test_stage_without_upstream(run_cli, tmp_path):
    _check(run_cli("diff", "--out", tmp_path / "nothing"), 1, "run `bdclean train-pairs` first")


def test_eval_unknown_task(run_cli, tmp_path, tiny_adapter, tiny_base, tiny_data):
    _check(run_cli("eval", tiny_adapter, "--base", tiny_base, "--clean", tiny_data, "--task", "nope",
                   "--out", tmp_path / "e.json"), 2, "unknown task")


def test_implant_unknown_attack(run_cli, tmp_path, tiny_base):
    _check(run_cli("implant", "--attack", "zzz", "--base", tiny_base, "--out", tmp_path / "x"), 2, "unknown attack")
