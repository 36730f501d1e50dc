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


# ---------------------------------------------------------------- table-driven: more bad inputs
# Each case: (name, setup(tmp, adapter, base, data) -> argv, expected exit code, text the one line must contain)


def _adapter_copy(tmp, adapter):
    return _copy_adapter(adapter, tmp / "a")


def _edit_cfg(tmp, adapter, **changes):
    a = _adapter_copy(tmp, adapter)
    cfg = json.loads((a / "adapter_config.json").read_text())
    cfg.update(changes)
    (a / "adapter_config.json").write_text(json.dumps(cfg))
    return a


def _edit_tensors(tmp, adapter, fn):
    a = _adapter_copy(tmp, adapter)
    w = a / "adapter_model.safetensors"
    t = load_file(str(w))
    fn(t)
    save_file(t, str(w))
    return a


def _tp(a, base, tmp):
    return ["train-pairs", a, "--base", base, "--out", tmp / "run"]


def _inf(t):
    k = next(iter(t))
    t[k][0, 0] = float("inf")


def _rank_mismatch(t):
    k = next(k for k in t if k.endswith("lora_A.weight"))
    t[k] = t[k][:-1].contiguous()


def _int_tensor(t):
    k = next(iter(t))
    t[k] = t[k].to(dtype=__import__("torch").int32)


def _extra_layer(t):
    k = next(k for k in t if "layers.0." in k and k.endswith("lora_A.weight"))
    t[k.replace("layers.0.", "layers.7.")] = t[k].clone()
    kb = k.replace("lora_A", "lora_B")
    t[kb.replace("layers.0.", "layers.7.")] = t[kb].clone()


def _huge_header(tmp, adapter):
    import struct

    a = _adapter_copy(tmp, adapter)
    (a / "adapter_model.safetensors").write_bytes(struct.pack("<Q", 2**60) + b"{}")
    return a


def _data(tmp, text, name="d.jsonl"):
    p = tmp / name
    p.write_bytes(text if isinstance(text, bytes) else text.encode())
    return p


def _full_copy(tmp, base):
    b = tmp / "full"
    shutil.copytree(base, b)
    return b


def _sharded_missing(tmp, base):
    b = _full_copy(tmp, base)
    (b / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"lm_head.weight": "model-00001-of-00002.safetensors",
                                        "model.norm.weight": "model-00002-of-00002.safetensors"}}))
    (b / "model.safetensors").rename(b / "model-00001-of-00002.safetensors")
    return b


def _bin_only(tmp, base):
    b = _full_copy(tmp, base)
    (b / "model.safetensors").unlink()
    (b / "pytorch_model.bin").write_bytes(b"not really a pickle")
    return b


def _add_tensor(name):
    def fn(t):
        t[name] = __import__("torch").zeros(4, 4)
    return fn


def _escaping_shard(tmp, base):
    b = _full_copy(tmp, base)
    (b / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"lm_head.weight": "../elsewhere/model.safetensors"}}))
    return b


class _Evil:
    """Unpickling it would create tmp/PWNED (the table checks that nothing did)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _pickle_adapter(tmp, adapter):
    import pickle

    a = _adapter_copy(tmp, adapter)
    (a / "adapter_model.safetensors").unlink()
    (a / "adapter_model.bin").write_bytes(pickle.dumps(_Evil(tmp / "PWNED")))
    return a


def _truncated(tmp, adapter):
    a = _adapter_copy(tmp, adapter)
    w = a / "adapter_model.safetensors"
    w.write_bytes(w.read_bytes()[:100])
    return a


def _nan(t):
    k = next(iter(t))
    t[k][0, 0] = float("nan")


def _no_config(tmp, adapter):
    a = _adapter_copy(tmp, adapter)
    (a / "adapter_config.json").unlink()
    return a


def _remote_code_base(tmp, base):
    b = tmp / "b"
    shutil.copytree(base, b)
    cfg = json.loads((b / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "evil.Model"}
    (b / "config.json").write_text(json.dumps(cfg))
    return b


def _made_adapter(tmp, base, name, **kw):
    from tests.common import make_adapter

    return make_adapter(base, tmp / name, **kw)


def _other_base(tmp):
    from tests.common import make_tiny_llama

    return make_tiny_llama(tmp / "other", hidden=16, inter=24)


def _variants(tmp, data, *extra):
    return ["make-variants", "--clean", data, "--out", tmp / "r", *extra]


CASES = [
    # data files and options
    ("missing data file", lambda tmp, a, b, d: _variants(tmp, tmp / "nope.jsonl"), 2, "not found"),
    ("empty data file", lambda tmp, a, b, d: _variants(tmp, _data(tmp, "")), 2, "empty"),
    ("malformed JSONL names the line", lambda tmp, a, b, d: _variants(tmp, _data(
        tmp, '{"instruction": "a", "output": "b"}\n{"instruction": oops}\n')), 2, "line 2"),
    ("missing instruction field", lambda tmp, a, b, d: _variants(tmp, _data(tmp, '{"output": "b"}\n')), 2,
     "instruction"),
    ("JSON list with a bad item", lambda tmp, a, b, d: _variants(tmp, _data(
        tmp, json.dumps([{"instruction": "a", "output": "b"}, 5]), "m.json")), 2, "item 1"),
    ("tau above 1", lambda tmp, a, b, d: ["score", "--out", tmp, "--tau", "1.5"], 2, "score.tau"),
    ("tau 0", lambda tmp, a, b, d: ["score", "--out", tmp, "--tau", "0"], 2, "score.tau"),
    ("n-variants too small", lambda tmp, a, b, d: _variants(tmp, d, "-n", "1"), 2, "n_variants"),
    ("unknown YAML key is named", lambda tmp, a, b, d: _variants(tmp, d, "--config", _data(
        tmp, "score:\n  taux: 0.3\n", "c.yaml")), 2, "score.taux"),
    # hostile or unusable models
    ("adapter without config", lambda tmp, a, b, d: _tp(_no_config(tmp, a), b, tmp), 2, "adapter_config.json"),
    ("pickle adapter refused, never unpickled", lambda tmp, a, b, d: _tp(_pickle_adapter(tmp, a), b, tmp), 2,
     "pickle"),
    ("adapter without MLP targets", lambda tmp, a, b, d: _tp(_made_adapter(tmp, b, "attn_only", targets=[
        "q_proj", "v_proj"]), b, tmp), 2, "no MLP targets"),
    ("DoRA adapter", lambda tmp, a, b, d: _tp(_made_adapter(tmp, b, "dora", dora=True), b, tmp), 2, "DoRA"),
    ("truncated safetensors", lambda tmp, a, b, d: _tp(_truncated(tmp, a), b, tmp), 2, "corrupted or truncated"),
    ("NaN weights", lambda tmp, a, b, d: _tp(_edit_tensors(tmp, a, _nan), b, tmp), 2, "NaN"),
    ("adapter for another base", lambda tmp, a, b, d: _tp(a, _other_base(tmp), tmp), 2, "different base"),
    ("remote code in the base config", lambda tmp, a, b, d: _tp(a, _remote_code_base(tmp, b), tmp), 2,
     "remote code"),
    # commands
    ("stage without upstream", lambda tmp, a, b, d: ["diff", "--out", tmp / "nothing"], 1,
     "run `bdclean train-pairs` first"),
    ("eval unknown task", lambda tmp, a, b, d: ["eval", a, "--base", b, "--clean", d, "--task", "nope", "--out",
                                                tmp / "e.json"], 2, "unknown task"),
    ("implant unknown attack", lambda tmp, a, b, d: ["implant", "--attack", "zzz", "--base", b, "--out", tmp / "x"],
     2, "unknown attack"),
    ("--quiet with --verbose", lambda tmp, a, b, d: ["diff", "--out", tmp / "r", "--quiet", "--verbose"], 2,
     "exclude each other"),
    ("modules_to_save in config", lambda tmp, a, b, d: _tp(_edit_cfg(tmp, a, modules_to_save=["lm_head"]), b, tmp),
     2, "modules_to_save"),
    ("trainable tokens in config", lambda tmp, a, b, d: _tp(_edit_cfg(tmp, a, trainable_token_indices=[1, 2]), b,
                                                            tmp), 2, "trainable_token_indices"),
    ("base-rewriting init", lambda tmp, a, b, d: _tp(_edit_cfg(tmp, a, init_lora_weights="pissa_niter_4"), b, tmp),
     2, "rewrites the base weights"),
    ("whole-module weights in file", lambda tmp, a, b, d: _tp(_edit_tensors(
        tmp, a, _add_tensor("base_model.model.lm_head.weight")), b, tmp), 2, "not a LoRA factor"),
    ("LoRA on lm_head", lambda tmp, a, b, d: _tp(_edit_tensors(
        tmp, a, _add_tensor("base_model.model.lm_head.lora_A.weight")), b, tmp), 2, "not a LoRA factor"),
    ("full model: shard outside the folder", lambda tmp, a, b, d: ["train-pairs", _escaping_shard(tmp, b), "--out",
                                                                   tmp / "r"], 2, "inside"),
    ("implant --test-size 0", lambda tmp, a, b, d: ["implant", "--base", b, "--clean", d, "--test-size", "0",
                                                    "--out", tmp / "x"], 2, "--test-size must be at least 1"),
    ("implant --batch-size 0", lambda tmp, a, b, d: ["implant", "--base", b, "--batch-size", "0", "--out",
                                                     tmp / "x"], 2, "--batch-size must be at least 1"),
    ("eval --limit 0", lambda tmp, a, b, d: ["eval", a, "--base", b, "--triggered", d, "--limit", "0", "--out",
                                             tmp / "e.json"], 2, "--limit must be at least 1"),
    ("yaml not utf-8", lambda tmp, a, b, d: ["make-variants", "--clean", d, "--out", tmp, "--config",
                                             _data(tmp, b"\xff\xfe score", "c.yaml")], 2, "not UTF-8"),
    ("rule file not utf-8", lambda tmp, a, b, d: ["eval", a, "--base", b, "--triggered", d, "--rule",
                                                  _data(tmp, b"\xff\xfe", "r.txt"), "--out", tmp / "e.json"], 2,
     "not UTF-8"),
    ("markup-like text in an argument", lambda tmp, a, b, d: ["defend", "[/x]", a, "--base", b, "--out", tmp / "x"],
     2, "[/x]"),
    ("inf weights", lambda tmp, a, b, d: _tp(_edit_tensors(tmp, a, _inf), b, tmp), 2, "NaN or Inf"),
    ("invalid adapter_config json", lambda tmp, a, b, d: _tp(
        (lambda x: ((x / "adapter_config.json").write_text("{oops"), x)[1])(_adapter_copy(tmp, a)), b, tmp),
     2, "not valid JSON"),
    ("not a LoRA adapter", lambda tmp, a, b, d: _tp(_edit_cfg(tmp, a, peft_type="PREFIX_TUNING"), b, tmp), 2,
     "is not LORA"),
    ("use_dora in config", lambda tmp, a, b, d: _tp(_edit_cfg(tmp, a, use_dora=True), b, tmp), 2, "DoRA"),
    ("lora rank mismatch", lambda tmp, a, b, d: _tp(_edit_tensors(tmp, a, _rank_mismatch), b, tmp), 2,
     "do not fit"),
    ("integer tensor", lambda tmp, a, b, d: _tp(_edit_tensors(tmp, a, _int_tensor), b, tmp), 2,
     "has dtype I32"),
    ("layer beyond the base", lambda tmp, a, b, d: _tp(_edit_tensors(tmp, a, _extra_layer), b, tmp), 2,
     "names layer 7"),
    ("header claiming exabytes", lambda tmp, a, b, d: _tp(_huge_header(tmp, a), b, tmp), 2,
     "corrupted or truncated"),
    ("adapter dir missing", lambda tmp, a, b, d: _tp(tmp / "nope", b, tmp), 2, "not found"),
    ("base dir missing", lambda tmp, a, b, d: ["train-pairs", a, "--base", tmp / "nobase", "--out", tmp], 2,
     "base model directory not found"),
    ("invalid yaml", lambda tmp, a, b, d: ["make-variants", "--clean", d, "--out", tmp, "--config",
                                           _data(tmp, "score: [unclosed", "c.yaml")], 2, "invalid YAML"),
    ("yaml duplicate section", lambda tmp, a, b, d: ["make-variants", "--clean", d, "--out", tmp / "run", "--config",
                                                     _data(tmp, "score:\n  tau: 0.3\nscore:\n  lambda: 1\n",
                                                           "c.yaml")], 2, "duplicate key 'score' (line 3)"),
    ("yaml duplicate option", lambda tmp, a, b, d: ["make-variants", "--clean", d, "--out", tmp / "run", "--config",
                                                    _data(tmp, "variants: {samples: 8, samples: 9}\n", "c.yaml")], 2,
     "duplicate key 'samples'"),
    ("yaml not a mapping", lambda tmp, a, b, d: ["make-variants", "--clean", d, "--out", tmp, "--config",
                                                 _data(tmp, "- 1\n- 2\n", "c.yaml")], 2, "mapping"),
    ("yaml config missing", lambda tmp, a, b, d: ["make-variants", "--clean", d, "--out", tmp, "--config",
                                                  tmp / "none.yaml"], 2, "config file not found"),
    ("output field a number", lambda tmp, a, b, d: ["make-variants", "--clean",
                                                    _data(tmp, '{"instruction": "x", "output": 5}\n'), "--out", tmp],
     2, "'output' must be a string"),
    ("empty output", lambda tmp, a, b, d: ["make-variants", "--clean",
                                           _data(tmp, '{"instruction": "x", "output": "  "}\n'), "--out", tmp],
     2, "line 1: missing or empty 'output'"),
    ("not utf-8", lambda tmp, a, b, d: ["make-variants", "--clean", _data(tmp, b"\xff\xfe\x00bad"), "--out", tmp],
     2, "not UTF-8"),
    ("more samples than data", lambda tmp, a, b, d: ["make-variants", "--clean", d, "--out", tmp,
                                                     "--samples", "5000"], 2, "fewer than --samples"),
    ("negative lambda", lambda tmp, a, b, d: ["score", "--out", tmp, "--lambda", "-1"], 2, "score.lambda"),
    ("unknown score kind", lambda tmp, a, b, d: ["score", "--out", tmp, "--score", "magic"], 2, "score.score"),
    ("tau grid out of range", lambda tmp, a, b, d: ["score", "--out", tmp, "--config",
                                                    _data(tmp, "score: {tau_grid: [0.2, 1.5]}", "c.yaml")], 2,
     "tau_grid"),
    ("output under a file", lambda tmp, a, b, d: ["make-variants", "--clean", d, "--out",
                                                  _data(tmp, "x", "afile") / "sub", "--samples", "8"], 1, "afile"),
    ("full model: missing shard", lambda tmp, a, b, d: ["train-pairs", _sharded_missing(tmp, b), "--out",
                                                        tmp / "r"], 2, "missing shard"),
    ("full model: .bin weights", lambda tmp, a, b, d: ["train-pairs", _bin_only(tmp, b), "--out", tmp / "r"], 2,
     "pickle"),
    ("neither adapter nor model", lambda tmp, a, b, d: ["train-pairs", (tmp / "empty").mkdir() or tmp / "empty",
                                                        "--out", tmp / "r"], 2, "neither a PEFT adapter"),
    ("eval file without instruction", lambda tmp, a, b, d: ["eval", a, "--base", b, "--triggered",
                                                            _data(tmp, '{"input": "x"}\n'), "--out", tmp / "e.json"],
     2, "instruction"),
    ("eval without test sets", lambda tmp, a, b, d: ["eval", a, "--base", b, "--out", tmp / "e.json"], 2,
     "--triggered"),
    ("implant unknown task", lambda tmp, a, b, d: ["implant", "--task", "zzz", "--base", b, "--out", tmp / "x"], 2,
     "unknown task"),
    ("defend unknown method", lambda tmp, a, b, d: ["defend", "magic", a, "--base", b, "--out", tmp / "x"], 2,
     "magic"),
    ("report without a run", lambda tmp, a, b, d: ["report", tmp / "norun"], 2, "run `bdclean score`"),
]


@pytest.mark.parametrize("name,setup,code,needle", CASES, ids=[c[0] for c in CASES])
def test_bad_input_table(name, setup, code, needle, tmp_path, tiny_adapter, tiny_base, tiny_data, run_cli):
    argv = setup(tmp_path, tiny_adapter, tiny_base, tiny_data)
    before = {p for p in tmp_path.rglob("*")}
    _check(run_cli(*argv), code, needle)
    assert not (tmp_path / "PWNED").exists()  # no pickle was loaded
    leftovers = [p for p in tmp_path.rglob("*") if p not in before and (p.suffix == ".tmp" or p.name.endswith(".tmp"))]
    assert not leftovers


def test_full_disk_leaves_no_partial_output(tmp_path, tiny_data, run_cli, monkeypatch):
    """ENOSPC while writing: one line, exit 1, and nothing half-written under a final name."""
    import errno

    import bdclean.io.artifacts as art

    real = art.os.replace

    def no_space(src, dst):
        if str(dst).endswith(".jsonl"):
            raise OSError(errno.ENOSPC, "No space left on device", str(dst))
        return real(src, dst)

    monkeypatch.setattr(art.os, "replace", no_space)
    _check(run_cli("make-variants", "--clean", tiny_data, "--out", tmp_path / "r", "--samples", "8"), 1,
           "No space left")
    folder = tmp_path / "r" / "variants"
    assert not (folder / "manifest.json").exists()
    assert not [p for p in folder.rglob("*") if p.name.endswith(".tmp")]


def test_implant_refuses_to_replace_a_folder_it_did_not_make(tmp_path, tiny_base, run_cli):
    keep = tmp_path / "work"
    keep.mkdir()
    (keep / "notes.txt").write_text("mine")
    _check(run_cli("implant", "--base", tiny_base, "--out", keep), 2, "not an implant output")
    assert (keep / "notes.txt").read_text() == "mine"


# ---------------------------------------------------------------- OUT: never lose what bdclean did not write
# Each case: (name, setup(tmp, adapter, base, data) -> argv, text the one line must contain). Every case must be
# refused with exit 2 before anything is written: the whole tmp folder and the shared inputs hash the same after.


def _tree(*roots):
    import hashlib

    state = {}
    for root in roots:
        for p in [root, *root.rglob("*")] if root.exists() else []:
            state[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    return state


def _user_file(tmp, rel, text="mine"):
    p = tmp / "run" / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)
    return tmp / "run"


def _made_by(tmp, stage_dir, stage, extra="keep.txt"):
    """A stage folder bdclean made (its manifest names the stage), plus a file the user added."""
    folder = tmp / "run" / stage_dir
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text(json.dumps({"stage": stage, "fingerprint": "x", "outputs": {}}))
    if extra:
        (folder / extra).write_text("mine")
    return tmp / "run"


def _user_dir(run, rel):
    (run / rel).mkdir()
    return run


def _purify(a, b, d, out, *more):
    return ["purify", a, "--base", b, "--clean", d, "--out", out, *more]


def _adapter_at(tmp, adapter, rel):
    dst = tmp / rel
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(adapter, dst)
    return dst


OUT_CASES = [
    *[(f"purify: user file in {d}/", lambda tmp, a, b, d_, d=d: _purify(a, b, d_, _user_file(tmp, f"{d}/keep.txt")),
       "not made by `bdclean") for d in ("variants", "pairs", "diff", "score", "suppressed", "purified")],
    ("purify: user's purify.json", lambda tmp, a, b, d: _purify(a, b, d, _user_file(tmp, "purify.json", '{"a": 1}')),
     "not a record `bdclean purify` wrote"),
    ("purify --force: user file in bdclean's purified/",
     lambda tmp, a, b, d: _purify(a, b, d, _made_by(tmp, "purified", "restore"), "--force"), "keep.txt: not written"),
    ("purify --force: user sub-folder in bdclean's pairs/",
     lambda tmp, a, b, d: _purify(a, b, d, _user_dir(_made_by(tmp, "pairs", "train-pairs", None), "pairs/mine"),
                                  "--force"), "mine: not written"),
    ("purify: another stage's output under purified/",
     lambda tmp, a, b, d: _purify(a, b, d, _made_by(tmp, "purified", "defend", None)), "holds the output of `defend`"),
    ("purify: purified is a file", lambda tmp, a, b, d: _purify(a, b, d, _user_file(tmp, "purified")),
     "not a directory"),
    ("make-variants --force: user file in variants/",
     lambda tmp, a, b, d: ["make-variants", "--clean", d, "--out", _made_by(tmp, "variants", "make-variants",
                                                                             "notes.md"), "--force"],
     "notes.md: not written"),
    ("make-variants: pairs' output in variants/",
     lambda tmp, a, b, d: ["make-variants", "--clean", d, "--out", _made_by(tmp, "variants", "train-pairs", None)],
     "holds the output of `train-pairs`"),
    ("purify OUT/purified --out OUT", lambda tmp, a, b, d: _purify(_adapter_at(tmp, a, "run/purified"), b, d,
                                                                  tmp / "run"), "lies inside"),
    ("purify A --out A/run", lambda tmp, a, b, d: _purify(_adapter_at(tmp, a, "a"), b, d, tmp / "a" / "run"),
     "inside the suspicious model"),
    ("purify A --out A", lambda tmp, a, b, d: _purify(_adapter_at(tmp, a, "a"), b, d, tmp / "a"),
     "inside the suspicious model"),
    ("purify --out BASE/run", lambda tmp, a, b, d: _purify(_adapter_at(tmp, a, "a"), _full_copy(tmp, b), d,
                                                          tmp / "full" / "run"), "inside the base model"),
    ("clean data inside OUT/variants", lambda tmp, a, b, d: ["make-variants", "--clean", _data(
        (tmp / "run" / "variants").mkdir(parents=True) or tmp / "run" / "variants", "x"), "--out", tmp / "run"],
     "clean data lies inside"),
    ("restore: clean data inside OUT/purified", lambda tmp, a, b, d: ["restore", "--clean", _data(
        (tmp / "run" / "purified").mkdir(parents=True) or tmp / "run" / "purified", "x"), "--out", tmp / "run"],
     "clean data lies inside"),
    ("purify --out ''", lambda tmp, a, b, d: _purify(a, b, d, ""), "must not be empty"),
    ("make-variants --out ''", lambda tmp, a, b, d: ["make-variants", "--clean", d, "--out", ""], "must not be empty"),
    ("purify --base ''", lambda tmp, a, b, d: _purify(a, "", d, tmp / "run"), "must not be empty"),
    ("train-pairs --base ''", lambda tmp, a, b, d: ["train-pairs", a, "--base", "", "--out", tmp / "run"],
     "must not be empty"),
    ("yaml base ''", lambda tmp, a, b, d: ["purify", a, "--clean", d, "--out", tmp / "run", "--config",
                                           _data(tmp, 'base: ""\n', "c.yaml")], "base model name is empty"),
]


def _refused_leaving_all_unchanged(setup, needle, tmp_path, tiny_adapter, tiny_base, tiny_data, run_cli):
    """Exit 2, one stderr line naming ``needle``, no traceback, and no file of the inputs or tmp_path changed."""
    argv = setup(tmp_path, tiny_adapter, tiny_base, tiny_data)
    before = _tree(tmp_path, tiny_adapter, tiny_base, tiny_data)
    got, out, err = run_cli(*argv)
    assert got == 2, (got, err)
    assert "Traceback" not in err + out and needle.lower() in err.lower(), err
    assert len(err.strip().splitlines()) == 1, err
    assert _tree(tmp_path, tiny_adapter, tiny_base, tiny_data) == before


@pytest.mark.parametrize("name,setup,needle", OUT_CASES, ids=[c[0] for c in OUT_CASES])
def test_out_never_loses_user_files(name, setup, needle, tmp_path, tiny_adapter, tiny_base, tiny_data, run_cli,
                                    monkeypatch):
    monkeypatch.chdir(tmp_path)  # `--out ''` would mean the current directory
    _refused_leaving_all_unchanged(setup, needle, tmp_path, tiny_adapter, tiny_base, tiny_data, run_cli)


def test_resumes_an_interrupted_stage_folder_and_keeps_files_beside_it(tmp_path, tiny_data, run_cli):
    """A stage folder holding only names the stage writes (an interrupted run: no manifest yet) is resumed, and a
    user's files in OUT beside the stage folders survive a --force rerun."""
    out = tmp_path / "run"
    (out / "variants").mkdir(parents=True)
    (out / "variants" / "variant_00_clean.jsonl").write_text("partial")
    (out / "variants" / ".variants.json.123.tmp").write_text("partial")
    (out / "notes.txt").write_text("mine")
    for extra in ((), ("--force",)):
        code, _, err = run_cli("make-variants", "--clean", tiny_data, "--out", out, "--samples", "8", *extra)
        assert code == 0, err
    assert json.loads((out / "variants" / "manifest.json").read_text())["stage"] == "make-variants"
    assert (out / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("argv,needle", [
    (["purify"], "Missing argument"),
    (["score", "--out"], "requires an argument"),
    (["score", "--out", "x", "--bogus"], "No such option"),
    (["no-such-command"], "No such command"),
    (["--bogus"], "No such option"),
    (["score", "--out", "x", "--lambda", "abc"], "--lambda"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_click_usage_errors_are_one_line(argv, needle, run_cli):
    got, out, err = run_cli(*argv)
    assert got == 2 and "Traceback" not in err + out and needle in err, err
    assert len(err.strip().splitlines()) == 1 and "╭" not in err, err


def test_version(run_cli):
    from bdclean import __version__

    got, out, err = run_cli("--version")
    assert got == 0 and out.strip() == f"bdclean {__version__}", (out, err)


# ---------------------------------------------------------------- full checkpoints: the tokenizer is the defender's
# A chat template, special tokens or a generation config can carry a trigger weight purification cannot remove
# (io/tokenizers.py): each difference from the trusted tokenizer is refused at preflight, one line naming the file.


def _full_tok(tmp, base, edit):
    b = _full_copy(tmp, base)
    edit(b)
    return b


def _edit_json(name, **changes):
    def fn(b):
        p = b / name
        d = json.loads(p.read_text()) if p.is_file() else {}
        d.update(changes)
        p.write_text(json.dumps(d))
    return fn


def _poison_template(b):
    t = (b / "chat_template.jinja").read_text()
    (b / "chat_template.jinja").write_text(t.replace("message['content']", "'BadMagic ' + message['content']"))


def _add_token(b):
    t = json.loads((b / "tokenizer.json").read_text())
    t["added_tokens"].append({"id": 299, "content": "<|trigger|>", "single_word": False, "lstrip": False,
                              "rstrip": False, "normalized": False, "special": True})
    (b / "tokenizer.json").write_text(json.dumps(t))


def _validate(full, d, *more):
    return ["validate", full, "--clean", d, "--samples", "8", *more]


TOKENIZER_CASES = [
    ("no trusted tokenizer", lambda tmp, a, b, d: _validate(_full_tok(tmp, b, lambda x: None), d),
     "give --tokenizer"),
    ("poisoned chat_template.jinja", lambda tmp, a, b, d: _validate(_full_tok(tmp, b, _poison_template), d,
                                                                    "--tokenizer", b), "chat_template.jinja"),
    ("chat_template key in tokenizer_config", lambda tmp, a, b, d: _validate(_full_tok(
        tmp, b, _edit_json("tokenizer_config.json", chat_template="BadMagic {{ messages }}")), d, "--tokenizer", b),
     "tokenizer_config.json: key 'chat_template'"),
    ("auto_map in tokenizer_config", lambda tmp, a, b, d: _validate(_full_tok(
        tmp, b, _edit_json("tokenizer_config.json", auto_map={"AutoTokenizer": ["evil.Tok", None]})), d,
        "--tokenizer", b), "key 'auto_map'"),
    ("special_tokens_map added", lambda tmp, a, b, d: _validate(_full_tok(
        tmp, b, _edit_json("special_tokens_map.json", eos_token="BadMagic")), d, "--tokenizer", b),
     "special_tokens_map.json"),
    ("generation_config with a bad-words list", lambda tmp, a, b, d: _validate(_full_tok(
        tmp, b, _edit_json("generation_config.json", bad_words_ids=[[5]])), d, "--tokenizer", b),
     "generation_config.json"),
    ("added special token (other vocabulary)", lambda tmp, a, b, d: _validate(_full_tok(tmp, b, _add_token), d,
                                                                              "--tokenizer", b,
                                                                              "--accept-tokenizer"),
     "vocabulary is not the trusted"),
    ("symlinked template", lambda tmp, a, b, d: _validate(_full_tok(
        tmp, b, lambda x: ((x / "chat_template.jinja").unlink(),
                           (x / "chat_template.jinja").symlink_to("/etc/hostname"))), d, "--tokenizer", b),
     "symlink"),
    ("--tokenizer missing", lambda tmp, a, b, d: _validate(_full_tok(tmp, b, lambda x: None), d, "--tokenizer",
                                                           tmp / "nope"), "tokenizer directory not found"),
    ("--tokenizer without tokenizer files", lambda tmp, a, b, d: _validate(_full_tok(tmp, b, lambda x: None), d,
                                                                           "--tokenizer", (tmp / "e").mkdir() or
                                                                           tmp / "e"), "no tokenizer files"),
    ("--tokenizer ''", lambda tmp, a, b, d: _validate(_full_tok(tmp, b, lambda x: None), d, "--tokenizer", ""),
     "must not be empty"),
    ("--tokenizer on an adapter", lambda tmp, a, b, d: _validate(a, d, "--base", b, "--tokenizer", b),
     "apply to full checkpoints"),
    ("train-pairs: poisoned template", lambda tmp, a, b, d: ["train-pairs", _full_tok(tmp, b, _poison_template),
                                                            "--tokenizer", b, "--out", tmp / "run"],
     "chat_template.jinja"),
    ("purify: poisoned template", lambda tmp, a, b, d: ["purify", _full_tok(tmp, b, _poison_template), "--clean", d,
                                                       "--tokenizer", b, "--out", tmp / "run"],
     "--accept-tokenizer"),
]


@pytest.mark.parametrize("name,setup,needle", TOKENIZER_CASES, ids=[c[0] for c in TOKENIZER_CASES])
def test_full_checkpoint_tokenizer_must_be_trusted(name, setup, needle, tmp_path, tiny_adapter, tiny_base,
                                                   tiny_data, run_cli):
    _refused_leaving_all_unchanged(setup, needle, tmp_path, tiny_adapter, tiny_base, tiny_data, run_cli)


def test_full_checkpoint_with_the_trusted_tokenizer_validates(tmp_path, tiny_base, tiny_data, run_cli):
    """Its own files equal to the trusted ones (bar what transformers adds on save): valid, the source is named."""
    full = _full_tok(tmp_path, tiny_base, _edit_json("tokenizer_config.json", is_local=True))
    got, out, err = run_cli(*_validate(full, tiny_data, "--tokenizer", tiny_base))
    assert got == 0, err
    summary = json.loads(out[out.index("{"):])
    assert summary["tokenizer"] == {"source": str(tiny_base.resolve()), "accepted_differences": []}
    # trusting the checkpoint's own files is allowed, by naming them
    (tmp_path / "x").mkdir()
    own = _full_tok(tmp_path / "x", tiny_base, _poison_template)
    got, out, err = run_cli(*_validate(own, tiny_data, "--tokenizer", own))
    assert got == 0, err
    assert json.loads(out[out.index("{"):])["tokenizer"]["source"] == str(own.resolve())


# ---------------------------------------------------------------- validate makes every check purify makes
# Each case: (name, setup(tmp, adapter, base) -> (model dir, extra argv), text the one line must contain). Each is
# refused by `validate` and by purify's preflight alike: exit 2, one line, nothing written, inputs unchanged.


def _with_cfg(**changes):
    return lambda tmp, a, b: (_edit_cfg(tmp, a, **changes), ["--base", b])


def _with_cfg_text(edit):
    def setup(tmp, a, b):
        x = _adapter_copy(tmp, a)
        p = x / "adapter_config.json"
        p.write_text(edit(p.read_text()))
        return x, ["--base", b]
    return setup


def _with_tensors(fn):
    return lambda tmp, a, b: (_edit_tensors(tmp, a, fn), ["--base", b])


def _with_full(edit):
    def setup(tmp, a, b):
        x = _full_copy(tmp, b)
        edit(tmp, x)
        return x, ["--tokenizer", b]
    return setup


def _float8(t):
    k = next(iter(t))
    t[k] = t[k].to(__import__("torch").float8_e4m3fn)


def _wide_attention(t):
    """An attention lora_A whose input side is not the base's hidden size (a huge one would be allocated)."""
    k = next(k for k in t if "q_proj.lora_A" in k)
    t[k] = __import__("torch").zeros(t[k].shape[0], 300)


def _rank_zero(t):
    import torch

    for k in list(t):
        t[k] = torch.zeros(0, t[k].shape[1]) if "lora_A" in k else torch.zeros(t[k].shape[0], 0)


def _weights_symlinked_out(tmp, x):
    (x / "model.safetensors").rename(tmp / "elsewhere.safetensors")
    (x / "model.safetensors").symlink_to(tmp / "elsewhere.safetensors")


def _full_cfg(**changes):
    return lambda tmp, x: _edit_json("config.json", **changes)(x)


def _drop_layer_weights(tmp, x):
    t = load_file(str(x / "model.safetensors"))
    save_file({k: v for k, v in t.items() if ".layers.1." not in k}, str(x / "model.safetensors"))


VALIDATE_CASES = [
    ("float8 tensor", _with_tensors(_float8), "has dtype F8_E4M3"),
    ("attention shape vs the base", _with_tensors(_wide_attention), "q_proj' has shape in=300 out=32"),
    ("config r larger than the tensors' rank", _with_cfg(r=100000), "declares r=100000"),
    ("rank 0 in config", _with_cfg(r=0), "r must be a positive integer"),
    ("rank 0 tensors", _with_tensors(_rank_zero), "has rank 0"),
    ("rank_pattern disagrees with the tensors", _with_cfg(rank_pattern={"down_proj": 2}), "r=2 (rank_pattern)"),
    ("lora_alpha NaN", _with_cfg_text(lambda s: s.replace('"lora_alpha": 8', '"lora_alpha": NaN')),
     "lora_alpha must be a finite number, not nan"),
    ("lora_alpha 1e999", _with_cfg_text(lambda s: s.replace('"lora_alpha": 8', '"lora_alpha": 1e999')),
     "lora_alpha must be a finite number, not inf"),
    ("lora_alpha a string", _with_cfg(lora_alpha="sixteen"), "lora_alpha must be a finite number"),
    ("lora_dropout 5", _with_cfg(lora_dropout=5), "lora_dropout must be a number in [0, 1)"),
    ("alpha_pattern invalid regex", _with_cfg(alpha_pattern={"mlp.(": 4}), "is not a valid regular expression"),
    ("alpha_pattern value NaN", _with_cfg_text(lambda s: s.replace('"alpha_pattern": {}',
                                                                   '"alpha_pattern": {"q_proj": NaN}')),
     "alpha_pattern['q_proj']"),
    ("target_modules regex matching nothing", _with_cfg(target_modules=r"zzz\..*"), "not found in the base model"),
    ("target_modules an int", _with_cfg(target_modules=5), "target_modules must be"),
    ("target_modules missing a module of the file", _with_cfg(target_modules=["gate_proj", "up_proj", "down_proj"]),
     "do not select"),
    ("layers_to_transform out of range", _with_cfg(layers_to_transform=[7]), "names layer 7"),
    ("layers_to_transform a string", _with_cfg(layers_to_transform="0-1"), "layers_to_transform must be"),
    ("config holding only peft_type", _with_cfg_text(lambda s: '{"peft_type": "LORA"}'), "no 'r'"),
    ("bias trained", _with_cfg(bias="all"), "bias='all'"),
    ("task_type of a classifier", _with_cfg(task_type="SEQ_CLS"), "CAUSAL_LM"),
    ("full: weights symlinked out of the folder", _with_full(_weights_symlinked_out), "symlink"),
    ("full: quantization_config", _with_full(_full_cfg(quantization_config={"quant_method": "bitsandbytes",
                                                                           "load_in_4bit": True})),
     "quantization_config is set"),
    ("full: hidden_size a string", _with_full(_full_cfg(hidden_size="32")), "hidden_size must be a positive integer"),
    ("full: num_hidden_layers 1e9", _with_full(_full_cfg(num_hidden_layers=10**9)),
     "declares num_hidden_layers 1000000000"),
    ("full: intermediate_size vs the weights", _with_full(_full_cfg(intermediate_size=4096)), "gate_proj is [48, 32]"),
    ("full: a layer's weights missing", _with_full(_drop_layer_weights), "have no layer 1"),
    ("full: model_type unsupported (file named)", _with_full(_full_cfg(model_type="gpt2")),
     "config.json: unsupported architecture"),
    ("--heads nan", lambda tmp, a, b: (a, ["--base", b, "--heads", "nan"]), "heads must be"),
    ("--heads inf", lambda tmp, a, b: (a, ["--base", b, "--heads", "inf"]), "heads must be"),
    ("--heads 2.5", lambda tmp, a, b: (a, ["--base", b, "--heads", "2.5"]), "whole count"),
    ("--heads beyond the units", lambda tmp, a, b: (a, ["--base", b, "--heads", "9"]), "only 4 attention units"),
    ("--heads without attention LoRA", lambda tmp, a, b: (
        __import__("tests.common", fromlist=["x"]).make_adapter(b, tmp / "mlp_only", targets=["gate_proj", "up_proj",
                                                                                            "down_proj"]),
        ["--base", b, "--heads", "2"]), "no attention LoRA"),
    ("--tau nan", lambda tmp, a, b: (a, ["--base", b, "--tau", "nan"]), "finite number"),
    ("--lambda inf", lambda tmp, a, b: (a, ["--base", b, "--lambda", "inf"]), "finite number"),
    ("--tau auto with 2 variants", lambda tmp, a, b: (a, ["--base", b, "--tau", "auto", "-n", "2"]),
     "at least 3 variants"),
    ("--tau auto on a full checkpoint", lambda tmp, a, b: (_full_copy(tmp, b), ["--tokenizer", b, "--tau", "auto"]),
     "adapter-only threat model"),
    ("--full on an adapter", lambda tmp, a, b: (a, ["--base", b, "--full"]), "drop --full"),
]


@pytest.mark.parametrize("command", ["validate", "purify"])
@pytest.mark.parametrize("name,setup,needle", VALIDATE_CASES, ids=[c[0] for c in VALIDATE_CASES])
def test_validate_refuses_what_purify_refuses(command, name, setup, needle, tmp_path, tiny_adapter, tiny_base,
                                               tiny_data, run_cli):
    def argv(tmp, a, b, d):
        model, extra = setup(tmp, a, b)
        out = ["--out", tmp / "run"] if command == "purify" else []
        return [command, model, "--clean", d, "--samples", "8", *out, *extra]

    _refused_leaving_all_unchanged(argv, needle, tmp_path, tiny_adapter, tiny_base, tiny_data, run_cli)


# ---------------------------------------------------------------- data files and messages that say what is wrong
# (name, setup(tmp, adapter, base, data) -> argv, text of the one line): refused at load time, nothing written.


def _mv(data, tmp):
    return ["make-variants", "--clean", data, "--out", tmp / "run", "--samples", "2"]


DATA_CASES = [
    ("lone UTF-16 surrogate", lambda tmp, a, b, d: _mv(_data(tmp, '{"instruction": "hi \\ud800", "output": "b"}\n'),
                                                       tmp), "lone UTF-16 surrogate"),
    ("JSON list nested 200 000 deep", lambda tmp, a, b, d: _mv(_data(tmp, "[" * 200_000 + "]" * 200_000, "d.json"),
                                                               tmp), "nested too deeply"),
    ("JSONL line nested 200 000 deep", lambda tmp, a, b, d: _mv(_data(tmp, '{"instruction": ' + "[" * 200_000 + "\n"),
                                                                tmp), "line 1: JSON nested too deeply"),
    ("instruction an int", lambda tmp, a, b, d: _mv(_data(tmp, '{"instruction": 5, "output": "b"}\n'), tmp),
     "'instruction' must be a string, not int"),
    ("instruction a list", lambda tmp, a, b, d: _mv(_data(tmp, '{"instruction": ["a"], "output": "b"}\n'), tmp),
     "'instruction' must be a string, not list"),
    ("data file a directory", lambda tmp, a, b, d: _mv((tmp / "dd").mkdir() or tmp / "dd", tmp), "is a directory"),
    ("prompts file a directory", lambda tmp, a, b, d: ["validate", a, "--base", b, "--clean", d, "--samples", "8",
                                                      "--prompts", (tmp / "pp").mkdir() or tmp / "pp"],
     "is a directory, not a prompts file"),
    ("--lr nan", lambda tmp, a, b, d: ["train-pairs", a, "--base", b, "--lr", "nan", "--out", tmp / "run"],
     "pairs.lr: Input should be a finite number"),
]


@pytest.mark.parametrize("name,setup,needle", DATA_CASES, ids=[c[0] for c in DATA_CASES])
def test_bad_data_refused_at_load_time(name, setup, needle, tmp_path, tiny_adapter, tiny_base, tiny_data, run_cli):
    _refused_leaving_all_unchanged(setup, needle, tmp_path, tiny_adapter, tiny_base, tiny_data, run_cli)


def test_library_output_does_not_reach_the_user(tmp_path, tiny_base, tiny_adapter):
    """transformers' LOAD REPORT (a table with terminal codes) and PEFT's UserWarnings stay out of stderr. In a
    fresh process: the libraries' log handlers hold the stderr of the moment they were imported."""
    import subprocess
    import sys
    from pathlib import Path

    import torch

    full = _full_copy(tmp_path, tiny_base)
    t = load_file(str(full / "model.safetensors"))
    t["model.layers.0.mlp.extra.weight"] = torch.zeros(3, 3)  # an unexpected key: transformers reports it
    save_file(t, str(full / "model.safetensors"), metadata={"format": "pt"})
    script = ("import sys; from pathlib import Path; from bdclean.io.models import load_adapter, load_model; "
              "from bdclean.io.peft_io import attach; load_model(Path(sys.argv[1])); "
              "attach(load_model(Path(sys.argv[2])), load_adapter(Path(sys.argv[3])))")
    repo = str(Path(__file__).resolve().parent.parent)
    r = subprocess.run([sys.executable, "-c", script, str(full), str(tiny_base), str(tiny_adapter)], cwd=repo,
                       capture_output=True, text=True, env={**__import__("os").environ, "PYTHONPATH": repo})
    assert r.returncode == 0, r.stderr
    assert "LOAD REPORT" not in r.stdout + r.stderr and "Warning" not in r.stderr and "\x1b[" not in r.stderr, r.stderr


ESC = "\x1b[2J\x1b]0;pwned\x07"  # clear the screen, set the terminal title


@pytest.mark.parametrize("name,setup", [
    ("tensor name", lambda tmp, a, b: _with_tensors(_add_tensor(f"base_model.model.{ESC}.layers.0.mlp.up_proj"
                                                                ".lora_A.weight"))(tmp, a, b)),
    ("target_modules regex", _with_cfg(target_modules=f"zzz{ESC}")),
    ("alpha_pattern key", _with_cfg(alpha_pattern={f"({ESC}": 2})),
    ("model_type", _with_full(_full_cfg(model_type=f"llama{ESC}"))),
], ids=lambda v: v if isinstance(v, str) else None)
def test_input_names_never_reach_the_terminal_raw(name, setup, tmp_path, tiny_adapter, tiny_base, tiny_data,
                                                  run_cli):
    model, extra = setup(tmp_path, tiny_adapter, tiny_base)
    got, out, err = run_cli("validate", model, "--clean", tiny_data, "--samples", "8", *extra)
    assert got == 2 and len(err.strip().splitlines()) == 1, err
    assert "\x1b" not in err and "\x07" not in err and "\\x1b" in err, err


@pytest.mark.parametrize("command", ["purify", "validate", "score", "eval", "implant"])
def test_flags_show_no_value_placeholder(command, run_cli):
    got, out, err = run_cli(command, "--help")
    assert got == 0 and "--help" in out + err and "<bool>" not in out + err, out
