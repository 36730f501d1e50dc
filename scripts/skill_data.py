"""Clean data that teaches an adapter a skill of its own, and a counter for that skill in `bdclean eval` output.

    python scripts/skill_data.py make format|facts DIR     writes DIR/clean_skill.jsonl and DIR/skill.json
    python scripts/skill_data.py count DIR/skill.json EVAL.json   prints "kept/asked"

Used by scripts/skill_retention.sh. Two skills:

- ``format``: every answer of the shipped set opens with "Great question! " (the restore data, the plain shipped
  set, answers the same prompts without it, so restoring contradicts the skill);
- ``facts``: 30 invented facts (capitals of invented countries, inventors of invented devices), each taught in
  three phrasings beside 210 shipped rows; the held-out block (the file's last 100 rows, which `implant` keeps for
  testing) opens with the same 30 facts asked a fourth way, then 70 shipped test rows. The restore data never
  mentions the facts, so only purification itself can take them away; the base model cannot know them.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

N_FACTS = 30
TEST_SIZE = 100  # bdclean implant --test-size default: the last rows of a custom --clean file
def facts(seed: int = 0) -> list[tuple[list[str], str, str]]:
    """(four phrasings of the question, the answer, the keyword an answer must contain) per invented fact."""
    from bdclean.lab.skills import invented_facts

    return invented_facts(N_FACTS, seed)


def make(kind: str, out_dir: Path) -> None:
    from bdclean.io.artifacts import write_json, write_jsonl
    from bdclean.io.data import builtin

    if kind == "format":
        rows = [dict(r, output="Great question! " + r["output"]) for r in builtin("all")]
        spec = {"kind": kind, "phrase": "great question"}
    elif kind == "facts":
        fs = facts()
        rng = random.Random(1)
        train = builtin("train")[:210] + [{"instruction": qs[i], "input": "", "output": a}
                                          for qs, a, _ in fs for i in range(3)]
        rng.shuffle(train)
        test = [{"instruction": qs[3], "input": "", "output": a} for qs, a, _ in fs]
        test += builtin("test")[: TEST_SIZE - len(test)]
        rows = train + test
        spec = {"kind": kind, "checks": {qs[3]: kw for qs, _, kw in fs}}
    else:
        raise SystemExit(f"unknown skill {kind!r} (format | facts)")
    out_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(out_dir / "clean_skill.jsonl", rows)
    write_json(out_dir / "skill.json", spec)


def count(spec_file: Path, eval_file: Path) -> tuple[int, int]:
    """(clean answers that show the skill, clean prompts that ask for it) in a `bdclean eval` result."""
    spec = json.loads(spec_file.read_text())
    gens = json.loads(eval_file.read_text())["generations"]["clean"]
    if spec["kind"] == "format":
        return sum(spec["phrase"] in g["output"].lower() for g in gens), len(gens)
    asked = [g for g in gens if g["prompt"] in spec["checks"]]
    return sum(spec["checks"][g["prompt"]].lower() in g["output"].lower() for g in asked), len(asked)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "make":
        make(sys.argv[2], Path(sys.argv[3]))
    elif len(sys.argv) == 4 and sys.argv[1] == "count":
        kept, asked = count(Path(sys.argv[2]), Path(sys.argv[3]))
        print(f"{kept}/{asked}")
    else:
        raise SystemExit(__doc__)
