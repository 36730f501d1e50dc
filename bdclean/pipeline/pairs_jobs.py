"""Running train-pairs' jobs (one twin each): in this process, or in several worker processes at once.

On CPU a twin's training is a chain of small matrix products that two threads share poorly, so one 1-thread process
per core is faster than one process using every core, with bit-identical twins (measured: RESULTS.md, "Twins in
parallel processes"; `make bench-speed`). Each worker loads the model once and trains whole twins; a twin's
result depends only on its inputs, never on which worker ran it or in what order, so the same seed gives the same
artifacts.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from bdclean import constants as C
from bdclean.console import progress, quiet_library_warnings
from bdclean.errors import BdcleanError
from bdclean.io.headers import available_memory

# per worker: the model in float32 (≤ 2 × its weight files, stored in 16 or 32 bits) plus activations
WORKER_OVERHEAD_BYTES = 1 << 30
# auto mode trains models with smaller weight files in this process: a worker takes seconds to start (importing
# torch and transformers, loading the model), more than a twin of such a model takes to train
MIN_PARALLEL_WEIGHT_BYTES = 64 << 20


@dataclass(frozen=True)
class JobContext:
    """Everything a worker needs to train any twin (picklable)."""

    kind: str  # "adapter" | "full"
    adapter: str  # suspicious adapter dir or full model dir
    base_dir: str
    lora: dict  # LoRA config of the variants
    opts: dict  # PairsOptions fields
    vfolder: str
    folder: str
    fingerprint: str
    threads: int | None  # torch threads per twin; None = every core
    tokenizer: str = ""  # the folder whose tokenizer trains the twins: the base's, or a full checkpoint's trusted one
    placement: object = None  # train/device.py Placement of every twin; None = CPU in float32


def check_gpu_workers(opts, place) -> None:
    """On CUDA the local executor trains the twins one after another in this process on the one chosen GPU (a
    twin of a 7B model fills a GPU; several GPUs are the Ray executor's, one task per GPU): an explicit --workers
    above 1 is refused there, before anything is written."""
    from bdclean.errors import UsageError

    if place.cuda and opts.executor == "local" and opts.workers > 1:
        raise UsageError(f"--workers {opts.workers}: on {place.device} the local executor trains the twins in this "
                         "process, one after another; drop --workers, or use --executor ray for several GPUs")


def plan_workers(requested: int, n_jobs: int, model_dir: Path, dense: bool = False) -> tuple[int, int]:
    """(worker processes, threads per twin). ``requested`` 0 = auto: one per core, capped by the jobs and by
    the memory a worker needs, and 1 for models under MIN_PARALLEL_WEIGHT_BYTES; explicit counts are capped by
    the jobs only. ``dense``: the twins train the model's own weights, so a worker also holds their initial copy,
    gradients and two AdamW moments (≈ 4 × the weights more)."""
    from bdclean.io.models import model_weight_files
    from bdclean.train.loop import cpu_count

    cores = cpu_count()
    if requested > 0:
        workers = min(requested, n_jobs)
    else:
        weight_bytes = sum(f.stat().st_size for f in model_weight_files(Path(model_dir)))
        workers = min(cores, n_jobs) if weight_bytes >= MIN_PARALLEL_WEIGHT_BYTES else 1
        avail = available_memory()
        if avail is not None:
            per = (6 if dense else 2) * weight_bytes + WORKER_OVERHEAD_BYTES
            workers = min(workers, max(1, avail // per))
    return workers, max(1, cores // workers)


def dense_training(ctx: JobContext) -> bool:
    """Whether the twins fine-tune the checkpoint's decoder projection weights (--variant-training full)."""
    from bdclean.pipeline.pairs import dense_twins

    return dense_twins(ctx.lora)


def _projection_names(model) -> set[str]:
    """Parameter names of every decoder layer's MLP and attention projection weight (the units the signature
    scores), from the architecture's module-name templates."""
    from bdclean.core.arch import attn_module_names, mlp_module_names

    cfg = model.config
    L = int(cfg.num_hidden_layers)
    mods = [*mlp_module_names(cfg.model_type, L), *attn_module_names(cfg.model_type, L)]
    return {name + ".weight" for layer in mods for name in layer.values()}


def trainable_state(model) -> dict:
    """A copy of every trainable tensor: the LoRA entries, or the projection weights of a dense twin."""
    from bdclean.io.peft_io import adapter_state

    if hasattr(model, "peft_config"):
        return adapter_state(model)
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable(model, tensors: dict) -> None:
    """Set the trainable tensors back to ``tensors`` (a twin's initial state)."""
    import torch

    from bdclean.io.peft_io import load_state

    if hasattr(model, "peft_config"):
        load_state(model, tensors)
        return
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, t in tensors.items():
            params[n].copy_(t)


def _load(ctx: JobContext):
    """(model with its trainable part — a LoRA, or the projection weights of dense twins —, tokenizer, that part's
    initial state)."""
    import torch

    from bdclean.io.models import load_adapter, load_tokenizer
    from bdclean.io.peft_io import attach, lora_config_from_dict, new_lora
    from bdclean.train.device import CPU, load_placed

    def load_model(model_dir):
        return load_placed(model_dir, ctx.placement or CPU)

    # never a full checkpoint's own tokenizer files: its chat template could carry the trigger (io/tokenizers.py)
    tok = load_tokenizer(Path(ctx.tokenizer or ctx.base_dir))
    if ctx.kind == "adapter":
        model = attach(load_model(Path(ctx.base_dir)), load_adapter(Path(ctx.adapter)))
    elif dense_training(ctx):
        model = load_model(Path(ctx.base_dir))
        names = _projection_names(model)
        for n, p in model.named_parameters():
            p.requires_grad_(n in names)
        found = sum(1 for n, p in model.named_parameters() if p.requires_grad)
        if found != len(names):
            raise BdcleanError(f"internal error: {len(names)} projection weights expected, {found} found")
    else:
        torch.manual_seed(ctx.opts["seed"])  # the variants' shared initial LoRA state
        model = new_lora(load_model(Path(ctx.base_dir)), lora_config_from_dict(ctx.lora, Path(ctx.base_dir)))
    return model, tok, trainable_state(model)


def _train_twin(ctx: JobContext, model, tok, init, i: int, twin: str, on_step) -> tuple[float, dict]:
    """Train one twin from ``init``; write its weights and its record (atomically). Returns (seconds, stats)."""
    t0 = time.time()
    _, stats, state = fit_twin(ctx, model, tok, init, i, twin, on_step)
    write_twin(ctx, i, twin, state, stats, torch_threads())
    return round(time.time() - t0, 2), stats


def fit_twin(ctx: JobContext, model, tok, init, i: int, twin: str, on_step) -> tuple[float, dict, dict]:
    """Train one twin from ``init`` (nothing written). Returns (seconds, stats, its trained state)."""
    from bdclean.io.data import load_instructions
    from bdclean.train.chat import encode
    from bdclean.train.loop import TrainOptions, paired_epochs, train

    o, vf = ctx.opts, Path(ctx.vfolder)
    clean = [encode(tok, r, o["max_len"]) for r in load_instructions(vf / C.VARIANT_DATA.format(i=i, kind="clean"))]
    poison = None
    if twin == "bd":
        rows = load_instructions(vf / C.VARIANT_DATA.format(i=i, kind="poison"))
        poison = [encode(tok, r, o["max_len"]) for r in rows]
    load_trainable(model, init)
    for p in model.parameters():
        if p.requires_grad:
            p.grad = None
    plan = paired_epochs(clean, poison, o["batch_size"], o["seed"])
    t0 = time.time()
    lr = o["full_lr"] if dense_training(ctx) else o["lr"]
    stats = train(model, plan, TrainOptions(o["epochs"], lr, o["batch_size"], o["seed"], threads=ctx.threads),
                  tok.pad_token_id, on_step=on_step)
    return round(time.time() - t0, 2), stats, trainable_state(model)


def write_twin(ctx: JobContext, i: int, twin: str, state: dict, stats: dict, threads: int) -> None:
    """A twin's weights, then its record naming them (each atomic): the record is what marks the twin done."""
    from bdclean.io.artifacts import save_tensors, sha256_file, write_json

    w = Path(ctx.folder) / C.PAIR_WEIGHTS.format(i=i, twin=twin)
    save_tensors(w, state)
    write_json(Path(ctx.folder) / C.JOB_RECORD.format(i=i, twin=twin),
               {"fingerprint": ctx.fingerprint, "sha256": sha256_file(w), "threads": threads, **stats})


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def _longest_first(todo: list[tuple[int, str]]) -> list[tuple[int, str]]:
    # a backdoored twin trains on twice the samples of a clean one: start those first so the workers finish together
    return sorted(todo, key=lambda j: (j[1] != "bd", j[0]))


def run_inline(ctx: JobContext, todo: list[tuple[int, str]]) -> dict[str, float]:
    model, tok, init = _load(ctx)
    times: dict[str, float] = {}
    with progress() as bar:
        overall = bar.add_task("train-pairs (all jobs)", total=len(todo))
        for i, twin in todo:
            job = bar.add_task(f"  variant {i} {twin:5s}", total=None)

            def on_step(k, tot, loss, job=job, i=i, twin=twin):
                bar.update(job, completed=k, total=tot, description=f"  variant {i} {twin:5s} loss {loss:.3f}")

            times[f"{i}_{twin}"], _ = _train_twin(ctx, model, tok, init, i, twin, on_step)
            bar.update(overall, advance=1)
            bar.remove_task(job)
    return times


# ------------------------------------------------------------------ worker processes

_WORKER: dict = {}


def _exit_with_parent(parent: int, every_s: float = 1.0) -> None:
    """Exit this worker once its parent is gone (e.g. after `kill -9` of the main process): a worker re-parented
    to init would otherwise go on training and burning the cores. Polls the parent pid from a daemon thread."""
    import threading

    def watch() -> None:
        while True:
            if os.getppid() != parent:
                os._exit(1)
            time.sleep(every_s)

    threading.Thread(target=watch, name="bdclean-parent-watch", daemon=True).start()


def _worker_init(ctx: JobContext, queue) -> None:
    import signal

    _exit_with_parent(os.getppid())
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the parent stops a worker with terminate(): die at once
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    quiet_library_warnings()
    from bdclean.train.loop import set_threads

    set_threads(ctx.threads)
    model, tok, init = _load(ctx)
    _WORKER.update(ctx=ctx, model=model, tok=tok, init=init, queue=queue)


def _worker_job(i: int, twin: str) -> tuple[int, str, float]:
    w = _WORKER
    q = w["queue"]

    def on_step(k, tot, loss):
        q.put((i, twin, k, tot, loss))

    seconds, _ = _train_twin(w["ctx"], w["model"], w["tok"], w["init"], i, twin, on_step)
    return i, twin, seconds


def run_parallel(ctx: JobContext, todo: list[tuple[int, str]], workers: int) -> dict[str, float]:
    """Train the twins of ``todo`` on ``workers`` spawned processes (never forked: torch's thread pools do not
    survive a fork). Finished twins are on disk with their records, so an interrupted run resumes."""
    import multiprocessing as mp
    import queue as queue_mod
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool

    workers = min(workers, len(todo))
    mpctx = mp.get_context("spawn")
    q = mpctx.Queue()
    times: dict[str, float] = {}
    with progress() as bar:
        overall = bar.add_task("train-pairs (all jobs)", total=len(todo))
        bars: dict[tuple[int, str], int] = {}
        finished: set[tuple[int, str]] = set()

        def drain() -> None:
            while True:
                try:
                    i, twin, k, tot, loss = q.get_nowait()
                except queue_mod.Empty:
                    return
                if (i, twin) in finished:  # a step message can arrive after its twin's result
                    continue
                if (i, twin) not in bars:
                    bars[(i, twin)] = bar.add_task(f"  variant {i} {twin:5s}", total=tot)
                bar.update(bars[(i, twin)], completed=k, description=f"  variant {i} {twin:5s} loss {loss:.3f}")

        ex = ProcessPoolExecutor(workers, mp_context=mpctx, initializer=_worker_init, initargs=(ctx, q))
        try:
            pending = {ex.submit(_worker_job, i, twin) for i, twin in _longest_first(todo)}
            while pending:
                done, pending = wait(pending, timeout=0.25, return_when=FIRST_COMPLETED)
                drain()
                for f in done:
                    i, twin, seconds = f.result()
                    times[f"{i}_{twin}"] = seconds
                    finished.add((i, twin))
                    bar.update(overall, advance=1)
                    if (i, twin) in bars:
                        bar.remove_task(bars.pop((i, twin)))
        except BrokenProcessPool:
            raise BdcleanError("train-pairs: a worker process died (out of memory?); finished twins are kept — "
                               "rerun with fewer workers (--workers 1) to resume") from None
        except BaseException:  # Ctrl-C or a failed twin: stop the others now instead of after their current twin
            for proc in list(getattr(ex, "_processes", {}).values()):
                proc.terminate()
            raise
        finally:
            ex.shutdown(wait=True, cancel_futures=True)
            q.close()
    return dict(sorted(times.items()))
