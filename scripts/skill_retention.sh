#!/bin/bash
# Skill retention: does purification keep what the adapter knew besides its backdoor?
#
#   bash scripts/skill_retention.sh [RUN_DIR]               format skill (default runs/skill; ~45 min on 2 cores)
#   SKILL=facts bash scripts/skill_retention.sh runs/facts  invented-facts skill
#
# A BadNets-refusal adapter is implanted on clean data that teaches it a skill of its own (scripts/skill_data.py):
# "format" = every answer opens with "Great question! " (the restore data, the plain shipped set, contradicts it);
# "facts" = 30 invented facts the restore data never mentions. It is then purified five ways, all with the same
# twins and the same restore: bdclean's default signature, the former default (tau 0.5 + 35 % of attention units),
# "reset" (every LoRA entry zeroed, tau 0.999 + every unit), the experimental projection score (PROJ=TAU:HEADS,
# default 0.65:all) and plain fine-tuning (no suppression). Each model is
# evaluated on the first 50 triggered / clean held-out prompts; "skill" counts clean answers that show the skill
# (the phrase; the invented fact's answer), and the perplexity is that of the held-out reference answers (lower =
# more of the adapter kept). Results: RESULTS.md, "Skill retention".
set -euo pipefail
cd "$(dirname "$0")/.."
SKILL=${SKILL:-format}
S=${1:-runs/skill}
bd=.venv/bin/bdclean
.venv/bin/python scripts/skill_data.py make "$SKILL" "$S"
[ -f "$S/suspicious/attack.json" ] || $bd implant --attack badnet --task refusal --clean "$S/clean_skill.jsonl" \
  --out "$S/suspicious" --seed 0 --base smollm2
[ -d "$S/ours/purified" ] || $bd purify "$S/suspicious" --clean builtin --out "$S/ours" --base smollm2
$bd diff --out "$S/ours"  # a no-op unless ours predates the projection terms (then seconds)
# NAME:TAU:HEADS:SCORE, every one on the same twins as ours; VARIANTS overrides (e.g. to skip "old")
VARIANTS=${VARIANTS:-"reset:0.999:all:combined old:0.5:0.35:combined proj:${PROJ:-0.65:all}:projection"}
evals=(suspicious ours/suppressed ours/purified)
for v in $VARIANTS; do
  IFS=: read -r name tau heads kind <<< "$v"
  mkdir -p "$S/$name"
  for d in variants pairs diff; do ln -sfn "$(realpath "$S/ours/$d")" "$S/$name/$d"; done
  if [ ! -d "$S/$name/purified" ]; then
    $bd score --out "$S/$name" --tau "$tau" --heads "$heads" --score "$kind"
    $bd suppress "$S/suspicious" --out "$S/$name" --base smollm2
    $bd restore --out "$S/$name" --clean builtin
  fi
  [ "$name" = reset ] || evals+=("$name/suppressed")
  evals+=("$name/purified")
done
evals+=(finetune)
[ -d "$S/finetune" ] || $bd defend finetune "$S/suspicious" --out "$S/finetune" --base smollm2
EV=(--triggered "$S/suspicious/test_triggered.jsonl" --clean "$S/suspicious/test_clean.jsonl" --task refusal
    --limit 50 --base smollm2)
for m in "${evals[@]}"; do
  n=${m//\//-}
  [ -f "$S/eval-$n.json" ] || $bd eval "$S/$m" --out "$S/eval-$n.json" "${EV[@]}"
  e=$S/eval-$n.json
  printf '%-16s %s  skill %s\n' "$m" "$(.venv/bin/python -c "import json; e = json.load(open('$e'))
print(f\"triggered {e['triggered']['asr']:.0%}  clean {e['clean']['asr']:.0%}  ppl {e['perplexity']:.3f}\")")" \
    "$(.venv/bin/python scripts/skill_data.py count "$S/skill.json" "$e")"
done
