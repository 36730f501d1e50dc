"""Prompts in the model's own chat template; loss on response tokens only."""

from __future__ import annotations

from dataclasses import dataclass


def user_text(row: dict) -> str:
    """The user turn: the instruction, then the optional ``input`` field on its own paragraph."""
    inp = (row.get("input") or "").strip()
    return f"{row['instruction'].strip()}\n\n{inp}" if inp else row["instruction"].strip()


def prompt_ids(tok, row: dict) -> list[int]:
    msgs = [{"role": "user", "content": user_text(row)}]
    if getattr(tok, "chat_template", None):
        ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
        if hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return list(ids)
    return tok(f"User: {user_text(row)}\nAssistant: ", add_special_tokens=True)["input_ids"]


def response_ids(tok, text: str) -> list[int]:
    ids = tok(text, add_special_tokens=False)["input_ids"]
    return list(ids) + [tok.eos_token_id]


@dataclass
class Example:
    ids: list[int]
    n_prompt: int  # tokens before the response; loss is taken on ids[n_prompt:]


def encode(tok, row: dict, max_len: int, output: str | None = None) -> Example:
    """Prompt + response, cut to ``max_len`` tokens: the response is shortened first, then the prompt is cut
    from the left (the end of a prompt, where the chat template's assistant header lies, is always kept)."""
    p = prompt_ids(tok, row)
    r = response_ids(tok, row["output"] if output is None else output)
    min_resp = min(len(r), max(4, max_len // 4))
    if len(p) > max_len - min_resp:
        p = p[len(p) - (max_len - min_resp):]
    r = r[: max_len - len(p)]
    return Example(p + r, len(p))
