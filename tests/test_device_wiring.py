"""--device / --dtype / --gradient-checkpointing wired into the commands (issue 23), on CPU with tiny models.

CPU + float32 must give what bdclean gave before the options existed (same bytes, same fingerprints); any other
placement changes the fingerprint. The CUDA branches run with a faked torch.cuda: no test needs a GPU."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from bdclean.train import device as dev
from tests.test_device import fake_cuda, no_cuda  # noqa: F401 - fixtures: torch.cuda faked (two GPUs) or absent

FAST = ["--n-variants", "2", "--samples", "6"]
YAML = ("pairs:\n  epochs: 1\n  batch_size: 3\n  max_len: 48\nrestore:\n  samples: 6\n  epochs: 1\n  max_len: 48\n"
        "score:\n  tau: 0.25\n")


def _man(folder):
    return json.loads((folder / "manifest.json").read_text())


def _files(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.safetensors"))}


@pytest.fixture()
def fast_cfg(tmp_path):
    p = tmp_path / "fast.yaml"
    p.write_text(YAML)
    return p


def _stages(run_cli, out, tiny_base, tiny_adapter, tiny_data, cfg, *placement):
    """make-variants .. restore on OUT, train-pairs and restore with ``placement`` flags."""
    assert run_cli("make-variants", "--clean", tiny_data, "--out", out, "--config", cfg, *FAST)[0] == 0
    code, _, err = run_cli("train-pairs", tiny_adapter, "--base", tiny_base, "--out", out, "--config", cfg,
                           *placement)
    assert code == 0, err
    for args in (("diff",), ("score", "--config", cfg), ("suppress", tiny_adapter, "--base", tiny_base)):
        code, _, err = run_cli(*args, "--out", out)
        assert code == 0, err
    code, _, err = run_cli("restore", "--out", out, "--clean", tiny_data, "--config", cfg, *placement)
    assert code == 0, err


def test_cpu_float32_is_what_it_was(tiny_base, tiny_adapter, tiny_data, tmp_path, fast_cfg, run_cli):
    a, b = tmp_path / "default", tmp_path / "explicit"
    _stages(run_cli, a, tiny_base, tiny_adapter, tiny_data, fast_cfg)
    _stages(run_cli, b, tiny_base, tiny_adapter, tiny_data, fast_cfg, "--device", "cpu", "--dtype", "float32")
    for stage in ("pairs", "purified"):
        ma, mb = _man(a / stage), _man(b / stage)
        # the fingerprint is computed from exactly the keys it had before the options existed
        assert "placement" not in ma["config"] and "placement" not in mb["config"]
        assert ma["fingerprint"] == mb["fingerprint"] and ma["outputs"] == mb["outputs"]
        assert _files(a / stage) == _files(b / stage)
        rec = mb["extra"]["placement"]  # recorded all the same
        assert rec["device"] == "cpu" and rec["dtype"] == "float32" and rec["gradient_checkpointing"] is False
    # a rerun with the options spelt out is up to date
    code, _, err = run_cli("train-pairs", tiny_adapter, "--base", tiny_base, "--out", a, "--config", fast_cfg,
                           "--device", "cpu", "--dtype", "fp32")
    assert code == 0 and "skip" in err


def test_yaml_keys_and_cli_precedence(tmp_path):
    from bdclean.config import PurifyConfig, build

    cfg = build(PurifyConfig, {"device": "cpu", "dtype": "bfloat16", "gradient_checkpointing": True},
                {"dtype": "float32"})
    assert (cfg.device, cfg.dtype, cfg.gradient_checkpointing) == ("cpu", "float32", True)
    assert (PurifyConfig().device, PurifyConfig().dtype, PurifyConfig().gradient_checkpointing) == ("auto", "auto",
                                                                                                     False)


def test_fingerprint_rule():
    assert dev.fingerprint_part(dev.Placement("cpu", "float32")) is None
    assert dev.fingerprint_part(dev.Placement("cpu", "bfloat16")) == {"device": "cpu", "dtype": "bfloat16",
                                                                      "gradient_checkpointing": False}
    # which card is an execution detail; CUDA itself is not
    assert dev.fingerprint_part(dev.Placement("cuda:0", "bfloat16")) == \
        dev.fingerprint_part(dev.Placement("cuda:1", "bfloat16"))
    assert dev.fingerprint_part(dev.Placement("cuda:0", "float32"))["device"] == "cuda"
    assert dev.fingerprint_part(dev.Placement("cpu", "float32", True))["gradient_checkpointing"] is True
    assert dev.current() == dev.CPU  # outside a command


@pytest.mark.skipif(not dev._cpu_bf16_works(), reason="this CPU (or torch build) cannot train in bfloat16")
def test_bf16_on_cpu_trains_and_changes_the_fingerprint(tiny_base, tiny_adapter, tiny_data, tmp_path, fast_cfg,
                                                        run_cli):
    a, b = tmp_path / "fp32", tmp_path / "bf16"
    assert run_cli("make-variants", "--clean", tiny_data, "--out", a, "--config", fast_cfg, *FAST)[0] == 0
    code, _, err = run_cli("train-pairs", tiny_adapter, "--base", tiny_base, "--out", a, "--config", fast_cfg,
                           "--workers", "1")
    assert code == 0, err
    shutil.copytree(a, b)
    code, _, err = run_cli("train-pairs", tiny_adapter, "--base", tiny_base, "--out", b, "--config", fast_cfg,
                           "--workers", "1", "--dtype", "bfloat16")
    assert code == 0, err
    assert "skip" not in err  # a bf16 run is another computation: the fp32 twins are not reused
    ma, mb = _man(a / "pairs"), _man(b / "pairs")
    assert ma["fingerprint"] != mb["fingerprint"]
    assert mb["config"]["placement"] == {"device": "cpu", "dtype": "bfloat16", "gradient_checkpointing": False}
    assert mb["extra"]["placement"]["dtype"] == "bfloat16"
    # PEFT keeps the LoRA in float32 over the bf16 base: float32 master weights, close to the fp32 run's
    ta, tb = (load_file(str(d / "pairs" / "variant_00_bd.safetensors")) for d in (a, b))
    assert all(t.dtype == torch.float32 for t in tb.values())
    assert any(not torch.equal(ta[k], tb[k]) for k in ta)
    assert all(torch.allclose(ta[k], tb[k], atol=5e-2) for k in ta)


def test_gradient_checkpointing_on_cpu(tiny_base, tiny_adapter, tiny_data, tmp_path, fast_cfg, run_cli):
    a, b = tmp_path / "plain", tmp_path / "ckpt"
    assert run_cli("make-variants", "--clean", tiny_data, "--out", a, "--config", fast_cfg, *FAST)[0] == 0
    assert run_cli("train-pairs", tiny_adapter, "--base", tiny_base, "--out", a, "--config", fast_cfg)[0] == 0
    shutil.copytree(a / "variants", b / "variants")
    code, _, err = run_cli("train-pairs", tiny_adapter, "--base", tiny_base, "--out", b, "--config", fast_cfg,
                           "--gradient-checkpointing")
    assert code == 0, err
    mb = _man(b / "pairs")
    assert mb["config"]["placement"]["gradient_checkpointing"] is True
    assert mb["fingerprint"] != _man(a / "pairs")["fingerprint"]
    ta, tb = (load_file(str(d / "pairs" / "variant_01_bd.safetensors")) for d in (a, b))
    assert all(torch.allclose(ta[k], tb[k], atol=1e-4) for k in ta)  # same maths, without the shared prefix


def _one_line_exit_2(code, err):
    assert code == 2, err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    return lines[0]


def _commands(tiny_base, tiny_adapter, tiny_data, out):
    trig = tiny_data
    return {
        "train-pairs": ["train-pairs", tiny_adapter, "--base", tiny_base, "--out", out],
        "restore": ["restore", "--out", out, "--clean", tiny_data],
        "purify": ["purify", tiny_adapter, "--base", tiny_base, "--clean", tiny_data, "--out", out],
        "validate": ["validate", tiny_adapter, "--base", tiny_base, "--clean", tiny_data],
        "defend": ["defend", "finetune", tiny_adapter, "--base", tiny_base, "--out", out],
        "implant": ["implant", "--base", tiny_base, "--out", out],
        "eval": ["eval", tiny_adapter, "--base", tiny_base, "--clean", tiny_data, "--out", out / "eval.json"],
        "compare": ["compare", tiny_adapter, "--base", tiny_base, "--triggered", trig, "--clean-test", trig,
                    "--out", out],
    }


@pytest.mark.parametrize("flags,expect", [
    (["--device", "cuda"], "--device cuda: no CUDA device on this machine"),
    (["--device", "gpu"], "expected auto, cpu, cuda or cuda:N"),
    (["--dtype", "float16"], "expected auto, float32 or bfloat16"),
])
def test_bad_placement_is_one_line_and_writes_nothing(flags, expect, tiny_base, tiny_adapter, tiny_data, tmp_path,
                                                      run_cli, no_cuda):
    for name, args in _commands(tiny_base, tiny_adapter, tiny_data, tmp_path / "out").items():
        code, _, err = run_cli(*args, *flags)
        assert expect in _one_line_exit_2(code, err), name
        assert not (tmp_path / "out").exists(), name


def test_bad_placement_from_yaml_and_beyond_the_gpus(tiny_base, tiny_adapter, tiny_data, tmp_path, run_cli,
                                                     monkeypatch, fake_cuda):
    out = tmp_path / "out"
    cmds = _commands(tiny_base, tiny_adapter, tiny_data, out)
    code, _, err = run_cli(*cmds["purify"], "--device", "cuda:7")
    assert "this machine has 2 CUDA device(s)" in _one_line_exit_2(code, err)
    y = tmp_path / "p.yaml"
    y.write_text("device: tpu\n")
    code, _, err = run_cli(*cmds["train-pairs"], "--config", y)
    assert "expected auto, cpu, cuda or cuda:N" in _one_line_exit_2(code, err)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(dev, "_cpu_bf16_works", lambda: False)
    code, _, err = run_cli(*cmds["restore"], "--dtype", "bfloat16")
    assert "cannot train in bfloat16" in _one_line_exit_2(code, err)
    assert not out.exists()


def test_cuda_train_pairs_plans_one_process_on_the_gpu(tiny_base, tiny_adapter, tiny_data, tmp_path, fast_cfg,
                                                       run_cli, monkeypatch, fake_cuda):
    """On CUDA the local executor trains in this process on the chosen GPU, whatever the cores (faked CUDA: the
    twins' training itself is stopped before it would touch the GPU)."""
    from bdclean.pipeline import pairs_jobs

    out = tmp_path / "run"
    assert run_cli("make-variants", "--clean", tiny_data, "--out", out, "--config", fast_cfg, *FAST)[0] == 0
    monkeypatch.setattr("bdclean.train.loop.cpu_count", lambda: 4)
    monkeypatch.setattr(pairs_jobs, "MIN_PARALLEL_WEIGHT_BYTES", 0)  # on CPU this would plan 4 workers
    seen = {}

    class Stop(Exception):
        pass

    def inline(ctx, todo):
        seen["ctx"] = ctx
        raise Stop()

    monkeypatch.setattr(pairs_jobs, "run_inline", inline)
    monkeypatch.setattr(pairs_jobs, "run_parallel", lambda *a: pytest.fail("no worker processes on CUDA"))
    with pytest.raises(Stop):
        from bdclean.config import PairsOptions
        from bdclean.pipeline import pairs
        from bdclean.pipeline.run import Run

        with dev.use(dev.resolve("cuda:1")):
            pairs.run(Run.open(tiny_adapter, out, str(tiny_base)), PairsOptions(epochs=1, batch_size=3, max_len=48))
    assert seen["ctx"].placement == dev.Placement("cuda:1", "bfloat16")
    # an explicit --workers above 1 on CUDA is refused before anything is written
    code, _, err = run_cli("train-pairs", tiny_adapter, "--base", tiny_base, "--out", tmp_path / "new",
                           "--device", "cuda", "--workers", "2")
    assert "the local executor trains the twins in this process" in _one_line_exit_2(code, err)
    assert not (tmp_path / "new").exists()
    monkeypatch.setattr(torch.version, "cuda", "12.4")
    rec = dev.resolve("cuda:1").record()
    assert rec["device_name"] == "Fake GPU 1" and rec["cuda"] == "12.4"


def test_ray_tasks_ask_for_a_gpu_on_cuda():
    from bdclean.pipeline import pairs_ray
    from bdclean.pipeline.pairs_jobs import JobContext

    ctx = JobContext("adapter", "a", "b", {}, {}, "v", "f", "fp", 1)
    assert pairs_ray.num_gpus(ctx) == 0
    gpu = JobContext("adapter", "a", "b", {}, {}, "v", "f", "fp", 1, placement=dev.Placement("cuda:1", "bfloat16"))
    assert pairs_ray.num_gpus(gpu) == 1
    assert dev.in_ray_task(gpu.placement).device == "cuda:0"  # the task sees its one GPU as cuda:0
    assert dev.in_ray_task(dev.CPU) == dev.CPU

    class FakeRay:
        def __init__(self, gpus):
            self.gpus = gpus

        def nodes(self):
            return [{"Alive": True, "Resources": {"CPU": 8, "memory": 64 << 30, **({"GPU": self.gpus} if self.gpus
                                                                                   else {})}}]

    assert pairs_ray._feasible(FakeRay(0), 1, 1 << 30) == 8
    assert pairs_ray._feasible(FakeRay(2), 1, 1 << 30, gpus=1) == 2  # one twin per GPU
    from bdclean.errors import UsageError

    with pytest.raises(UsageError, match="1 GPU"):
        pairs_ray._feasible(FakeRay(0), 1, 1 << 30, gpus=1)


def test_eval_records_the_placement(tiny_base, tiny_adapter, tiny_data, tmp_path, run_cli):
    out = tmp_path / "eval.json"
    code, _, err = run_cli("eval", tiny_adapter, "--base", tiny_base, "--clean", tiny_data, "--limit", "2",
                           "--max-new-tokens", "2", "--out", out, "--device", "cpu")
    assert code == 0, err
    assert json.loads(out.read_text())["placement"]["device"] == "cpu"
