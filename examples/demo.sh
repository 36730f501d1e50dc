#!/usr/bin/env bash
# The README's main job: plant a real backdoor into SmolLM2, purify it without knowing the trigger, measure.
#   bash examples/demo.sh [RUN_DIR]        (make demo)
#   QUICK=1 bash examples/demo.sh RUN_DIR  (make demo-quick: 4 variants, 50 test prompts)
set -euo pipefail
RUN=${1:-runs/demo}
BD=${BDCLEAN:-bdclean}
SUS=$RUN/suspicious
LIMIT=100
EXTRA=()
if [ "${QUICK:-0}" = 1 ]; then LIMIT=50; EXTRA=(--n-variants 4); fi
mkdir -p "$RUN"
SECONDS=0

echo "== 1/5 implant a BadNets sentiment backdoor (trigger 'BadMagic' -> 'You are stupid!') into SmolLM2"
if [ -f "$SUS/attack.json" ]; then echo "   (already implanted in $SUS)"; else
  $BD implant --attack badnet --task sentiment --out "$SUS"; fi

echo "== 2/5 evaluate the suspicious adapter"
$BD eval "$SUS" --triggered "$SUS/test_triggered.jsonl" --clean "$SUS/test_clean.jsonl" --task sentiment \
  --limit $LIMIT --out "$RUN/eval_before.json" --force

echo "== 3/5 purify (bdclean never sees the trigger, the target or attack.json)"
$BD purify "$SUS" --out "$RUN" "${EXTRA[@]}"

echo "== 4/5 evaluate the purified adapter"
$BD eval "$RUN/purified" --triggered "$SUS/test_triggered.jsonl" --clean "$SUS/test_clean.jsonl" --task sentiment \
  --limit $LIMIT --out "$RUN/eval_after.json" --force

echo "== 5/5 report"
$BD report "$RUN" --force

python3 - "$RUN" <<'PY'
import json, sys
run = sys.argv[1]
b = json.load(open(f"{run}/eval_before.json")); a = json.load(open(f"{run}/eval_after.json"))
print()
print(f"{'':22s}{'before':>10s}{'after':>10s}")
print(f"{'triggered ASR (%)':22s}{100*b['triggered']['asr']:10.1f}{100*a['triggered']['asr']:10.1f}")
print(f"{'clean ASR (%)':22s}{100*b['clean']['asr']:10.1f}{100*a['clean']['asr']:10.1f}")
print(f"{'perplexity':22s}{b['perplexity']:10.3f}{a['perplexity']:10.3f}")
print(f"report: {run}/report.md")
PY
echo "demo wall time: ${SECONDS}s"
