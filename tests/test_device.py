"""--device / --dtype resolution (bdclean/train/device.py) on CPU, with torch.cuda faked for the CUDA branches."""

import pytest
import torch

from bdclean.errors import EXIT_USAGE, UsageError
from bdclean.train import device as dev


@pytest.fixture()
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture()
def fake_cuda(monkeypatch):
    """Two CUDA devices, the second one without bfloat16 (like a pre-Ampere card)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: f"Fake GPU {i}")
    state = {"bf16": True}
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: state["bf16"])
    return state


def one_line(excinfo):
    msg = str(excinfo.value)
    assert "\n" not in msg and excinfo.value.exit_code == EXIT_USAGE
    return msg


def test_cpu_defaults(no_cuda):
    assert dev.resolve() == dev.Placement("cpu", "float32")
    assert dev.resolve("auto", "auto") == dev.Placement("cpu", "float32")
    assert dev.resolve("CPU", "fp32") == dev.Placement("cpu", "float32")
    assert dev.resolve("cpu").record()["device"] == "cpu"
    assert dev.resolve("cpu", "float32").torch_dtype is torch.float32


def test_cuda_without_cuda_is_one_line(no_cuda):
    for spec in ("cuda", "cuda:1"):
        with pytest.raises(UsageError) as e:
            dev.resolve(spec)
        assert f"--device {spec}: no CUDA device on this machine" in one_line(e)


def test_bad_specs(no_cuda):
    for spec in ("gpu", "cuda:", "cuda:x", "cuda:-1", ""):
        with pytest.raises(UsageError) as e:
            dev.resolve(spec)
        assert "expected auto, cpu, cuda or cuda:N" in one_line(e)
    with pytest.raises(UsageError) as e:
        dev.resolve("cpu", "float16")
    assert "expected auto, float32 or bfloat16" in one_line(e)


def test_bf16_on_cpu(no_cuda, monkeypatch):
    if dev._cpu_bf16_works():
        assert dev.resolve("cpu", "bf16") == dev.Placement("cpu", "bfloat16")
    monkeypatch.setattr(dev, "_cpu_bf16_works", lambda: False)
    with pytest.raises(UsageError) as e:
        dev.resolve("cpu", "bfloat16")
    assert "this CPU (or this torch build) cannot train in bfloat16" in one_line(e)


def test_cuda_branches_faked(fake_cuda, monkeypatch):
    assert dev.resolve() == dev.Placement("cuda:0", "bfloat16")  # auto: CUDA, bf16 by default
    assert dev.resolve("cuda", "float32") == dev.Placement("cuda:0", "float32")
    assert dev.resolve("cuda:1", "auto").device == "cuda:1"
    assert dev.resolve("cpu") == dev.Placement("cpu", "float32")  # an explicit CPU stays float32
    with pytest.raises(UsageError) as e:
        dev.resolve("cuda:2")
    assert "this machine has 2 CUDA device(s) (cuda:0 to cuda:1)" in one_line(e)
    fake_cuda["bf16"] = False
    assert dev.resolve("cuda:1").dtype == "float32"  # auto falls back where bf16 is missing
    with pytest.raises(UsageError) as e:
        dev.resolve("cuda:1", "bfloat16")
    assert "cuda:1 (Fake GPU 1) does not support bfloat16" in one_line(e)
    monkeypatch.setattr(torch.version, "cuda", "12.4")
    rec = dev.resolve("cuda:1", "float32").record()
    assert rec["device_name"] == "Fake GPU 1" and rec["cuda"] == "12.4"
