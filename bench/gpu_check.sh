#!/usr/bin/env bash
# The GPU check of issue 23: the demo's SmolLM2 BadNets backdoor purified on one CUDA GPU in bfloat16; writes the
# wall time of every stage, ASR and perplexity before/after, next to the CPU figures of
# bench/results/demo_summary.json, into gpu_check.json.
#   bash bench/gpu_check.sh [RUN_DIR]          (default runs/gpu_check; QUICK=1: 4 variants, 50 test prompts)
# The JSON goes to $OUT/gpu_check.json when $OUT is set (the device machine's return folder), else to
# bench/results/gpu/gpu_check.json. Needs a CUDA GPU and bdclean's dependencies: BDCLEAN=path/to/bdclean, else
# .venv/bin/bdclean, else `python3 -m bdclean` from this checkout if python3 has torch, transformers, peft and typer,
# else `make setup` (which needs the network). Use a fresh RUN_DIR for timings: a rerun skips finished stages.
# Never run on the project's CPU machine.
set -euo pipefail
export LC_ALL=C  # a decimal point in EPOCHREALTIME
cd "$(dirname "$0")/.."
RUN=${1:-runs/gpu_check}
DEST=${OUT:-bench/results/gpu}
DEVICE=${DEVICE:-cuda}
LIMIT=100
EXTRA=(--augment 0)  # the restore of the CPU demo it is compared with (demo_summary.json, before --augment 2)
if [ "${QUICK:-0}" = 1 ]; then LIMIT=50; EXTRA+=(--n-variants 4); fi
if [ -n "${BDCLEAN:-}" ]; then BD=("$BDCLEAN")
elif [ -x .venv/bin/bdclean ]; then BD=(.venv/bin/bdclean)
elif python3 -c 'import torch, transformers, peft, typer' 2>/dev/null; then
  BD=(python3 -m bdclean); export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
else make setup; BD=(.venv/bin/bdclean); fi
PY=$(dirname "$(command -v "${BD[0]}" || echo "${BD[0]}")")/python  # the venv's python beside its bdclean
[ "${BD[0]}" != python3 ] && [ -x "$PY" ] || PY=python3
SUS=$RUN/suspicious
mkdir -p "$RUN" "$DEST"
"$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 2)' 2>/dev/null \
  || { echo "gpu_check: torch sees no CUDA device (torch built for CUDA? a GPU visible?)" >&2; exit 2; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$RUN/gpu.txt" 2>/dev/null || true
export TOKENIZERS_PARALLELISM=false

t() {  # t NAME CMD...: run CMD, append "NAME seconds" to RUN/times.txt
  local name=$1 t0; shift
  t0=$EPOCHREALTIME
  "$@"
  awk -v n="$name" -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN { printf "%s %.2f\n", n, b - a }' >> "$RUN/times.txt"
}
: > "$RUN/times.txt"

echo "== 1/4 implant the demo's backdoor (BadNets sentiment) on $DEVICE in float32"
if [ -f "$SUS/attack.json" ]; then echo "   (already implanted in $SUS)"; else
  t implant "${BD[@]}" implant --attack badnet --task sentiment --out "$SUS" --device "$DEVICE" --dtype float32; fi

echo "== 2/4 evaluate the suspicious adapter on $DEVICE in bfloat16"
t eval_before "${BD[@]}" eval "$SUS" --triggered "$SUS/test_triggered.jsonl" --clean "$SUS/test_clean.jsonl" \
  --task sentiment --limit $LIMIT --out "$RUN/eval_before.json" --force --device "$DEVICE" --dtype bfloat16

echo "== 3/4 purify on $DEVICE in bfloat16"
t purify "${BD[@]}" purify "$SUS" --out "$RUN" "${EXTRA[@]}" --device "$DEVICE" --dtype bfloat16

echo "== 4/4 evaluate the purified adapter on $DEVICE in bfloat16"
t eval_after "${BD[@]}" eval "$RUN/purified" --triggered "$SUS/test_triggered.jsonl" --clean "$SUS/test_clean.jsonl" \
  --task sentiment --limit $LIMIT --out "$RUN/eval_after.json" --force --device "$DEVICE" --dtype bfloat16

"$PY" - "$RUN" "$DEST/gpu_check.json" "${QUICK:-0}" <<'PY'
import json, sys
from pathlib import Path

run, dest = Path(sys.argv[1]), Path(sys.argv[2])
times = {k: round(float(v), 2) for k, v in (ln.split() for ln in (run / "times.txt").read_text().splitlines())}
pur = json.loads((run / "purify.json").read_text())


def figures(e):
    return {"triggered_asr": e.get("triggered", {}).get("asr"), "clean_asr": e.get("clean", {}).get("asr"),
            "perplexity": e.get("perplexity"), "seconds": e.get("seconds"),
            "generation_s_per_100_prompts": e.get("generation_s_per_100_prompts")}


before, after = (json.loads((run / f"eval_{w}.json").read_text()) for w in ("before", "after"))
cpu = {}
ref = Path("bench/results/demo_summary.json")
if ref.is_file():
    s = json.loads(ref.read_text())
    cpu = {w: figures(s[f"eval_{w}"]) for w in ("before", "after") if f"eval_{w}" in s}
    cpu["note"] = "the demo on 2 CPU cores in float32 (bench/results/demo_summary.json)"
rec = {"gpu": (run / "gpu.txt").read_text().strip() if (run / "gpu.txt").is_file() else None,
       "placement": pur.get("placement"), "wall_s": times, "stage_seconds": pur["stage_seconds"],
       "purify_total_s": pur["total_seconds"], "before": figures(before), "after": figures(after),
       "eval_placement": after.get("placement"), "cpu_reference": cpu,
       "run": str(run), "limit_per_set": before.get("triggered", {}).get("n"),
       "quick": sys.argv[3] == "1"}  # QUICK=1: 4 variants, 50 prompts, not the CPU demo's settings
dest.write_text(json.dumps(rec, indent=2) + "\n")
print(json.dumps({k: rec[k] for k in ("stage_seconds", "before", "after")}, indent=2))
print(f"gpu_check: {dest}")
PY
