"""The training tasks, in one place (pure Python: the config, the data loaders and the model loader use it).

- ``classification``: a classification head on the model (encoders, or decoders with a score head);
- ``regression``: the same with one output;
- ``causal-lm``: next-token prediction on prompt/response pairs, evaluated by generation;
- ``text-to-text``: classification as generation (T5, the paper's NLU setting after LoRA-GA): the label is a
  word the decoder writes, accuracy is read from the first decoder token's logits over the label words.
"""

TASKS = ("classification", "regression", "causal-lm", "text-to-text")
# Tasks whose data are text (or text pairs) with a label, loaded by mgpo.data.text.
LABELLED_TEXT_TASKS = ("classification", "regression")


def check_task(task: str, allowed: tuple[str, ...] = TASKS, *, name: str = "task") -> str:
    """``task`` if it is one of ``allowed``; else ValueError naming it and the choices."""
    if task not in allowed:
        raise ValueError(f"{name}={task!r} is unknown: choose one of {', '.join(allowed)}.")
    return task
