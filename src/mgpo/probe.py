"""The clean training loss: the loss at the clean weights, for every method alike (pure PyTorch).

MGPO, MSAM and the noise methods run each training forward at perturbed weights, so the loss a training step
returns is the loss at ``W + eps``; MGPO's perturbation points along the update (a look-ahead), and its loss is
lower than the clean one. :func:`clean_loss` measures the loss of the same model at its clean weights, in eval
mode and without gradients, so runs of different methods can be compared::

    probe = list(itertools.islice(train_loader, 4))          # a fixed set of training batches, kept for the run
    for step, batch in enumerate(loader, 1):
        ...                                                  # the usual forward / backward / opt.step()
        if step % 50 == 0:
            print(step, mgpo.clean_loss(model, probe, optimizer=opt))
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

__all__ = ["clean_loss", "task_loss_only"]


def clean_loss(
    model: nn.Module,
    batches: Iterable[Any],
    optimizer: torch.optim.Optimizer | None = None,
    loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
) -> float:
    """The example-weighted mean loss of ``batches`` at the clean weights, in eval mode, without gradients.

    Args:
        model: the model being trained (its train/eval mode is restored afterwards).
        batches: an iterable of batches: mappings for ``model(**batch)`` (Hugging Face style, with labels), or
            anything ``loss_fn`` accepts. Pass the same batches every time, so the values form a curve.
        optimizer: the training optimizer. An mgpo optimizer (or one wrapping it, e.g. accelerate's) is asked
            for its clean weights with ``optimizer.unperturbed()``; any other is ignored.
        loss_fn: ``loss_fn(model, batch) -> scalar tensor``, the batch's mean loss. Default:
            ``model(**batch).loss``.

    The loss is the task's alone: a penalty the model adds to its own loss (AdaLoRA's orthogonality term) is left
    out, see :func:`task_loss_only`. Each batch's loss is weighted by its number of examples (the first dimension of
    its first tensor), so the
    result is the mean over examples whatever the batch sizes. A model's own loss over tokens (a causal LM's)
    is the mean over the tokens of each batch. Weights and optimizer state are left as they were.
    """
    opt = optimizer
    while isinstance(inner := getattr(opt, "optimizer", None), torch.optim.Optimizer):
        opt = inner  # accelerate's AcceleratedOptimizer and similar wrappers
    unperturbed = getattr(opt, "unperturbed", None)
    window = unperturbed() if callable(unperturbed) else contextlib.nullcontext()
    was_training = model.training
    total, count = None, 0
    try:
        with window, torch.no_grad(), task_loss_only(model):
            model.eval()  # an eval-mode forward also takes an mgpo perturbation off; the window makes it explicit
            for batch in batches:
                loss = loss_fn(model, batch) if loss_fn is not None else _model_loss(model, batch)
                n = _examples(batch)
                part = loss.detach().float().mean() * n
                total = part if total is None else total + part  # summed on the device: one transfer at the end
                count += n
    finally:
        model.train(was_training)
    if not count:
        raise ValueError(
            "clean_loss: `batches` held no examples; pass a non-empty list of batches (the same ones at every call)."
        )
    assert total is not None  # a batch with examples was summed
    return float(total) / count


@contextlib.contextmanager
def task_loss_only(model: nn.Module):
    """Inside, the model's loss is the task's loss alone. PEFT's AdaLoRA adds its orthogonality penalty
    (``orth_reg_weight`` x the mean ‖P Pᵀ − I‖ of its factors) to ``outputs.loss`` at every forward that computes a
    loss, in eval mode too. That is the objective it trains on, but a probe or test loss that held it was mostly
    the penalty (1.9 against a task loss of 0.69 at step 10 of a 100-step MiniLM run), not the quantity every
    other method's loss is. Found by the attribute (no PEFT import here); no-op for other models."""
    configs = getattr(model, "peft_config", None)
    config = configs.get(getattr(model, "active_adapter", None)) if isinstance(configs, dict) else None
    if config is None or not hasattr(config, "orth_reg_weight"):
        yield
        return
    weight, config.orth_reg_weight = config.orth_reg_weight, 0.0  # PEFT adds 0 x the penalty
    try:
        yield
    finally:
        config.orth_reg_weight = weight


def _model_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    if not isinstance(batch, Mapping):
        raise TypeError(
            f"clean_loss: a batch of type {type(batch).__name__} cannot be passed as model(**batch); "
            "pass loss_fn=lambda model, batch: <the batch's mean loss>."
        )
    loss = getattr(model(**batch), "loss", None)
    if loss is None:
        raise ValueError(
            "clean_loss: model(**batch) returned no loss (does the batch hold labels?); include the "
            "labels, or pass loss_fn=lambda model, batch: <the batch's mean loss>."
        )
    return loss


def _examples(batch: Any) -> int:
    """The batch's number of examples: the first dimension of its first tensor."""
    values = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (list, tuple)) else [batch]
    for value in values:
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return int(value.shape[0])
    raise TypeError(
        f"clean_loss: cannot tell how many examples a batch of type {type(batch).__name__} holds (no "
        "tensor in it); batches should hold tensors with the examples along the first dimension."
    )
