"""Every use mgpo makes of transformers' private API, in one place.

A transformers minor release may rename or change any private name: this module is the one to adapt, and
``tests/integrations/test_hf_private.py`` checks every name in :data:`PRIVATE_API` against the installed
transformers (it fails naming the attribute). Nothing else in ``src/mgpo`` touches a ``trainer._...`` attribute
or a transformers private name (a test greps for them).

What the public API covers is used instead: ``TrainerCallback`` events, ``create_optimizer``,
``optimizer_cls_and_kwargs``, ``train(resume_from_checkpoint=...)``. Each use below says why it does not serve.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import transformers
from torch import nn

# name -> the parameters (after self) it is called with here: what the test checks on the installed version.
PRIVATE_API: dict[str, tuple[str, ...]] = {
    "Trainer._load_from_checkpoint": ("resume_from_checkpoint", "model"),
    "Trainer._load_best_model": (),
    "Trainer._clip_grad_norm": ("model",),
    "Trainer._save_optimizer_and_scheduler": ("output_dir",),
    "Trainer._load_optimizer_and_scheduler": ("checkpoint",),
    "Trainer._remove_unused_columns": ("dataset", "description"),
    "Trainer._get_collator_with_removed_columns": ("data_collator", "description"),
    "Trainer._prepare_inputs": ("inputs",),
}
# Private attributes of instances (set in __init__), and names of internal modules that no public module exports.
PRIVATE_INSTANCE_ATTRIBUTES = {"TensorBoardCallback._SummaryWriter": "the SummaryWriter class it opens"}
INTERNAL_NAMES = (
    "transformers.trainer.OPTIMIZER_NAME",
    "transformers.trainer.SCHEDULER_NAME",
    "transformers.distributed.fsdp.get_fsdp_ckpt_kwargs",
)


# ------------------------------------------------------------------------------------------- calls
def load_checkpoint_weights(trainer: transformers.Trainer, checkpoint: str) -> None:
    """A checkpoint's weights into ``trainer.model``. Why private: the public way,
    ``train(resume_from_checkpoint=...)``, also trains, and its loop checks ``max_steps`` after a step, so a
    finished run resumed that way would train (log, save, count) one step past its end."""
    trainer._load_from_checkpoint(checkpoint)


def load_best_model(trainer: transformers.Trainer) -> None:
    """The checkpoint ``trainer.state.best_model_checkpoint`` names, loaded as ``load_best_model_at_end`` does at
    the end of ``train()``. Why private: no public method loads it outside ``train()``, which evaluating a
    finished run from its checkpoint does not call (see :func:`load_checkpoint_weights`)."""
    trainer._load_best_model()


def clip_grad_norm(trainer: transformers.Trainer, model: nn.Module) -> Any:
    """The Trainer's own gradient clipping (``max_grad_norm``, with its FSDP/DeepSpeed/fp16 handling), for SAM's
    second gradient. Why private: the public ``torch.nn.utils.clip_grad_norm_`` does not know how the
    accelerator wraps the model (FSDP clips through the wrapper), which the Trainer's method does."""
    return trainer._clip_grad_norm(model)


def remove_unused_columns(trainer: transformers.Trainer, dataset: Any, description: str) -> Any:
    """``dataset`` without the columns the model's forward does not take, as the Trainer does for its own
    datasets. Why private: the public ``get_eval_dataloader`` does this too, but also shards the data over the
    ranks (accelerate's prepare), and the clean-loss probe must be the same examples on every rank."""
    return trainer._remove_unused_columns(dataset, description=description)


def collator_with_removed_columns(trainer: transformers.Trainer, collator: Any, description: str) -> Any:
    """The same for a dataset that is not a ``datasets.Dataset`` (the columns are dropped by the collator). Why
    private: as :func:`remove_unused_columns`."""
    return trainer._get_collator_with_removed_columns(collator, description=description)


def prepare_inputs(trainer: transformers.Trainer, batch: dict[str, Any]) -> dict[str, Any]:
    """A batch moved to the device (and through the Trainer's input handling) as for a training step. Why
    private: no public method prepares one batch; ``training_step`` and ``prediction_step`` do it inside."""
    return trainer._prepare_inputs(batch)


def tensorboard_writer_class(callback: Any) -> type:
    """The SummaryWriter class a ``TensorBoardCallback`` opens (torch's, else tensorboardX's). Why private: the
    callback opens its writer itself, without ``purge_step``, and a resumed run needs one that purges the points
    a killed session wrote past its checkpoint; this keeps the very class the callback would use."""
    return callback._SummaryWriter


# ------------------------------------------------------------------------------------------- file names
def optimizer_file_name() -> str:
    """The optimizer state's file name in a checkpoint (``optimizer.pt``). Why internal: the Trainer saves it
    under this module constant and exports no public name for it."""
    from transformers.trainer import OPTIMIZER_NAME

    return OPTIMIZER_NAME


def scheduler_file_name() -> str:
    """The learning-rate scheduler's file name in a checkpoint (``scheduler.pt``), as for the optimizer's."""
    from transformers.trainer import SCHEDULER_NAME

    return SCHEDULER_NAME


def fsdp_checkpoint_kwargs() -> dict[str, Any]:
    """The keywords the Trainer passes to accelerate's ``save_fsdp_model``. Why internal: an FSDP model is saved
    the Trainer's way only through this helper of ``transformers.distributed.fsdp``."""
    from transformers.distributed.fsdp import get_fsdp_ckpt_kwargs

    return get_fsdp_ckpt_kwargs()


# ------------------------------------------------------------------------------------------- overrides
if TYPE_CHECKING:
    _Trainer = transformers.Trainer
else:
    _Trainer = object  # a mixin: the Trainer class comes after it in the MRO


class TrainerOverrides(_Trainer):
    """The Trainer's private methods mgpo overrides, each forwarding to a hook of the class it is mixed into
    (:class:`mgpo.integrations.trainer.PerturbationTrainerMixin`): ``_gradients_before_clipping()``,
    ``_save_method_state(dir) -> bool`` and ``_load_method_state(checkpoint) -> bool`` (True: done, the Trainer's
    own saving or loading is skipped) and ``_refuse_other_method(checkpoint)``."""

    if TYPE_CHECKING:  # the hooks, defined by the class mixed in

        def _gradients_before_clipping(self) -> None: ...
        def _save_method_state(self, output_dir: str) -> bool: ...
        def _load_method_state(self, checkpoint: str | None) -> bool: ...
        def _refuse_other_method(self, checkpoint: str) -> None: ...

    def _clip_grad_norm(self, model: nn.Module) -> Any:
        # Why private: MGPO's gbar is taken from the gradients before clipping (the authors' code), and the
        # Trainer runs no public hook between the backward and the clipping (on_pre_optimizer_step comes after).
        self._gradients_before_clipping()
        return super()._clip_grad_norm(model)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        # Why private: the Trainer saves the optimizer inside its private _save_checkpoint, with no public hook;
        # under FSDP torch's optimizer checkpointing expects a plain optimizer's state-dict layout, so each rank
        # saves its shard of the method's state instead.
        if not self._save_method_state(output_dir):
            super()._save_optimizer_and_scheduler(output_dir)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        # Why private: the counterpart of the save above (train(resume_from_checkpoint=) calls it); and a plain
        # optimizer given a method's state fails in torch with a bare KeyError, which becomes a clear ValueError.
        if self._load_method_state(checkpoint):
            return
        try:
            super()._load_optimizer_and_scheduler(checkpoint)
        except KeyError:  # torch's bare KeyError('param_groups'): a plain optimizer given a method's state
            assert checkpoint is not None  # the Trainer loads nothing without one
            self._refuse_other_method(checkpoint)
            raise
