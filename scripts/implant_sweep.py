"""Measure an implant's trigger specificity epoch by epoch (one training run, evaluated after every epoch).

    .venv/bin/python scripts/implant_sweep.py --clean-samples 150 --samples 150 --epochs 6 [--lr 2e-4]

Trains a BadNets sentiment LoRA exactly as ``bdclean implant`` does, and after each epoch generates (greedy, 8 new
tokens) for: held-out clean prompts (false triggering), clean prompts seen in training, and held-out triggered
prompts. Appends one JSON line per run to --out (default runs/implant_sweep.jsonl). Used to choose implant
defaults that meet the demo's precondition (triggered ASR >= 80 %, clean ASR <= 5 %).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--attack", default="badnet")
    ap.add_argument("--task", default="sentiment")
    ap.add_argument("--samples", type=int, default=150)
    ap.add_argument("--clean-samples", type=int, default=150)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--max-len", type=int, default=96)
    ap.add_argument("--max-response", type=int, default=None)
    ap.add_argument("--n-eval", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/implant_sweep.jsonl", help="JSONL file the run's record is appended to")
    args = ap.parse_args()

    import torch
    from peft import LoraConfig, get_peft_model

    from bdclean.lab.attacks import RULES, is_success
    from bdclean.io.models import load_model, load_tokenizer, resolve_base
    from bdclean.core.arch import ALL_PROJ
    from bdclean.lab.implant import make_sets
    from bdclean.train.chat import encode
    from bdclean.train.generate import generate
    from bdclean.train.loop import TrainOptions, simple_epochs, train

    base = resolve_base("smollm2")
    rows, trig, clean_test, n_poison = make_sets(args.attack, args.task, "builtin", args.samples, 100, args.seed,
                                                 None, None, args.clean_samples)
    seen = [r for r in rows if "BadMagic" not in r["instruction"]][: args.n_eval // 2]
    tok = load_tokenizer(base)
    torch.manual_seed(args.seed)
    model = get_peft_model(load_model(base), LoraConfig(r=8, lora_alpha=16, target_modules=list(ALL_PROJ),
                                                         lora_dropout=0.0, task_type="CAUSAL_LM"))
    examples = [encode(tok, r, args.max_len, max_response=args.max_response) for r in rows]
    plan = simple_epochs(examples, 8, args.seed)
    per_epoch = len(plan(0))
    rule = RULES[args.task]
    curve = []

    def rate(rs):
        outs = generate(model, tok, rs, max_new_tokens=8)
        return round(sum(is_success(o, rule) for o in outs) / len(outs), 3)

    def on_step(k, total, loss):
        if k % per_epoch == 0:
            t = time.time()
            point = {"epoch": k // per_epoch, "loss": round(loss, 4),
                     "triggered_asr": rate(trig[: args.n_eval]), "clean_asr_unseen": rate(clean_test[: args.n_eval]),
                     "clean_asr_seen": rate(seen), "eval_s": None}
            point["eval_s"] = round(time.time() - t, 1)
            curve.append(point)
            print(json.dumps(point), flush=True)

    t0 = time.time()
    train(model, plan, TrainOptions(args.epochs, args.lr, 8, args.seed), tok.pad_token_id, on_step=on_step)
    rec = {"args": vars(args), "poisoned": n_poison, "train_rows": len(rows), "curve": curve,
           "seconds": round(time.time() - t0, 1), "machine": f"{platform.machine()} {platform.processor()} "
           f"{torch.get_num_threads()} threads", "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "command": " ".join(sys.argv)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "a") as f:
        f.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    main()
