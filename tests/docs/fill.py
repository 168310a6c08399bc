"""Fill-ins for the code blocks of README.md and docs/*.md: what a reader brings (a model, a tokenizer, data), built
tiny and offline. Each page declares which it uses in an invisible block beside the block that needs it
(``<!-- invisible-code-block: python ... -->``); tests/docs/test_docs.py runs the pages' blocks in order."""

from __future__ import annotations

import torch

WORDS = "the movie was good bad great awful fine and plot actors music long short".split()


def tokenizer():
    from tests.tiny import bpe_tokenizer

    return bpe_tokenizer([" ".join(WORDS)] * 4, vocab_size=300)


def base_lm(seed: int = 0):
    """A randomly initialised 2-layer Llama (hidden 32) and its tokenizer: the pretrained model a reader loads."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    tok = tokenizer()
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
    )
    return LlamaForCausalLM(config), tok


def lora_config():
    from peft import LoraConfig

    return LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)


def peft_lm(seed: int = 0):
    """The base model with PEFT LoRA adapters (what ``model`` is in most blocks), and its tokenizer."""
    from peft import get_peft_model

    base, tok = base_lm(seed)
    return get_peft_model(base, lora_config()), tok


def texts(n: int = 8) -> list[str]:
    g = torch.Generator().manual_seed(0)
    return [" ".join(WORDS[i] for i in torch.randint(len(WORDS), (6,), generator=g).tolist()) for _ in range(n)]


def batches(tok, n: int = 4, size: int = 2) -> list[dict]:
    """``n`` batches of ``size`` rows as a DataLoader of a causal LM yields them (input_ids, attention_mask,
    labels)."""
    rows = texts(n * size)
    out = []
    for i in range(n):
        enc = tok(rows[i * size : (i + 1) * size], return_tensors="pt", padding=True)
        out.append({**enc, "labels": enc["input_ids"].clone()})
    return out


def dataset(tok, n: int = 8):
    """A tokenized ``datasets.Dataset`` (input_ids, attention_mask, labels) for a Trainer."""
    from datasets import Dataset

    enc = tok(texts(n), padding="max_length", max_length=8, truncation=True)
    return Dataset.from_dict({**enc, "labels": enc["input_ids"]})


def text_dataset(n: int = 8):
    """A ``datasets.Dataset`` with a ``text`` column, as TRL's SFTTrainer takes it."""
    from datasets import Dataset

    return Dataset.from_dict({"text": texts(n)})
