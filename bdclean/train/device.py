"""Where a stage trains or generates, and in which precision: ``--device auto|cpu|cuda[:N]`` and
``--dtype auto|float32|bfloat16`` resolved once, up front, with one-line errors (issue 23).

Only the resolution is here so far: the stages still train on CPU in float32, and no option uses this yet. The
CUDA branches are covered by CPU tests with a faked torch.cuda (tests/test_device.py), never run on a GPU.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from bdclean.errors import UsageError

DEVICES = "auto, cpu, cuda or cuda:N"
DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16"}


@dataclass(frozen=True)
class Placement:
    device: str  # "cpu" or "cuda:N"
    dtype: str  # "float32" or "bfloat16"

    def record(self) -> dict:
        """What a manifest records (an execution detail, like the worker count: not a stage input)."""
        import torch

        rec = {"device": self.device, "dtype": self.dtype, "torch": torch.__version__}
        if self.device.startswith("cuda"):
            rec["device_name"] = torch.cuda.get_device_name(int(self.device.split(":")[1]))
            rec["cuda"] = torch.version.cuda
        return rec

    @property
    def torch_dtype(self):
        import torch

        return getattr(torch, self.dtype)


def resolve_device(spec: str | None) -> str:
    """``auto`` (or None) = the first CUDA device when there is one, else the CPU."""
    import torch

    s = "auto" if spec is None else str(spec).strip().lower()
    m = re.fullmatch(r"cuda(?::(\d+))?", s)
    if s not in ("auto", "cpu") and m is None:
        raise UsageError(f"--device {spec!r}: expected {DEVICES}")
    if s == "cpu":
        return "cpu"
    if not torch.cuda.is_available():
        if s == "auto":
            return "cpu"
        built = f"built with CUDA {torch.version.cuda}" if torch.version.cuda else "built without CUDA"
        raise UsageError(f"--device {spec}: no CUDA device on this machine (torch {torch.__version__}, {built}); "
                         "use --device cpu or auto")
    n = torch.cuda.device_count()
    idx = int(m.group(1)) if m is not None and m.group(1) is not None else 0
    if idx >= n:
        raise UsageError(f"--device {spec}: this machine has {n} CUDA device(s) (cuda:0 to cuda:{n - 1})")
    return f"cuda:{idx}"


def _cpu_bf16_works() -> bool:
    import torch

    try:
        a = torch.ones(4, 4, dtype=torch.bfloat16, requires_grad=True)
        (a @ a).sum().backward()
        return bool(torch.isfinite(a.grad.float()).all())
    except (RuntimeError, TypeError):
        return False


def resolve_dtype(spec: str | None, device: str) -> str:
    """``auto`` (or None) = bfloat16 on a CUDA device that supports it, float32 otherwise."""
    import torch

    s = "auto" if spec is None else str(spec).strip().lower()
    if s != "auto" and s not in DTYPES:
        raise UsageError(f"--dtype {spec!r}: expected auto, float32 or bfloat16")
    cuda = device.startswith("cuda")
    if s == "auto":
        return "bfloat16" if cuda and torch.cuda.is_bf16_supported() else "float32"
    dtype = DTYPES[s]
    if dtype == "bfloat16":
        if cuda and not torch.cuda.is_bf16_supported():
            raise UsageError(f"--dtype bfloat16: {device} ({torch.cuda.get_device_name(int(device.split(':')[1]))}) "
                             "does not support bfloat16; use --dtype float32")
        if not cuda and not _cpu_bf16_works():
            raise UsageError("--dtype bfloat16: this CPU (or this torch build) cannot train in bfloat16; use "
                             "--dtype float32")
    return dtype


def resolve(device: str | None = None, dtype: str | None = None) -> Placement:
    d = resolve_device(device)
    return Placement(d, resolve_dtype(dtype, d))
