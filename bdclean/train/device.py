"""Where a stage trains or generates, and in which precision: ``--device auto|cpu|cuda[:N]`` and
``--dtype auto|float32|bfloat16`` resolved once, up front, with one-line errors (issue 23).

The command line resolves them once (cli/base.py ``placed``), before any work, and sets the placement of the
command's duration (``use``); the stages that train or generate load their models with ``load_placed`` and move
their batches to the model's device (train/loop.py, train/generate.py). Library calls outside a command keep the
CPU in float32. The CUDA branches are covered by CPU tests with a faked torch.cuda (tests/test_device.py), never
run on a GPU.

Fingerprint rule (``fingerprint_part``): CPU + float32 without gradient checkpointing is what every run made before
these options computed, so it adds nothing to a stage's fingerprint (its artifacts are byte-identical and existing
runs are not recomputed, as restore.augment 0). Any other placement gives other numbers (bf16 rounding, CUDA
kernels, checkpointing's unshared prefix), so it enters the fingerprint: the device *type* (cuda, not cuda:1:
which card runs a twin is an execution detail, like pairs.workers), the dtype and checkpointing. The full placement
(card name, CUDA version) is always recorded in the manifest's extra.

Precision: the base model is loaded in the dtype; PEFT keeps the LoRA parameters in float32 over a bfloat16 base
(its autocast_adapter_dtype), so the adapter's trainable weights and AdamW states are float32 master weights and
only the frozen base computes in bf16. A full-model restore in bfloat16 trains the bf16 weights themselves (no
float32 master copy): lossier, stated in SCALING.md.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass, replace

from bdclean.errors import UsageError

DEVICES = "auto, cpu, cuda or cuda:N"
DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16"}


@dataclass(frozen=True)
class Placement:
    device: str  # "cpu" or "cuda:N"
    dtype: str  # "float32" or "bfloat16"
    gradient_checkpointing: bool = False

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")

    def record(self) -> dict:
        """What a manifest records (every detail; what of it is a stage input is ``fingerprint_part``)."""
        import torch

        rec = {"device": self.device, "dtype": self.dtype, "gradient_checkpointing": self.gradient_checkpointing,
               "torch": torch.__version__}
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


def resolve(device: str | None = None, dtype: str | None = None, gradient_checkpointing: bool = False) -> Placement:
    d = resolve_device(device)
    return Placement(d, resolve_dtype(dtype, d), bool(gradient_checkpointing))


CPU = Placement("cpu", "float32")  # what bdclean computed before --device existed, and the library default
_CURRENT: list[Placement] = [CPU]


def current() -> Placement:
    """The placement of the running command (``use``); CPU in float32 outside one."""
    return _CURRENT[-1]


@contextlib.contextmanager
def use(p: Placement):
    _CURRENT.append(p)
    try:
        yield p
    finally:
        _CURRENT.pop()


def fingerprint_part(p: Placement) -> dict | None:
    """What of the placement is a stage input (module docstring): None for CPU + float32 without checkpointing."""
    if not p.cuda and p.dtype == "float32" and not p.gradient_checkpointing:
        return None
    return {"device": "cuda" if p.cuda else "cpu", "dtype": p.dtype,
            "gradient_checkpointing": p.gradient_checkpointing}


def in_ray_task(p: Placement) -> Placement:
    """A Ray task asked for one GPU sees it (alone, through CUDA_VISIBLE_DEVICES) as cuda:0."""
    return replace(p, device="cuda:0") if p.cuda else p


def load_placed(model_dir, placement: Placement | None = None):
    """``io.models.load_model`` in the placement's dtype, moved to its device, with gradient checkpointing enabled
    when asked (non-reentrant, and with input grads for a PEFT model over frozen embeddings). On CPU in float32 this
    is load_model itself."""
    from bdclean.io.models import load_model

    p = placement or current()
    model = load_model(model_dir, p.dtype)
    if p.device != "cpu":
        model = model.to(p.device)
    if p.gradient_checkpointing:
        kw = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers ≥ 5.24 (the old name is deprecated)
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kw)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)
        model.enable_input_require_grads()
    return model
