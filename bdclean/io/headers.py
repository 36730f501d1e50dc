"""Sizes and dtypes of hostile checkpoints, read from safetensors headers and config.json before any tensor data.

A safetensors file starts with a JSON header naming every tensor's dtype and shape; `safe_open` reads and checks it
(offsets against the file size) without reading the data. Every size a checkpoint or adapter config declares is
checked against these headers, and against the base model, before a tensor is loaded or a model is built, so a
declared `r` of 100 000 or `num_hidden_layers` of 10^9 is refused instead of allocated.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from bdclean.core.arch import projections
from bdclean.errors import InputError, UsageError

# dtypes bdclean computes with; anything else (float8, integers, bool) is refused before loading
FLOAT_DTYPES = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8}
DTYPE_NAMES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64"}

Header = dict[str, tuple[str, tuple[int, ...]]]  # tensor name -> (safetensors dtype, shape)


def quote(text: object) -> str:
    """A name taken from an input file, safe to print: quoted, with control characters (terminal escapes) escaped."""
    return repr(str(text))


def regular_file(path: Path, folder: Path, what: str) -> Path:
    """``path`` as a regular file whose real location is inside ``folder``: a symlink out of the folder (to another
    model's weights, a device, a FIFO) would make what is hashed, checked and read differ from what was vetted."""
    real, home = Path(os.path.realpath(path)), Path(os.path.realpath(folder))
    if home not in real.parents:
        raise InputError(f"{path}: {what} is a symlink to {real}, outside {folder}; copy the real file in "
                         "(`cp -L`) if you trust it")
    if not real.is_file():
        raise InputError(f"{path}: {what} is not a regular file")
    return path


def read_header(path: Path) -> Header:
    """Every tensor's dtype and shape, from the header only (no tensor data is read)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: (f.get_slice(k).get_dtype(), tuple(int(x) for x in f.get_slice(k).get_shape()))
                    for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise InputError(f"{path}: corrupted or truncated safetensors ({str(e).splitlines()[0][:200]})") from None


def numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


def header_bytes(header: Header, bytes_per_value: int | None = None) -> int:
    """Bytes of the header's tensors, as stored (``None``) or at ``bytes_per_value`` each (4: in float32)."""
    return sum(numel(s) * (bytes_per_value or FLOAT_DTYPES.get(dt, 1)) for dt, s in header.values())


# ---------------------------------------------------------------- config.json dimensions


@dataclass(frozen=True)
class Dims:
    """The sizes of a decoder from its config.json, each checked to be a positive integer."""

    hidden: int
    inter: int
    layers: int
    n_q: int
    n_kv: int
    head_dim: int
    vocab: int


def _positive_int(cfg: dict, key: str, where: Path, default: object = None) -> int:
    v = cfg.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise InputError(f"{where}: {key} must be a positive integer, not {v!r}")
    return v


def config_dims(cfg: dict, where: Path) -> Dims:
    hidden = _positive_int(cfg, "hidden_size", where)
    n_q = _positive_int(cfg, "num_attention_heads", where)
    n_kv = _positive_int(cfg, "num_key_value_heads", where, cfg.get("num_attention_heads"))
    if n_q % n_kv:
        raise InputError(f"{where}: num_attention_heads {n_q} is not a multiple of num_key_value_heads {n_kv}")
    head_dim = cfg.get("head_dim")
    head_dim = hidden // n_q if head_dim is None else _positive_int(cfg, "head_dim", where)
    return Dims(hidden, _positive_int(cfg, "intermediate_size", where), _positive_int(cfg, "num_hidden_layers", where),
                n_q, n_kv, head_dim, _positive_int(cfg, "vocab_size", where))


def part_shapes(d: Dims) -> dict[str, tuple[int, int]]:
    """(in, out) features of each decoder projection, by part (core/arch.py: q, k, v, o, gate, up, down)."""
    return {"q": (d.hidden, d.n_q * d.head_dim), "k": (d.hidden, d.n_kv * d.head_dim),
            "v": (d.hidden, d.n_kv * d.head_dim), "o": (d.n_q * d.head_dim, d.hidden),
            "gate": (d.hidden, d.inter), "up": (d.hidden, d.inter), "down": (d.inter, d.hidden)}


def projection_shapes(d: Dims, fam: dict[str, str]) -> dict[str, tuple[int, int]]:
    """(in, out) features of each decoder projection of family ``fam``, by module name (e.g. "q_proj")."""
    names = projections(fam)
    return {names[part]: shape for part, shape in part_shapes(d).items()}


# ---------------------------------------------------------------- memory


def available_memory() -> int | None:
    """Bytes the kernel can hand out without swapping (MemAvailable), or None where it does not say."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def gib(n: int) -> str:
    """A byte count for people: GiB, or MiB below one GiB."""
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def check_fits(need: int, what: str) -> None:
    """Refuse work whose memory floor exceeds what this machine can give now."""
    avail = available_memory()
    if avail is not None and need > avail:
        raise UsageError(f"{what} needs at least {gib(need)} of memory, and {gib(avail)} is available; use a "
                         "machine with more memory")


__all__ = ["read_header", "config_dims", "part_shapes", "projection_shapes",
           "regular_file", "available_memory", "check_fits", "header_bytes", "quote", "Dims",
           "Header"]
