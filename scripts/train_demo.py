"""Train the embedded demo model: a small character-level GPT on Python's own help text.

The corpus is `pydoc_data.topics` (the text behind `help('topics')`), which ships with
every CPython, so the demo needs no download. A few CPU minutes give a model that writes
recognisable Python-documentation prose. `make demo-model` runs this and writes model/demo/.
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from pathlib import Path

import torch

from model.export import save_export
from model.gpt import GPT, GPTConfig

log = logging.getLogger("train_demo")


def corpus() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[name] for name in sorted(topics))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="model/demo")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=1337)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.manual_seed(args.seed)

    text = corpus()
    itos = sorted(set(text))
    stoi = {ch: i for i, ch in enumerate(itos)}
    data = torch.tensor([stoi[ch] for ch in text], dtype=torch.long)
    n_val = len(data) // 20  # last 5% held out
    train, val = data[:-n_val], data[-n_val:]
    config = GPTConfig(block_size=128, vocab_size=len(itos), n_layer=4, n_head=4, n_embd=128, bias=False)
    model = GPT(config)
    log.info("corpus %d chars, vocab %d, %d parameters", len(text), len(itos), model.num_params())

    def batch(split: torch.Tensor):
        ix = torch.randint(len(split) - config.block_size - 1, (args.batch_size,))
        x = torch.stack([split[i : i + config.block_size] for i in ix])
        y = torch.stack([split[i + 1 : i + 1 + config.block_size] for i in ix])
        return x, y

    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=0.1)
    warmup = 100
    start = time.time()
    for step in range(args.steps + 1):
        # linear warm-up, then cosine decay to a tenth of the peak rate
        frac = min(1.0, (step + 1) / warmup)
        decay = 0.5 * (1 + math.cos(math.pi * min(1.0, step / args.steps)))
        for g in opt.param_groups:
            g["lr"] = args.lr * frac * (0.1 + 0.9 * decay)
        x, y = batch(train)
        _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 250 == 0:
            model.eval()
            with torch.no_grad():
                val_loss = sum(model(*batch(val))[1].item() for _ in range(10)) / 10
            model.train()
            log.info("step %d train %.3f val %.3f (%.0fs)", step, loss.item(), val_loss, time.time() - start)

    model.eval()
    source = {"trained_by": "scripts/train_demo.py", "corpus": "pydoc_data.topics", "steps": args.steps,
              "val_loss": round(val_loss, 4)}
    out = save_export(model, args.out, {"kind": "char", "itos": itos}, source)
    log.info("wrote %s", out)


if __name__ == "__main__":
    main()
