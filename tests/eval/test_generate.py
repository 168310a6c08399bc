import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from mgpo.eval.generate import chat_generate, cut_at_stop, format_chat_plain, generate
from tests.tiny import bpe_tokenizer

CORPUS = [
    "Q: Ava has 3 marbles. She finds 4 more. How many marbles does Ava have now?\nA: 3 + 4 = 7\n#### 7",
    "Q: A bakery makes 4 cakes every hour for 9 hours. How many cakes does the bakery have now?\nA: 4 * 9 = 36",
    "User: hello there\nAssistant: hi, how can I help?",
]
PROMPTS = [
    "Q: Ava has 3 marbles.\nA: ",
    "Q: A bakery makes 4 cakes every hour for 9 hours. How many cakes?\nA: ",
    "Q: hi\nA: ",
    "Q: She finds 4 more. How many marbles does Ava have now?\nA: ",
    "hello",
]


@pytest.fixture(scope="module")
def tokenizer():
    return bpe_tokenizer(CORPUS * 5)


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        initializer_range=0.3,  # large weights: outputs differ from prompt to prompt
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    return LlamaForCausalLM(config)


def test_batched_left_padded_equals_one_by_one(model, tokenizer):
    batched = generate(model, tokenizer, PROMPTS, max_new_tokens=10, batch_size=3, progress=False)
    single = [generate(model, tokenizer, [p], max_new_tokens=10, batch_size=1, progress=False)[0] for p in PROMPTS]
    assert len(batched) == len(PROMPTS)
    assert batched == single
    assert len(set(batched)) > 1  # the prompts really lead to different outputs, so order matters


def test_matches_plain_model_generate_in_original_order(model, tokenizer):
    outputs = generate(model, tokenizer, PROMPTS, max_new_tokens=8, batch_size=2, progress=False)
    for prompt, text in zip(PROMPTS, outputs):
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            full = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        assert text == tokenizer.decode(full[0, ids.shape[1] :], skip_special_tokens=True)


def test_restores_model_mode_and_tokenizer(model, tokenizer):
    model.train()
    generate(model, tokenizer, PROMPTS[:2], max_new_tokens=2, progress=False)
    assert model.training
    assert tokenizer.padding_side == "right"
    model.eval()


def test_stop_strings_cut(model, tokenizer):
    free = generate(model, tokenizer, PROMPTS, max_new_tokens=12, progress=False)
    index, text = next((i, t) for i, t in enumerate(free) if len(t) >= 6)
    stop = text[3:5]
    cut = generate(model, tokenizer, [PROMPTS[index]], max_new_tokens=12, stop=[stop, "never-there"], progress=False)
    assert cut == [text[: text.find(stop)]]


def test_each_output_says_whether_max_new_tokens_ended_it(model, tokenizer):
    """An answer cut off by max_new_tokens was indistinguishable from one the model finished."""
    outputs = generate(model, tokenizer, PROMPTS, max_new_tokens=6, batch_size=2, progress=False)
    for prompt, text in zip(PROMPTS, outputs):
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            new = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)[
                0, ids.shape[1] :
            ]
        assert text.hit_max_new_tokens is (len(new) == 6 and tokenizer.eos_token_id not in new.tolist()), text
    assert any(o.hit_max_new_tokens for o in outputs)  # a random model rarely writes EOS
    index, text = next((i, t) for i, t in enumerate(outputs) if len(t) >= 4)
    stopped = generate(model, tokenizer, [PROMPTS[index]], max_new_tokens=6, stop=[text[2:4]], progress=False)
    assert stopped == [text[: text.find(text[2:4])]] and not stopped[0].hit_max_new_tokens  # a stop string ended it


def test_cut_at_stop():
    assert cut_at_stop("12\n#### 12\nQ: next", ["\nQ:"]) == "12\n#### 12"
    assert cut_at_stop("a b c", ["c", "b"]) == "a "
    assert cut_at_stop("abc", None) == "abc"
    assert cut_at_stop("abc", ["", "z"]) == "abc"


def test_sampling_returns_k_per_prompt(model, tokenizer):
    torch.manual_seed(1)
    outputs = generate(
        model,
        tokenizer,
        PROMPTS[:3],
        max_new_tokens=4,
        do_sample=True,
        temperature=1.0,
        num_return_sequences=2,
        progress=False,
    )
    assert len(outputs) == 6 and all(isinstance(o, str) for o in outputs)


def test_bad_arguments(model, tokenizer):
    assert generate(model, tokenizer, [], progress=False) == []
    with pytest.raises(TypeError, match="list of prompts"):
        generate(model, tokenizer, "one prompt", progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        generate(model, tokenizer, ["x"], batch_size=0, progress=False)
    with pytest.raises(ValueError, match="temperature"):
        generate(model, tokenizer, ["x"], do_sample=True, temperature=0.0, progress=False)


def test_chat_generate_plain_fallback(model, tokenizer):
    conversations = [
        [{"role": "user", "content": "hello there"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}],
    ]
    assert format_chat_plain(conversations[1]) == "System: Be brief.\nUser: hi\nAssistant:"
    replies = chat_generate(model, tokenizer, conversations, max_new_tokens=6, progress=False)
    expected = generate(
        model,
        tokenizer,
        [format_chat_plain(c) for c in conversations],
        max_new_tokens=6,
        stop=["\nUser:"],
        progress=False,
    )
    assert replies == expected
    with pytest.raises(TypeError, match="list of conversations"):
        chat_generate(model, tokenizer, conversations[0])


def test_chat_generate_uses_chat_template(model, tokenizer):
    templated = tokenizer.__class__(tokenizer_object=tokenizer.backend_tokenizer, eos_token="<eos>", pad_token="<pad>")
    templated.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}<assistant>"
    conversations = [[{"role": "user", "content": "hello"}]]
    replies = chat_generate(model, templated, conversations, max_new_tokens=6, progress=False)
    assert replies == generate(model, templated, ["<user>hello\n<assistant>"], max_new_tokens=6, progress=False)
    assert replies != generate(
        model, templated, [format_chat_plain(conversations[0])], max_new_tokens=6, progress=False
    )
