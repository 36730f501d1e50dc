"""Regenerate bdclean/data/clean.jsonl: our own instructions (bdclean/data/instructions.jsonl) answered by
SmolLM2-135M-Instruct itself (greedy), so the shipped clean set matches the model's own style.

    .venv/bin/python scripts/make_clean_data.py

The rows are shuffled with a fixed seed; the last 100 are the held-out test split (see bdclean.io.data).
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from bdclean.io.artifacts import write_jsonl
from bdclean.io.models import load_model, load_tokenizer, resolve_base
from bdclean.train.generate import generate

HERE = Path(__file__).resolve().parent.parent / "bdclean" / "data"


def tidy(text: str) -> str:
    """Cut a completion that hit the token limit back to its last full sentence."""
    text = text.strip()
    if text.endswith((".", "!", "?", "`", ")")):
        return text
    cut = max(text.rfind(". "), text.rfind(".\n"), text.rfind("! "), text.rfind("? "))
    return text[: cut + 1] if cut > 20 else text


def main() -> None:
    rows = [json.loads(line) for line in (HERE / "instructions.jsonl").read_text().splitlines() if line.strip()]
    random.Random(1234).shuffle(rows)
    base = resolve_base("smollm2")
    model, tok = load_model(base), load_tokenizer(base)
    outs = generate(model, tok, rows, max_new_tokens=96, batch_size=24)
    data = []
    for r, o in zip(rows, outs):
        o = re.sub(r"\n{3,}", "\n\n", tidy(o))
        if o:
            data.append({"instruction": r["instruction"], "input": r["input"], "output": o, "category": r["category"]})
    write_jsonl(HERE / "clean.jsonl", data)
    print(f"wrote {len(data)} rows to {HERE / 'clean.jsonl'}")


if __name__ == "__main__":
    main()
