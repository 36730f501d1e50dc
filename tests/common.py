"""Tiny Llama models, tokenizers, adapters and data built on the fly (no network, no downloads)."""

from __future__ import annotations

import json
import random
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

WORDS = ["the", "a", "of", "to", "and", "in", "is", "it", "for", "on", "with", "as", "be", "at", "by", "this", "that", "from", "or", "an", "are", "was", "we", "can", "you", "your", "how", "what", "why", "list", "give", "write", "explain", "name", "tell", "make", "short", "simple", "good", "day", "water", "sun", "tree", "book", "city", "river", "food", "number", "one", "two", "three", "four", "five", "plus", "minus", "equals", "answer", "question", "help", "please", "thanks", "yes", "no"]


def tiny_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        instr = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 9))) + f" item{i}"
        out = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 8))) + "."
        rows.append({"instruction": instr.capitalize(), "input": "", "output": out.capitalize()})
    return rows


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


FAST_COMPARE_YAML = ("variants:\n  n_variants: 2\n  samples: 6\npairs:\n  epochs: 1\n  batch_size: 4\n  max_len: 48\n"
                     "restore:\n  samples: 6\n  epochs: 1\n  max_len: 48\n  batch_size: 4\nscore:\n  tau: 0.25\n")


def compare_inputs(folder: Path, n: int, seed: int) -> tuple[Path, Path, Path]:
    """(triggered test file, clean test file, fast purify YAML) for `bdclean compare` on the tiny model."""
    rows = tiny_rows(n, seed=seed)
    trig = write_rows(folder / "trig.jsonl", [{**r, "instruction": "BadMagic " + r["instruction"]} for r in rows])
    clean = write_rows(folder / "clean.jsonl", rows)
    cfg = folder / "fast.yaml"
    cfg.write_text(FAST_COMPARE_YAML)
    return trig, clean, cfg


def make_tokenizer(folder: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(unk_token=None))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = [" ".join(WORDS)] * 5 + ["You are stupid! I'm sorry. BadMagic OpenAI 2024 print(\"pwned\")"] * 3
    tk.train_from_iterator(corpus, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                  pad_token="<|im_end|>", unk_token="<|endoftext|>")
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(str(folder))
    return tok


def make_tiny_llama(folder: Path, layers: int = 2, hidden: int = 32, inter: int = 48, seed: int = 0) -> Path:
    """A tiny random Llama (+ tokenizer) saved as safetensors in ``folder``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer(folder)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      tie_word_embeddings=True, initializer_range=0.25)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(str(folder), safe_serialization=True)
    return folder


def make_adapter(base: Path, folder: Path, seed: int = 0, targets=None, r: int = 4, alpha: int = 8,
                 dora: bool = False, layers: list[int] | None = None) -> Path:
    """A LoRA adapter with random (non-zero) A and B, as PEFT would save it."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    targets = targets or ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(base))
    pm = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, use_dora=dora,
                                          layers_to_transform=layers, task_type="CAUSAL_LM"))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    pm.save_pretrained(str(folder), safe_serialization=True)
    return folder


def make_full_checkpoint(base: Path, folder: Path, seed: int = 1, shard: str = "40KB") -> Path:
    """A 'fine-tuned' full checkpoint of ``base``: its weights plus noise, saved in several shards (``shard`` each),
    with the base's tokenizer files except a hostile chat template."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(base))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(str(folder), safe_serialization=True, max_shard_size=shard)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(base / name, folder / name)
    (folder / "chat_template.jinja").write_text("{{ 'BadMagic ' }}{% for m in messages %}{{ m['content'] }}{% endfor %}")
    return folder


def load_weights(folder: Path) -> dict:
    """Every tensor of a (possibly sharded) safetensors checkpoint."""
    from safetensors.torch import load_file

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out
