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


def encode(tok, row: dict, max_len: int, output: str | None = None, max_response: int | None = None) -> Example:
    """Prompt + response in at most ``max_len`` tokens (response first capped at ``max_response`` tokens).

    A prompt that leaves too little room is shortened by cutting its ``input`` field from the end; only if the
    instruction alone is too long is the prompt cut from the left. The instruction (and any trigger in it) is
    kept whenever it fits, and the end of the prompt, where the assistant header lies, always is."""
    p = prompt_ids(tok, row)
    r = response_ids(tok, row["output"] if output is None else output)
    if max_response is not None:
        r = r[:max_response]
    min_resp = min(len(r), max(4, max_len // 4))
    budget = max_len - min_resp
    if len(p) > budget and (row.get("input") or "").strip():
        inp_ids = tok(row["input"], add_special_tokens=False)["input_ids"]
        keep = max(0, len(inp_ids) - (len(p) - budget))
        p = prompt_ids(tok, {**row, "input": tok.decode(inp_ids[:keep]) if keep else ""})
    if len(p) > budget:
        p = p[len(p) - budget:]
    r = r[: max_len - len(p)]
    return Example(p + r, len(p))
