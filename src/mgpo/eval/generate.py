"""Batched generation for decoder-only models (greedy by default) with the KV cache."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

__all__ = ["Completion", "chat_generate", "cut_at_stop", "format_chat_plain", "generate"]


class Completion(str):
    """A generated text (a ``str``) that also says whether generation ran into ``max_new_tokens``."""

    hit_max_new_tokens: bool = False
    """True when neither EOS nor a stop string ended it: the answer may be cut short."""

    @classmethod
    def of(cls, text: str, hit_max_new_tokens: bool) -> Completion:
        done = cls(text)
        done.hit_max_new_tokens = hit_max_new_tokens
        return done


def cut_at_stop(text: str, stop: Sequence[str] | None) -> str:
    """``text`` up to (not including) the earliest occurrence of any stop string."""
    if not stop:
        return text
    cut = len(text)
    for s in stop:
        if s:
            index = text.find(s)
            if index != -1:
                cut = min(cut, index)
    return text[:cut]


def generate(
    model,
    tokenizer,
    prompts: list[str],
    *,
    max_new_tokens: int = 256,
    batch_size: int = 8,
    stop: Sequence[str] | None = None,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    num_return_sequences: int = 1,
    add_special_tokens: bool = True,
    progress: bool = True,
) -> list[str]:
    """Complete every prompt; returns only the new text, cut before the first stop string, as
    :class:`Completion` strings whose ``hit_max_new_tokens`` says that ``max_new_tokens`` ended one.

    Prompts are sorted by length and batched with left padding (what decoder-only models need), then
    the outputs are put back in the original order. With ``num_return_sequences=k`` the result has
    ``k`` entries per prompt, consecutive (prompt 0's k samples first).
    The model is put in eval mode for the call (its previous mode is restored afterwards).
    """
    if isinstance(prompts, str):
        raise TypeError("generate expects a list of prompts, got a single string; wrap it in a list")
    prompts = list(prompts)
    if not prompts:
        return []
    if batch_size < 1 or max_new_tokens < 1 or num_return_sequences < 1:
        raise ValueError(
            f"batch_size, max_new_tokens and num_return_sequences must be >= 1, got {batch_size}, "
            f"{max_new_tokens}, {num_return_sequences}"
        )
    if do_sample and temperature <= 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature}; use do_sample=False for greedy")
    eos_id = tokenizer.eos_token_id
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id
    if pad_id is None:
        raise ValueError("the tokenizer has neither a pad_token nor an eos_token; set tokenizer.pad_token")
    stop = [s for s in (stop or []) if s]

    encoded = tokenizer(prompts, add_special_tokens=add_special_tokens)["input_ids"]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]), reverse=True)
    device = next(model.parameters()).device
    options = dict(
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        num_return_sequences=num_return_sequences,
        use_cache=True,
        pad_token_id=pad_id,
        eos_token_id=eos_id,
    )
    if do_sample:
        options.update(temperature=temperature, top_p=top_p)
    else:  # silence "temperature is set but do_sample=False" from the model's own generation config
        options.update(temperature=None, top_p=None, top_k=None)
    if stop:  # stop early inside generate; the text is cut below as well
        options.update(stop_strings=stop, tokenizer=tokenizer)

    results: list[list[str]] = [[] for _ in prompts]
    was_training = model.training
    model.eval()
    try:
        batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
        for batch in tqdm(batches, desc="generating", unit="batch", disable=not progress):
            width = max(len(encoded[i]) for i in batch)
            input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, i in enumerate(batch):  # left padding: the prompt ends where generation starts
                ids = encoded[i]
                if ids:
                    input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
                    attention_mask[row, width - len(ids) :] = 1
            with torch.inference_mode():
                output = model.generate(
                    input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), **options
                )
            new_tokens = output[:, width:].cpu()
            texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
            full = new_tokens.shape[1] >= max_new_tokens
            for row, i in enumerate(batch):
                for k in range(num_return_sequences):
                    n = row * num_return_sequences + k
                    text = cut_at_stop(texts[n], stop)
                    ended = (eos_id is not None and bool((new_tokens[n] == eos_id).any())) or text != texts[n]
                    results[i].append(Completion.of(text, full and not ended))
    finally:
        model.train(was_training)
    return [text for per_prompt in results for text in per_prompt]


def format_chat_plain(messages: list[dict]) -> str:
    """Fallback chat format: ``System:``/``User:``/``Assistant:`` lines, ending with ``Assistant:``."""
    lines = []
    for message in messages:
        if "role" not in message or "content" not in message:
            raise KeyError(f"chat message needs 'role' and 'content' keys, got {sorted(message)}")
        lines.append(f"{str(message['role']).capitalize()}: {message['content']}")
    return "\n".join(lines) + "\nAssistant:"


def chat_generate(model, tokenizer, messages_batch: list[list[dict]], **kwargs) -> list[str]:
    """Reply to each conversation (a list of ``{"role", "content"}`` dicts).

    Uses the tokenizer's chat template when it has one (with the generation prompt added), otherwise
    :func:`format_chat_plain` and stops at the next ``"\\nUser:"``. ``kwargs`` go to :func:`generate`.
    """
    if not messages_batch:
        return []
    if isinstance(messages_batch[0], dict):
        raise TypeError("chat_generate expects a list of conversations (lists of messages); wrap it in a list")
    if getattr(tokenizer, "chat_template", None):
        prompts = [
            tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            for messages in messages_batch
        ]
        kwargs.setdefault("add_special_tokens", False)  # the template already writes BOS etc.
    else:
        prompts = [format_chat_plain(messages) for messages in messages_batch]
        kwargs.setdefault("stop", ["\nUser:"])
    return generate(model, tokenizer, prompts, **kwargs)
