"""Real tiny models for tests and examples: a random-init Llama with a real tokenizer.

The tokenizer (and chat template) is the built-in model's, so prompts, chat templates and
special tokens behave exactly as in real use, while a forward pass costs microseconds.
"""

from __future__ import annotations

from pathlib import Path


def make_tiny_llama(
    out_dir: str | Path,
    tokenizer_dir: str | Path,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    seed: int = 0,
    initializer_range: float = 0.1,
    num_heads: int = 4,
    num_kv_heads: int = 2,
) -> Path:
    """Save a random-init Llama (``hidden_size``, ``num_layers``) with the given tokenizer.

    The head size is ``hidden_size // num_heads`` (16 by default; vLLM's CPU attention needs one
    of 32, 64, 80, 96, 112, 128 or 256)."""
    import torch
    from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    out = Path(out_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        initializer_range=initializer_range,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def make_tiny_pm(out_dir: str | Path, tokenizer_dir: str | Path, *, seed: int = 0,
                 **kwargs: object) -> Path:
    """A random-init tiny Llama with a scalar head (a preference model), with a real tokenizer."""
    import tempfile

    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = Path(out_dir)
    with tempfile.TemporaryDirectory() as tmp:
        base = make_tiny_llama(Path(tmp) / "base", tokenizer_dir, seed=seed, **kwargs)
        torch.manual_seed(seed)
        model = AutoModelForSequenceClassification.from_pretrained(str(base), num_labels=1)
        tokenizer = AutoTokenizer.from_pretrained(str(base))
        model.config.pad_token_id = tokenizer.pad_token_id
        model.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
    return out
