"""Training throughput: bdclean's loop vs a bare PyTorch forward/backward loop, same model, data, batch size.

    .venv/bin/python bench/speed.py [--samples 48] [--max-len 96]      (make bench-speed)

Both loops train a fresh LoRA (r 8, all seven projections) on SmolLM2 for one epoch over the same clean samples.
The bare loop is what a straightforward script does: HF forward with labels (logits at every position), samples in
random order, padded to the batch's longest. Figures (tokens/s counted over real, non-pad tokens) are appended to
bench/results/speed.json with the machine and command.

A second figure is train-pairs' job parallelism: as many copies of bdclean's loop as there are CPU cores, run
one after another with all cores each (``--workers 1``), against the same copies run at once in spawned processes
with one thread each (the default on a multi-core CPU); aggregate tokens/s from the first start to the last end.

A third, when Ray is installed (``--no-ray`` skips it): train-pairs' twins of 2 variants on the local executor
(``--workers`` = cores) and on a local Ray cluster (``--executor ray``), same adapter and variants: each stage's
wall time (the Ray one includes starting the cluster and shipping the inputs through its object store) and
whether the twins are bit-identical.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch
from machine import describe  # bench/machine.py: this script's folder is on sys.path


def lora_model(base_dir):
    from peft import LoraConfig, get_peft_model

    from bdclean.core.arch import ALL_PROJ
    from bdclean.io.models import load_model

    torch.manual_seed(0)
    cfg = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, task_type="CAUSAL_LM",
                     target_modules=list(ALL_PROJ))
    return get_peft_model(load_model(base_dir), cfg)


def bare_loop(model, examples, batch_size, pad_id, lr):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    order = list(range(len(examples)))
    random.Random(0).shuffle(order)
    model.train()
    tokens, t0 = 0, time.time()
    for k in range(0, len(order), batch_size):
        batch = [examples[i] for i in order[k:k + batch_size]]
        T = max(len(e.ids) for e in batch)
        ids = torch.full((len(batch), T), pad_id)
        labels = torch.full((len(batch), T), -100)
        mask = torch.zeros((len(batch), T), dtype=torch.long)
        for b, e in enumerate(batch):
            ids[b, :len(e.ids)] = torch.tensor(e.ids)
            labels[b, e.n_prompt:len(e.ids)] = torch.tensor(e.ids[e.n_prompt:])
            mask[b, :len(e.ids)] = 1
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        tokens += sum(len(e.ids) for e in batch)
    return tokens, time.time() - t0


def _copy_job(base_dir, examples, batch_size, threads, pad):
    """One training run of bdclean's loop in this process; (start, end, tokens) on the wall clock."""
    from bdclean.train.loop import TrainOptions, simple_epochs, train

    model = lora_model(base_dir)
    t0 = time.time()
    stats = train(model, simple_epochs(examples, batch_size, 0), TrainOptions(1, 2e-4, batch_size, 0,
                                                                             threads=threads), pad)
    return t0, time.time(), stats["tokens"]


def parallel_vs_serial(base_dir, examples, batch_size, pad, copies: int) -> dict:
    """``copies`` training runs: serially with every core, then at once on ``copies`` 1-thread processes."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    from bdclean.train.loop import cpu_count

    spans = [_copy_job(base_dir, examples, batch_size, cpu_count(), pad) for _ in range(copies)]
    serial_tokens, serial_s = sum(t for _, _, t in spans), sum(b - a for a, b, _ in spans)
    with ProcessPoolExecutor(copies, mp_context=mp.get_context("spawn")) as ex:
        spans = list(ex.map(_copy_job, [base_dir] * copies, [examples] * copies, [batch_size] * copies,
                            [1] * copies, [pad] * copies))
    par_tokens = sum(t for _, _, t in spans)
    par_s = max(b for _, b, _ in spans) - min(a for a, _, _ in spans)
    res = {"copies": copies,
           "serial": {"threads": cpu_count(), "tokens": serial_tokens, "seconds": round(serial_s, 2),
                      "tokens_per_s": round(serial_tokens / serial_s, 1)},
           "parallel": {"processes": copies, "threads_each": 1, "tokens": par_tokens, "seconds": round(par_s, 2),
                        "tokens_per_s": round(par_tokens / par_s, 1)}}
    res["speedup"] = round(res["parallel"]["tokens_per_s"] / res["serial"]["tokens_per_s"], 3)
    return res


def ray_vs_local(base_dir, samples: int, max_len: int, batch_size: int, cores: int) -> dict:
    """train-pairs on the local executor, then on a local Ray cluster: stage wall times, same twins or not."""
    import hashlib
    import shutil
    import subprocess
    import tempfile

    from bdclean.io.artifacts import read_json

    with tempfile.TemporaryDirectory(prefix="bench-ray-") as tmp:
        tmp = Path(tmp)
        lora_model(base_dir).save_pretrained(str(tmp / "adapter"))  # a fresh LoRA as the suspicious adapter
        cfg = tmp / "pairs.yaml"
        cfg.write_text(f"pairs:\n  epochs: 1\n  batch_size: {batch_size}\n  max_len: {max_len}\n")
        bd = [sys.executable, "-m", "bdclean"]
        subprocess.run(bd + ["make-variants", "--clean", "builtin", "--out", str(tmp / "local"), "-n", "2",
                             "--samples", str(samples)], check=True)
        shutil.copytree(tmp / "local" / "variants", tmp / "ray" / "variants")
        res: dict = {"twins": 4, "samples_per_variant": samples}
        for name, extra in (("local", ["--workers", str(cores)]), ("ray", ["--executor", "ray"])):
            subprocess.run(bd + ["train-pairs", str(tmp / "adapter"), "--base", str(base_dir), "--out",
                                 str(tmp / name), "--config", str(cfg), *extra], check=True)
            man = read_json(tmp / name / "pairs" / "manifest.json")
            res[name] = {"seconds": man["wall_time_s"], "workers": man["extra"]["workers"]}
        digests = {name: {f.name: hashlib.sha256(f.read_bytes()).hexdigest()
                          for f in sorted((tmp / name / "pairs").glob("*.safetensors"))} for name in ("local", "ray")}
    res["overhead_s"] = round(res["ray"]["seconds"] - res["local"]["seconds"], 2)
    res["bit_identical"] = digests["local"] == digests["ray"]
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=48, help="clean samples in the one training epoch")
    ap.add_argument("--max-len", type=int, default=96, help="token cap per sample")
    ap.add_argument("--batch-size", type=int, default=8, help="samples per optimizer step (both loops)")
    ap.add_argument("--base", default="smollm2", help="model directory or 'smollm2'")
    ap.add_argument("--no-ray", action="store_true", help="skip the Ray row (train-pairs on a local Ray cluster)")
    ap.add_argument("--ray-samples", type=int, default=16, help="clean samples per variant in the Ray row")
    ap.add_argument("--out", default="bench/results/speed.json", help="JSON file the figures are appended to")
    a = ap.parse_args()
    from bdclean.io.data import builtin
    from bdclean.io.models import load_tokenizer, resolve_base
    from bdclean.train.chat import encode
    from bdclean.train.loop import TrainOptions, set_threads, simple_epochs, train

    set_threads()
    base = resolve_base(a.base)
    tok = load_tokenizer(base)
    rows = builtin("train")[: a.samples]
    examples = [encode(tok, r, a.max_len) for r in rows]
    results = {}
    model = lora_model(base)
    tokens, secs = bare_loop(model, examples, a.batch_size, tok.pad_token_id, 2e-4)
    results["bare"] = {"tokens": tokens, "seconds": round(secs, 2), "tokens_per_s": round(tokens / secs, 1)}
    model = lora_model(base)
    stats = train(model, simple_epochs(examples, a.batch_size, 0), TrainOptions(1, 2e-4, a.batch_size, 0),
                  tok.pad_token_id)
    results["bdclean"] = {"tokens": stats["tokens"], "seconds": stats["seconds"],
                          "tokens_per_s": stats["tokens_per_s"]}
    results["speedup"] = round(results["bdclean"]["tokens_per_s"] / results["bare"]["tokens_per_s"], 3)
    from bdclean.train.loop import cpu_count

    if cpu_count() > 1:
        results["train_pairs_workers"] = parallel_vs_serial(base, examples, a.batch_size, tok.pad_token_id,
                                                             cpu_count())
    try:
        import ray  # noqa: F401
    except ImportError:
        ray = None
    if not a.no_ray and ray is not None:
        results["train_pairs_ray"] = ray_vs_local(base, a.ray_samples, a.max_len, a.batch_size, cpu_count())
    record = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv),
              "machine": {**describe(), "torch_threads": torch.get_num_threads()},
              "settings": vars(a), "results": results}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    hist = json.loads(out.read_text()) if out.is_file() else []
    hist.append(record)
    from bdclean.io.artifacts import write_json

    write_json(out, hist)  # temp file + rename: an interrupted run never truncates the history
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
