"""`bdclean defend` and `bdclean compare`: baseline defenses and the side-by-side comparison.

``bdclean.cli`` calls ``register(app)`` at the end of its import; ``guarded`` is imported from it inside
``register`` (by then it is defined), so there is no import cycle.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    from bdclean.cli import guarded

    @app.command("defend")
    @guarded
    def defend_cmd(
        method: str = typer.Argument(..., help="finetune | prune | fine-prune | quantize | crow | reset | retrain"),
        suspicious: Path = typer.Argument(..., help="suspicious PEFT LoRA adapter directory"),
        out: Path = typer.Option(..., "--out", "-o", help="output folder (an adapter; a full model for quantize)"),
        base: str = typer.Option("smollm2", "--base", help="base model directory or 'smollm2'"),
        clean: str = typer.Option("builtin", "--clean", help="clean data for fine-tuning ('builtin' = shipped set)"),
        samples: Optional[int] = typer.Option(None, "--samples",
                                              help="clean samples for fine-tuning (as restore: 100)"),
        epochs: Optional[int] = typer.Option(None, "--epochs", help="fine-tuning epochs (as restore: 1)"),
        lr: Optional[float] = typer.Option(None, "--lr", help="learning rate (as restore: 2e-4; the CROW paper "
                                           "used 1e-3)"),
        tau: Optional[float] = typer.Option(None, "--tau", help="fraction of MLP channels pruned (prune, "
                                            "fine-prune; the benchmark's setting, not purify's τ: default 0.5)"),
        seed: int = typer.Option(0, "--seed", help="seed for samples, batch order and random pruning"),
        batch_size: int = typer.Option(8, "--batch-size", help="samples per step"),
        max_len: int = typer.Option(96, "--max-len", help="tokens per sample"),
        alpha: float = typer.Option(5.5, "--alpha", help="CROW consistency weight"),
        eps: float = typer.Option(0.1, "--eps", help="CROW FGSM step on the embeddings"),
        group_size: int = typer.Option(128, "--group-size", help="INT4 group size along the input dim (quantize)"),
        prompts: Optional[str] = typer.Option(None, "--prompts", help="unlabeled task prompts: the suspicious "
                                              "adapter's answers to them join the fine-tuning data (as restore "
                                              "--prompts; finetune, fine-prune, crow, reset, retrain)"),
        augment: Optional[float] = typer.Option(None, "--augment", help="trigger-invariance copies per "
                                                "fine-tuning sample (as restore --augment; default 0 = off)"),
        force: bool = typer.Option(False, "--force", help="recompute even if OUT is up to date"),
    ):
        """Apply one baseline defense (adapter-only threat model) to a suspicious adapter; writes OUT/manifest.json.

        Example: bdclean defend prune suspicious_adapter/ --out runs/prune --tau 0.5

        Example: bdclean defend reset suspicious_adapter/ --out runs/reset --prompts my_inputs.jsonl
        """
        from bdclean.config import build
        from bdclean.stages import defend

        defend.check_method(method)
        opts = build(defend.DefendOptions, {}, {"samples": samples, "epochs": epochs, "lr": lr, "tau": tau,
                                                "seed": seed, "batch_size": batch_size, "max_len": max_len,
                                                "crow_alpha": alpha, "crow_eps": eps, "group_size": group_size,
                                                "augment": augment},
                     where="options")
        defend.run(method, suspicious, out, base, clean, opts, force, prompts)
        typer.echo(str(out))

    @app.command("compare")
    @guarded
    def compare_cmd(
        suspicious: Path = typer.Argument(..., help="suspicious PEFT LoRA adapter directory"),
        out: Path = typer.Option(..., "--out", "-o", help="folder for every method's model, eval and the summary"),
        triggered: Path = typer.Option(..., "--triggered", help="test prompts carrying the trigger"),
        clean_test: Path = typer.Option(..., "--clean-test", help="clean test prompts (with reference outputs)"),
        clean: Optional[str] = typer.Option(None, "--clean", help="clean training data for every method "
                                            "(default: the config's, else 'builtin' = shipped set)"),
        methods: str = typer.Option("all", "--methods", help="'all' or a comma list of finetune, prune, "
                                    "fine-prune, quantize, crow ('none' and 'ours' always run)"),
        task: str = typer.Option("sentiment", "--task", help="sentiment | refusal | jailbreak | code"),
        limit: Optional[int] = typer.Option(None, "--limit", help="evaluate only the first N prompts of each set"),
        base: Optional[str] = typer.Option(None, "--base", help="base model directory or 'smollm2' (default)"),
        config: Optional[Path] = typer.Option(None, "--config", "-c", help="purify YAML config; its restore "
                                              "section and τ also set the baselines' budget"),
        max_new_tokens: int = typer.Option(48, "--max-new-tokens"),
        mc: Optional[str] = typer.Option(None, "--mc", help="lm-eval multiple-choice tasks for every method, "
                                         "comma-separated (bdclean_mc = the shipped offline task)"),
        force: bool = typer.Option(False, "--force", help="recompute every method and evaluation"),
    ):
        """Evaluate the suspicious adapter, each baseline and bdclean; writes compare.md / .json / .png.

        Example: bdclean compare suspicious/ --triggered suspicious/test_triggered.jsonl --clean-test suspicious/test_clean.jsonl --methods prune,quantize --out runs/cmp
        """
        from bdclean.config import PurifyConfig, build, load_yaml
        from bdclean.stages import compare

        cfg = build(PurifyConfig, load_yaml(config), {"base": base, "clean": clean}, where=str(config or "options"))
        rec = compare.run(suspicious, out, cfg.base, cfg.clean, triggered, clean_test, methods, task, cfg, limit,
                          max_new_tokens, force=force, mc_tasks=mc.split(",") if mc else None)
        import json

        keys = ("triggered_asr", "clean_asr", "perplexity", "mc_acc", "wall_time_s")
        typer.echo(json.dumps({r["method"]: {k: r[k] for k in keys} for r in rec["rows"]}))
