"""mgpo with Hugging Face (docs/huggingface.md):

- ``adapter_config``: the adapter's settings (pure Python); ``peft_variants``: applying them with PEFT;
- ``trainer``: ``PerturbationTrainer`` / ``perturbed(any Trainer subclass)``;
- ``arguments``: ``PerturbationTrainingArguments`` (the method's settings as ``perturbation_*`` fields);
- ``sft``: ``PerturbationSFTConfig`` / ``PerturbationSFTTrainer`` for TRL.
"""
