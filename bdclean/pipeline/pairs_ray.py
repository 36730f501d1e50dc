"""train-pairs on a Ray cluster (``--executor ray``): one Ray task per twin.

No shared filesystem is assumed. The driver puts every input once into the object store, by value: the base
model's files, the suspicious adapter's, the trusted tokenizer's (when not the base's), the variants' data files
and the job context. A task materialises them in a temporary folder on its node, loads the model as the local
executor does (pairs_jobs._load, cached per worker process for the next twin of the same run), trains the twin with
the same function (pairs_jobs.fit_twin) and the same threads, and returns the twin's LoRA tensors as safetensors
bytes with its stats. The driver writes the weights and the twin's record atomically (pairs_jobs.write_twin), so a
run stopped anywhere resumes per twin exactly as with the local executor.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import time
from pathlib import Path

from bdclean import constants as C
from bdclean.console import log, progress
from bdclean.errors import BdcleanError, Terminated, UsageError
from bdclean.pipeline.pairs_jobs import WORKER_OVERHEAD_BYTES, JobContext, _longest_first, fit_twin, write_twin

RAY_MISSING = "--executor ray needs Ray: install it with pip install 'bdclean[ray]'"
CONNECT_TIMEOUT_S = 5.0  # an unreachable --ray-address fails after this, instead of ray.init's long retries
THREADS_PER_TWIN = 1  # as the local workers: one core per twin, and the same bits at any thread count
STEP_EVERY_S = 0.5  # how often a task reports its step to the driver's progress


def import_ray():
    """Ray, or one line saying how to install it (also when ``sys.modules['ray']`` is None)."""
    try:
        import ray
    except ImportError:
        raise UsageError(RAY_MISSING) from None
    return ray


def check_address(address: str) -> None:
    """An address that nothing answers on fails in seconds with one line (ray.init would retry for a minute)."""
    import socket

    if address in ("auto", "local"):
        return
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, sep, port = hostport.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise UsageError(f"--ray-address {address!r}: expected HOST:PORT of the cluster's head (e.g. 10.0.0.5:6379) "
                         "or 'auto'")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as e:
        raise UsageError(f"--ray-address {address}: no Ray cluster reachable there ({e.strerror or e}); start one "
                         "with `ray start --head`, or drop --ray-address to start a local one") from None


def preflight(address: str | None) -> None:
    """What --executor ray needs before anything is written: Ray importable, the cluster's address answering."""
    import_ray()
    if address is not None:
        check_address(address)


# ------------------------------------------------------------------ inputs by value

def _file_array(path: Path):
    """A file's bytes as a uint8 array (memory-mapped: ray.put copies it into the object store without reading
    it into this process first; a task reads it from shared memory without a copy)."""
    import numpy as np

    if path.stat().st_size == 0:
        return np.zeros(0, dtype=np.uint8)
    return np.asarray(np.memmap(path, dtype=np.uint8, mode="r"))


def _bundle(folder: Path, names: list[str] | None = None) -> dict:
    """{file name: bytes} of the named files of ``folder`` that exist (every top-level file when ``names`` is None)."""
    folder = Path(folder)
    paths = [folder / n for n in dict.fromkeys(names)] if names is not None else sorted(folder.iterdir())
    return {p.name: _file_array(p) for p in paths if p.is_file() and not p.name.startswith(".")}


def _model_files(model_dir: Path) -> list[str]:
    from bdclean.io.models import model_weight_files

    return [C.MODEL_CONFIG, C.GENERATION_CONFIG, C.SAFETENSORS_INDEX, *C.TOKENIZER_FILES,
            *(f.name for f in model_weight_files(Path(model_dir)))]


def _materialise(bundle: dict, folder: Path) -> Path:
    folder.mkdir(parents=True)
    for name, data in bundle.items():
        with open(folder / Path(name).name, "wb") as f:
            f.write(memoryview(data))
    return folder


_CACHE: dict = {}  # per Ray worker process: the last run's loaded model, for its next twin


def _twin_task(ctx: JobContext, base: dict, adapter: dict | None, tokenizer: dict | None, data: dict, i: int,
               twin: str, steps) -> dict:
    """One twin, run in a Ray worker: nothing read from the driver's paths, nothing written but a temporary
    folder. Returns its LoRA tensors (safetensors bytes) and stats."""
    import tempfile

    from safetensors.torch import save

    from bdclean.console import quiet_library_warnings
    from bdclean.pipeline.pairs_jobs import _load, torch_threads
    from bdclean.train.device import in_ray_task
    from bdclean.train.loop import set_threads

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    quiet_library_warnings()
    set_threads(ctx.threads)
    steps.push.remote((i, twin, 0, None, None))
    with tempfile.TemporaryDirectory(prefix="bdclean-twin-") as tmp:
        root = Path(tmp)
        local = dataclasses.replace(ctx, vfolder=str(_materialise(data, root / "variants")), folder=str(root / "out"))
        if _CACHE.get("key") != ctx.fingerprint:
            _CACHE.clear()
            base_dir = _materialise(base, root / "base")
            loaded = dataclasses.replace(
                local, base_dir=str(base_dir), placement=in_ray_task(ctx.placement) if ctx.placement else None,
                adapter=str(_materialise(adapter, root / "adapter") if adapter is not None else base_dir),
                tokenizer=str(_materialise(tokenizer, root / "tokenizer") if tokenizer is not None else base_dir))
            _CACHE.update(key=ctx.fingerprint, loaded=_load(loaded))  # in memory: the folder can go
        model, tok, init = _CACHE["loaded"]
        last = [0.0]

        def on_step(k, tot, loss):
            if k == tot or time.time() - last[0] >= STEP_EVERY_S:
                last[0] = time.time()
                steps.push.remote((i, twin, k, tot, loss))  # not awaited: progress never slows training

        seconds, stats, state = fit_twin(local, model, tok, init, i, twin, on_step)
    weights = save({k: v.detach().contiguous().cpu() for k, v in state.items()})
    return {"i": i, "twin": twin, "seconds": seconds, "stats": stats, "threads": torch_threads(), "weights": weights}


def _steps_actor(ray):
    """A small actor the tasks send their step counts to (needs no CPU)."""

    class Steps:
        def __init__(self):
            self.msgs: list = []

        def push(self, msg) -> None:
            self.msgs.append(msg)

        def drain(self) -> list:
            msgs, self.msgs = self.msgs, []
            return msgs

    return ray.remote(num_cpus=0, max_restarts=0)(Steps).remote()


# ------------------------------------------------------------------ driver

@contextlib.contextmanager
def _quiet_ray(ray):
    """Ray's own messages off the terminal: its raylet's notes on dead workers go to stdout (bdclean reports the
    failure itself, in one line); BDCLEAN_DEBUG=1 keeps them."""
    try:
        import ray._private.worker as rw
    except ImportError:  # pragma: no cover - another Ray layout
        yield
        return
    orig = getattr(rw, "print_to_stdstream", None)
    if orig is None or os.environ.get("BDCLEAN_DEBUG"):
        yield
        return
    rw.print_to_stdstream = lambda *a, **k: None
    try:
        yield
    finally:
        rw.print_to_stdstream = orig


def _connect(ray, address: str | None) -> bool:
    """Join ``address`` or start a local cluster on this machine's cores; False when Ray was already initialised
    by the caller (then it is left running). ray.init's own SIGTERM handler is replaced by the CLI's again."""
    import signal
    import threading

    from bdclean.train.loop import cpu_count

    if ray.is_initialized():
        return False
    if address is not None:
        check_address(address)
    main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM) if main else None
    kw = dict(log_to_driver=False, logging_level=logging.ERROR, configure_logging=True)
    try:
        if address is None:
            log(f"train-pairs: starting a local Ray cluster ({cpu_count()} CPUs)")
            # "local": a new cluster even when RAY_ADDRESS or a `ray start` cluster of this machine is around
            ray.init(address="local", num_cpus=cpu_count(), include_dashboard=False, **kw)
        else:
            ray.init(address=address, **kw)
    except (ConnectionError, RuntimeError, ValueError, TimeoutError) as e:
        with contextlib.suppress(Exception):
            ray.shutdown()
        why = str(e).splitlines()[0][:300] if str(e) else type(e).__name__
        if address is not None and os.environ.get("RAY_AUTH_MODE", "").lower() != "token":
            # Ray sends its token only to a cluster it found itself, never to an address it was given
            why += ("; if the cluster uses token authentication (Ray's default for `ray start`), set "
                    "RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (or ~/.ray/auth_token)")
        raise BdcleanError(f"train-pairs: cannot start Ray on {address or 'a local cluster'}: {why}") from None
    finally:
        if main and previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return True


@contextlib.contextmanager
def _keep_sigterm():
    """Ray's waits turn any exception a signal handler raises into a plain KeyboardInterrupt: note SIGTERM as it
    comes, and raise Terminated for it (exit 143, not 130)."""
    import signal
    import threading

    previous = signal.getsignal(signal.SIGTERM)
    if threading.current_thread() is not threading.main_thread() or not callable(previous):
        yield
        return
    seen = []

    def on_term(signum, frame):
        seen.append(signum)
        previous(signum, frame)

    signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    except KeyboardInterrupt as e:
        if seen and not isinstance(e, Terminated):
            raise Terminated() from None
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)


def num_gpus(ctx: JobContext) -> int:
    """GPUs a twin's task asks for: one on a CUDA placement (Ray then shows the task that GPU alone), else none."""
    return 1 if ctx.placement is not None and ctx.placement.cuda else 0


def _feasible(ray, num_cpus: int, memory: int, gpus: int = 0) -> int:
    """Twins the cluster can run at once; one clear line when no node can take a twin (Ray would wait forever)."""
    from bdclean.io.headers import gib

    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    fit = [n for n in nodes if n.get("CPU", 0) >= num_cpus and n.get("memory", 0) >= memory
           and n.get("GPU", 0) >= gpus]
    if not fit:
        raise UsageError(f"train-pairs: no node of the Ray cluster has {num_cpus} CPU"
                         f"{f', {gpus} GPU' if gpus else ''} and {gib(memory)} of memory free for a twin "
                         f"({len(nodes)} node(s) alive)")
    return sum(int(min(n["CPU"] // num_cpus, n["memory"] // memory, n["GPU"] // gpus if gpus else math.inf))
               for n in fit)


def _as_error(ray, e: BaseException, i: int, twin: str, kept: int) -> BaseException:
    """A failed task as one line. A BdcleanError raised in the task is itself (its message)."""
    ex = ray.exceptions
    tail = f"{kept} finished twin(s) are kept; rerun to resume"
    if isinstance(e, ex.RayTaskError):
        cause = getattr(e, "cause", None)
        if isinstance(cause, BdcleanError):
            return cause
        if isinstance(cause, MemoryError):
            return BdcleanError(f"train-pairs: variant {i} {twin} ran out of memory on its Ray node; {tail}")
        msg = str(cause).splitlines()[0][:300] if cause is not None and str(cause) else ""
        return BdcleanError(f"train-pairs: variant {i} {twin} failed on the Ray cluster "
                            f"({type(cause).__name__ if cause is not None else 'error'}{': ' + msg if msg else ''}); "
                            f"{tail}")
    lost = (ex.WorkerCrashedError, ex.NodeDiedError, ex.OutOfMemoryError, ex.ObjectLostError, ex.LocalRayletDiedError,
            ex.RayActorError)
    if isinstance(e, lost):
        return BdcleanError(f"train-pairs: the Ray worker training variant {i} {twin} died ({type(e).__name__}: "
                            f"out of memory, killed, or its node was lost); {tail}")
    return BdcleanError(f"train-pairs: Ray failed on variant {i} {twin} ({type(e).__name__}); {tail}")


def run_ray(ctx: JobContext, todo: list[tuple[int, str]], address: str | None) -> tuple[dict, int, int, dict]:
    """Train ``todo`` as Ray tasks. Returns (seconds per twin, twins at once, threads per twin, what to record)."""
    ray = import_ray()
    from safetensors.torch import load

    from bdclean.io.models import model_weight_files

    weight_bytes = sum(f.stat().st_size for f in model_weight_files(Path(ctx.base_dir)))
    memory = 2 * weight_bytes + WORKER_OVERHEAD_BYTES  # the model in float32 plus activations, as a local worker
    ctx = dataclasses.replace(ctx, threads=THREADS_PER_TWIN)
    times: dict[str, float] = {}
    with _quiet_ray(ray):
        started = _connect(ray, address)
        try:
            slots = min(len(todo), _feasible(ray, THREADS_PER_TWIN, memory, num_gpus(ctx)))
            info = {"address": address or "local", "ray": ray.__version__, "num_cpus": THREADS_PER_TWIN,
                    "num_gpus": num_gpus(ctx), "memory_bytes": memory,
                    "nodes": sum(1 for n in ray.nodes() if n.get("Alive")),
                    "cluster_cpus": ray.cluster_resources().get("CPU", 0)}
            base = _bundle(Path(ctx.base_dir), _model_files(Path(ctx.base_dir)))
            adapter = None if ctx.kind == "full" else _bundle(Path(ctx.adapter))
            tokenizer = None
            if Path(ctx.tokenizer or ctx.base_dir) != Path(ctx.base_dir):
                tokenizer = _bundle(Path(ctx.tokenizer), [*C.TOKENIZER_FILES, C.GENERATION_CONFIG, C.MODEL_CONFIG])
            vf = Path(ctx.vfolder)
            data = _bundle(vf, [C.VARIANT_DATA.format(i=i, kind=k) for i in sorted({i for i, _ in todo})
                                for k in ("clean", "poison")])
            refs = [ray.put(x) for x in (ctx, base, adapter, tokenizer, data)]
            del base, adapter, tokenizer, data
            log(f"train-pairs: {len(todo)} twins as Ray tasks, {slots} at once ({info['nodes']} node(s), "
                f"{THREADS_PER_TWIN} CPU each)")
            with _keep_sigterm():
                times = _drive(ray, load, refs, ctx, todo)
        finally:
            if started:
                with contextlib.suppress(Exception):
                    ray.shutdown()
    return times, slots, THREADS_PER_TWIN, info


def _drive(ray, load, refs: list, ctx: JobContext, todo: list[tuple[int, str]]) -> dict[str, float]:
    times: dict[str, float] = {}
    steps = _steps_actor(ray)
    task = ray.remote(num_cpus=THREADS_PER_TWIN, num_gpus=num_gpus(ctx), max_retries=0)(_twin_task)
    pending = {task.remote(*refs, i, twin, steps): (i, twin) for i, twin in _longest_first(todo)}
    with progress() as bar:
        overall = bar.add_task("train-pairs (all jobs, Ray)", total=len(todo))
        bars: dict[tuple[int, str], int] = {}
        finished: set[tuple[int, str]] = set()

        def drain(timeout: float = 1.0) -> None:
            try:
                msgs = ray.get(steps.drain.remote(), timeout=timeout)
            except ray.exceptions.GetTimeoutError:
                return
            for i, twin, k, tot, loss in msgs:
                if (i, twin) in finished:  # a step message can arrive after its twin's result
                    continue
                if (i, twin) not in bars:
                    bars[(i, twin)] = bar.add_task(f"  variant {i} {twin:5s} running", total=tot)
                if tot is not None:
                    bar.update(bars[(i, twin)], completed=k, total=tot,
                               description=f"  variant {i} {twin:5s} loss {loss:.3f}")

        try:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=len(pending), timeout=0.25)
                with contextlib.suppress(ray.exceptions.RayError):
                    drain()
                failure = None
                for ref in ready:
                    i, twin = pending.pop(ref)
                    try:
                        r = ray.get(ref)
                    except ray.exceptions.RayError as e:
                        failure = failure or (e, i, twin)
                        continue
                    write_twin(ctx, i, twin, load(r["weights"]), r["stats"], r["threads"])
                    times[f"{i}_{twin}"] = r["seconds"]
                    finished.add((i, twin))
                    bar.update(overall, advance=1)
                    if (i, twin) in bars:
                        bar.remove_task(bars.pop((i, twin)))
                if failure is not None:
                    e, i, twin = failure
                    raise _as_error(ray, e, i, twin, len(finished)) from None
        except BaseException:  # Ctrl-C, SIGTERM or a failed twin: stop the others now
            for ref in pending:
                with contextlib.suppress(Exception):
                    ray.cancel(ref, force=True)
            raise
        finally:
            with contextlib.suppress(Exception):
                ray.kill(steps)
    return dict(sorted(times.items()))
