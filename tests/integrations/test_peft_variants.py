import math

import pytest
import torch
from peft.utils.other import ModulesToSaveWrapper
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

from mgpo.factory import create_optimizer
from mgpo.integrations.peft_variants import (
    METHODS,
    AdapterConfig,
    adapter_step,
    apply_adapter,
)


def adamw_for(model, cfg, lr, weight_decay=0.0):
    """Plain AdamW with Hugging Face's decay groups, or PEFT's LoRA+ groups for loraplus."""
    ratio = cfg.loraplus_lr_ratio if cfg.method == "loraplus" else None
    return create_optimizer(
        model, torch.optim.AdamW, {"lr": lr, "weight_decay": weight_decay}, method="adamw", loraplus_lr_ratio=ratio
    )


def tiny_bert(num_labels=2):
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        num_labels=num_labels,
    )
    return BertForSequenceClassification(config)


def tiny_llama():
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=100,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config)


def cls_batch(n=4, seq=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "input_ids": torch.randint(1, 100, (n, seq), generator=g),
        "attention_mask": torch.ones(n, seq, dtype=torch.long),
        "labels": torch.randint(0, 2, (n,), generator=g),
    }


def lm_batch(n=2, seq=9, seed=0):
    ids = torch.randint(1, 100, (n, seq), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def grad_batches(make=cls_batch, count=3):
    return lambda: (make(seed=i) for i in range(count))


def n_trainable(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def build(method, task="classification", model=None, **kwargs):
    model = model if model is not None else (tiny_llama() if task == "causal-lm" else tiny_bert())
    make = lm_batch if task == "causal-lm" else cls_batch
    cfg = AdapterConfig(method=method, **kwargs)
    peft_model = apply_adapter(model, cfg, task=task, total_steps=20, grad_batches=grad_batches(make))
    return peft_model, cfg


def expected_lora_params(model, rank, skip=("classifier", "lm_head")):
    return sum(
        rank * (m.in_features + m.out_features)
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and name.split(".")[-1] not in skip
    )


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("task", ["classification", "causal-lm"])
def test_every_method_builds_and_trains_one_step(method, task):
    model, cfg = build(method, task)
    batch = lm_batch() if task == "causal-lm" else cls_batch()
    opt = adamw_for(model, cfg, lr=1e-3)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    loss = model(**batch).loss
    assert torch.isfinite(loss)
    loss.backward()
    opt.step()
    adapter_step(model, cfg, global_step=1)
    opt.zero_grad()
    changed = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(before[n], p)]
    assert changed, f"{method}: no trainable parameter moved after one step"


@pytest.mark.parametrize("rank", [2, 8])
def test_lora_trainable_params_are_adapters_plus_head(rank):
    base = tiny_bert()
    expected = expected_lora_params(base, rank) + sum(p.numel() for p in base.classifier.parameters())
    model, _ = build("lora", model=base, rank=rank)
    assert n_trainable(model) == expected
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert all("lora_" in n or "classifier" in n for n in trainable)
    assert not any("embeddings" in n or "LayerNorm" in n for n in trainable)


def test_rank_changes_trainable_count():
    assert n_trainable(build("lora", rank=4)[0]) < n_trainable(build("lora", rank=16)[0])


def test_classifier_head_is_trainable_but_not_lora_wrapped():
    model, _ = build("lora")
    head = model.base_model.model.classifier
    assert isinstance(head, ModulesToSaveWrapper)
    assert not any("lora_" in n for n, _ in head.named_parameters())
    assert all(p.requires_grad for p in head.modules_to_save.parameters())
    # embeddings and norms stay frozen and unwrapped
    assert not any("lora_" in n for n, _ in model.base_model.model.bert.embeddings.named_parameters())


def test_causal_lm_head_and_embeddings_are_frozen():
    model, _ = build("lora", task="causal-lm")
    inner = model.base_model.model
    assert not any(p.requires_grad for p in inner.lm_head.parameters())
    assert not any("lora_" in n for n, _ in inner.lm_head.named_parameters())
    assert not any(p.requires_grad for p in inner.model.embed_tokens.parameters())
    assert n_trainable(model) == expected_lora_params(tiny_llama(), 8)


def test_dora_has_magnitude_vectors():
    model, _ = build("dora")
    mags = [(n, p) for n, p in model.named_parameters() if "lora_magnitude_vector" in n]
    assert mags and all(p.ndim == 1 and p.requires_grad for _, p in mags)
    plain = n_trainable(build("lora")[0])
    assert n_trainable(model) == plain + sum(p.numel() for _, p in mags)


def test_rslora_scales_by_sqrt_rank():
    model, cfg = build("rslora", rank=4)
    query = model.base_model.model.bert.encoder.layer[0].attention.self.query
    assert query.scaling["default"] == pytest.approx(cfg.alpha / math.sqrt(cfg.rank))
    lora_query = build("lora", rank=4)[0].base_model.model.bert.encoder.layer[0].attention.self.query
    assert lora_query.scaling["default"] == pytest.approx(cfg.alpha / cfg.rank)


@pytest.mark.parametrize("method", ["pissa", "lora-ga"])
def test_data_or_svd_init_keeps_the_function_but_starts_b_nonzero(method):
    base = tiny_bert()
    base.eval()
    batch = cls_batch()
    with torch.no_grad():
        ref = base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    model, _ = build(method, model=base)
    model.eval()
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    b = model.base_model.model.bert.encoder.layer[0].attention.self.query.lora_B["default"].weight
    assert b.abs().sum() > 0  # plain LoRA starts with B = 0


def test_plain_lora_starts_with_zero_b():
    model, _ = build("lora")
    b = model.base_model.model.bert.encoder.layer[0].attention.self.query.lora_B["default"].weight
    assert torch.count_nonzero(b) == 0


def test_loraga_uses_the_requested_number_of_batches():
    calls = []

    def batches():
        for i in range(10):
            calls.append(i)
            yield cls_batch(seed=i)

    apply_adapter(
        tiny_bert(), AdapterConfig(method="lora-ga", loraga_batches=2), task="classification", grad_batches=batches
    )
    assert len(calls) == 2


def test_loraga_needs_batches():
    with pytest.raises(ValueError, match="grad_batches"):
        apply_adapter(tiny_bert(), AdapterConfig(method="lora-ga"), task="classification")
    with pytest.raises(ValueError, match="no batches"):
        apply_adapter(tiny_bert(), AdapterConfig(method="lora-ga"), task="classification", grad_batches=lambda: [])


def test_adalora_has_singular_values_and_reallocates():
    model, cfg = build("adalora", adalora_init_rank=6, adalora_target_rank=2, adalora_delta_t=1)
    assert any("lora_E" in n for n, _ in model.named_parameters())
    opt = adamw_for(model, cfg, lr=1e-2)
    for step in range(1, 21):
        model(**cls_batch(seed=step)).loss.backward()
        opt.step()
        adapter_step(model, cfg, global_step=step)
        opt.zero_grad()
    # after the final phase the budget is the target rank: some singular values got masked to zero
    ranks = [int(torch.count_nonzero(p)) for n, p in model.named_parameters() if "lora_E" in n]
    assert sum(ranks) < 6 * len(ranks)


def test_adalora_needs_total_steps():
    with pytest.raises(ValueError, match="total_steps"):
        apply_adapter(tiny_bert(), AdapterConfig(method="adalora"), task="classification")


def test_loraplus_groups_have_the_lr_ratio():
    model, cfg = build("loraplus", loraplus_lr_ratio=16.0)
    groups = [g for g in adamw_for(model, cfg, lr=1e-4, weight_decay=0.01).param_groups if g["params"]]
    names = {id(p): n for n, p in model.named_parameters()}
    lrs = sorted({g["lr"] for g in groups})
    assert lrs == pytest.approx([1e-4, 16 * 1e-4])
    for g in groups:
        group_names = [names[id(p)] for p in g["params"]]
        if any("lora_B" in n for n in group_names):
            assert g["lr"] == pytest.approx(16e-4)
        if any("lora_A" in n for n in group_names):
            assert g["lr"] == pytest.approx(1e-4)
    grouped = [id(p) for g in groups for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters() if p.requires_grad)


def test_default_groups_cover_all_trainable_params_with_hf_decay_rule(tmp_path):
    from transformers import Trainer, TrainingArguments

    model, cfg = build("lora")
    groups = adamw_for(model, cfg, lr=3e-4, weight_decay=0.1).param_groups
    assert all(g["lr"] == 3e-4 for g in groups)
    assert sum(p.numel() for g in groups for p in g["params"]) == n_trainable(model)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for g in groups if g["weight_decay"] == 0.1 for p in g["params"]}
    not_decayed = {names[id(p)] for g in groups if g["weight_decay"] == 0.0 for p in g["params"]}
    assert decayed and not_decayed  # the head's bias and LoRA weights
    trainer = Trainer(model=model, args=TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none"))
    hf_decay = set(trainer.get_decay_parameter_names(model))
    assert decayed == {n for n in hf_decay if n in decayed | not_decayed}
    assert not any(n in hf_decay for n in not_decayed)
    assert all("bias" in n or "LayerNorm" in n for n in not_decayed)


def test_full_trains_every_weight():
    base = tiny_bert()
    for p in base.parameters():
        p.requires_grad_(False)
    model, _ = build("full", model=base)
    assert model is base
    assert n_trainable(model) == sum(p.numel() for p in model.parameters())


def test_regression_task_keeps_single_output_head():
    model = apply_adapter(tiny_bert(num_labels=1), AdapterConfig(), task="regression")
    assert model.base_model.model.classifier.modules_to_save["default"].out_features == 1


@pytest.mark.parametrize(
    "field_name, value",
    [
        ("method", "qlora"),
        ("rank", 0),
        ("alpha", 0.0),
        ("dropout", 1.0),
        ("dropout", -0.1),
        ("loraplus_lr_ratio", 0.5),
        ("adalora_target_rank", 0),
        ("adalora_init_rank", 4),
        ("adalora_tfinal_frac", 0.95),
        ("adalora_delta_t", 0),
        ("loraga_batches", 0),
        ("pissa_niter", -1),
        ("target_modules", []),
    ],
)
def test_invalid_values_name_the_field(field_name, value):
    cfg = AdapterConfig(**{field_name: value})
    with pytest.raises(ValueError, match=field_name):
        cfg.validate()
    with pytest.raises(ValueError, match=field_name):
        apply_adapter(tiny_bert(), cfg, task="classification", total_steps=10)


def test_unknown_task_is_rejected():
    with pytest.raises(ValueError, match="task"):
        apply_adapter(tiny_bert(), AdapterConfig(), task="translation")


def test_every_field_has_help():
    from dataclasses import fields

    assert all(f.metadata.get("help") for f in fields(AdapterConfig))
