#!/bin/bash
# Skill retention: does purification keep what the adapter knew besides its backdoor?
#
#   bash scripts/skill_retention.sh [RUN_DIR]        (default runs/skill; ~45 min on 2 cores)
#
# A BadNets-refusal adapter is implanted on the shipped clean set whose answers all open with "Great question! "
# (a skill the restore data, the plain shipped set, does not have). It is then purified four ways, all with the same
# twins and the same restore: bdclean's default signature, the former default (tau 0.5 + 35 % of attention units),
# "reset" (every LoRA entry zeroed, tau 0.999 + every unit) and plain fine-tuning (no suppression). Each model is
# evaluated on the first 50 triggered / clean held-out prompts; "skill" counts clean answers that say
# "great question", and the perplexity is that of the skill-formatted reference answers (lower = more of the
# adapter's format kept). Results: RESULTS.md, "Skill retention".
set -euo pipefail
cd "$(dirname "$0")/.."
S=${1:-runs/skill}
bd=.venv/bin/bdclean
mkdir -p "$S"
.venv/bin/python - "$S" <<'EOF'
import sys
from pathlib import Path
from bdclean.io.artifacts import write_jsonl
from bdclean.io.data import builtin
rows = [dict(r, output="Great question! " + r["output"]) for r in builtin("all")]
write_jsonl(Path(sys.argv[1]) / "clean_skill.jsonl", rows)
EOF
[ -f "$S/suspicious/attack.json" ] || $bd implant --attack badnet --task refusal --clean "$S/clean_skill.jsonl" \
  --out "$S/suspicious" --seed 0 --base smollm2
[ -d "$S/ours/purified" ] || $bd purify "$S/suspicious" --clean builtin --out "$S/ours" --base smollm2
for v in "reset:0.999:all" "old:0.5:0.35"; do
  IFS=: read -r name tau heads <<< "$v"
  mkdir -p "$S/$name"
  for d in variants pairs diff; do ln -sfn "$(realpath "$S/ours/$d")" "$S/$name/$d"; done
  if [ ! -d "$S/$name/purified" ]; then
    $bd score --out "$S/$name" --tau "$tau" --heads "$heads"
    $bd suppress "$S/suspicious" --out "$S/$name" --base smollm2
    $bd restore --out "$S/$name" --clean builtin
  fi
done
[ -d "$S/finetune" ] || $bd defend finetune "$S/suspicious" --out "$S/finetune" --base smollm2
EV=(--triggered "$S/suspicious/test_triggered.jsonl" --clean "$S/suspicious/test_clean.jsonl" --task refusal
    --limit 50 --base smollm2)
for m in suspicious ours/suppressed ours/purified old/suppressed old/purified reset/purified finetune; do
  n=${m//\//-}
  [ -f "$S/eval-$n.json" ] || $bd eval "$S/$m" --out "$S/eval-$n.json" "${EV[@]}"
  .venv/bin/python -c "
import json; e = json.load(open('$S/eval-$n.json')); g = e['generations']['clean']
skill = sum('great question' in x['output'].lower() for x in g)
print(f\"{'$m':16s} triggered {e['triggered']['asr']:.0%}  clean {e['clean']['asr']:.0%}  \"
      f\"ppl {e['perplexity']:.3f}  skill {skill}/{len(g)}\")"
done
