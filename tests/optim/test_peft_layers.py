"""Layer discovery on a tiny randomly initialised transformer wrapped by PEFT, and MGPO lowering its loss."""

from __future__ import annotations

import peft
import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

import mgpo

VARIANTS = {
    "lora": peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS"),
    "dora": peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], use_dora=True, task_type="SEQ_CLS"),
    "rslora": peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["query", "value"], use_rslora=True, task_type="SEQ_CLS"
    ),
    "adalora": peft.AdaLoraConfig(
        init_r=6, target_r=4, target_modules=["query", "value"], total_step=40, tinit=0, tfinal=0, task_type="SEQ_CLS"
    ),
}
# tensors per LoRA layer: A and B, plus DoRA's magnitude or AdaLoRA's E
PER_LAYER = {"lora": 2, "dora": 3, "rslora": 2, "adalora": 3}


def tiny_model(variant):
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=48,
        max_position_embeddings=32,
        num_labels=2,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return peft.get_peft_model(BertForSequenceClassification(config), VARIANTS[variant])


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_layers_group_each_lora_module(variant):
    model = tiny_model(variant)
    opt = mgpo.MGPO(model, lr=1e-3)
    lora_layers = {k: v for k, v in opt.layers.items() if k.endswith("[default]")}
    assert len(lora_layers) == 4  # query and value in 2 blocks
    assert all(len(v) == PER_LAYER[variant] for v in lora_layers.values())
    others = [k for k in opt.layers if k not in lora_layers]
    assert others and all("classifier" in k or "pooler" in k for k in others)  # the trained head
    n_trainable = sum(1 for p in model.parameters() if p.requires_grad)
    assert sum(len(v) for v in opt.layers.values()) == n_trainable


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_a_few_mgpo_steps_lower_the_loss(variant):
    model = tiny_model(variant)
    opt = mgpo.MGPO(model, lr=2e-2, rho=0.05)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 64, (16, 12), generator=gen)
    labels = (ids[:, 0] % 2).long()
    model.train()
    losses = []
    for step in range(30):
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        opt.step()
        if variant == "adalora":
            model.base_model.update_and_allocate(step)
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses
