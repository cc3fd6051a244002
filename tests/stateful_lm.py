"""A word-level LSTM language model trained the way the well-known example scripts train one, with
babysit added: the loop keeps its own state (the LSTM's hidden state carried across batches, the
best validation loss that drives its lr anneal) and updates its weights by hand, ``p.add_(grad,
alpha=-lr)``, with no torch optimizer — or with AdamW (``--optimizer adamw``).

The lines babysit needs are marked ``# babysit``. Run as a script (a real trainer process for the
tests) or call :func:`train` in-process with step hooks.

    python tests/stateful_lm.py --run-dir checkpoints/lm --epochs 6
"""

from __future__ import annotations

import argparse
import math
import os
import signal
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

import babysit

VOCAB, EMBED, HIDDEN = 48, 24, 48
BATCH, BPTT = 8, 16


def corpus(seed: int = 0, length: int = 9000) -> torch.Tensor:
    """A token stream from a fixed random Markov chain: structure to learn, made here, no download."""
    generator = torch.Generator().manual_seed(seed)
    transitions = torch.softmax(3 * torch.randn(VOCAB, VOCAB, generator=generator), dim=1)
    tokens = torch.empty(length, dtype=torch.long)
    tokens[0] = 0
    for i in range(1, length):
        tokens[i] = torch.multinomial(transitions[tokens[i - 1]], 1, generator=generator)
    return tokens


def batchify(data: torch.Tensor, batch_size: int) -> torch.Tensor:
    columns = data.size(0) // batch_size
    return data[: columns * batch_size].view(batch_size, -1).t().contiguous()


def get_batch(source: torch.Tensor, i: int) -> tuple[torch.Tensor, torch.Tensor]:
    length = min(BPTT, len(source) - 1 - i)
    return source[i:i + length], source[i + 1:i + 1 + length].reshape(-1)


class LSTMModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Embedding(VOCAB, EMBED)
        self.rnn = nn.LSTM(EMBED, HIDDEN)
        self.drop = nn.Dropout(0.2)
        self.decoder = nn.Linear(HIDDEN, VOCAB)

    def forward(self, x: torch.Tensor, hidden: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, Any]:
        output, hidden = self.rnn(self.drop(self.encoder(x)), hidden)
        return self.decoder(self.drop(output)).view(-1, VOCAB), hidden

    def init_hidden(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.zeros(1, batch_size, HIDDEN), torch.zeros(1, batch_size, HIDDEN)


def repackage_hidden(hidden: Any) -> Any:
    """Detach the hidden state from the graph of the previous batch."""
    return tuple(h.detach() for h in hidden)


def evaluate(model: LSTMModel, source: torch.Tensor) -> float:
    model.eval()
    total, hidden = 0.0, model.init_hidden(BATCH)
    with torch.no_grad():
        for i in range(0, source.size(0) - 1, BPTT):
            data, targets = get_batch(source, i)
            output, hidden = model(data, hidden)
            total += len(data) * nn.functional.cross_entropy(output, targets).item()
    model.train()
    return total / (len(source) - 1)


def train(run_dir: str | Path, epochs: int, *, lr: float = 20.0, optimizer_name: str = "hand", seed: int = 0,
          on_step: Callable[[babysit.Run], None] | None = None, **run_kwargs: Any) -> babysit.Run:
    torch.manual_seed(seed)
    torch.set_num_threads(1)
    tokens = corpus(seed)
    split = int(0.9 * len(tokens))
    train_data, val_data = batchify(tokens[:split], BATCH), batchify(tokens[split:], BATCH)
    starts = list(range(0, train_data.size(0) - 1, BPTT))
    model = LSTMModel()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr) if optimizer_name == "adamw" else None

    with babysit.Run(run_dir, model, optimizer, lr=None if optimizer else lr,        # babysit
                     state={"best_val_loss": math.inf, "hidden": None},             # babysit
                     items_per_step=BATCH * BPTT, item_unit="tokens", **run_kwargs) as run:
        for epoch in run.epochs(epochs):                                            # babysit
            if run.step_in_epoch == 0:  # a fresh epoch, not one resumed in its middle   # babysit
                run.state["hidden"] = model.init_hidden(BATCH)
            for i in run.batches(starts):                                           # babysit
                data, targets = get_batch(train_data, i)
                hidden = repackage_hidden(run.state["hidden"])
                model.zero_grad()
                output, hidden = model(data, hidden)
                loss = nn.functional.cross_entropy(output, targets)
                loss.backward()
                nn.utils.clip_grad_norm_(model.parameters(), 0.25)
                if optimizer is not None:
                    optimizer.step()
                else:
                    for p in model.parameters():
                        p.data.add_(p.grad, alpha=-run.lr)                          # babysit: run.lr
                run.state["hidden"] = hidden                                        # babysit
                run.log(loss=loss)                                                  # babysit
                if on_step is not None:
                    on_step(run)
            if run.interrupted:  # cut short by a stop or a rollback: not a real epoch end   # babysit
                continue
            val_loss = evaluate(model, val_data)
            run.log_epoch(val_loss=val_loss)                                        # babysit
            if val_loss < run.state["best_val_loss"]:
                run.state["best_val_loss"] = val_loss
            elif optimizer is not None:
                for group in optimizer.param_groups:
                    group["lr"] /= 4.0
            else:
                run.lr /= 4.0  # anneal when validation stops improving              # babysit: run.lr
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--lr", type=float, default=20.0)
    parser.add_argument("--optimizer", choices=("hand", "adamw"), default="hand")
    parser.add_argument("--signal-at-step", type=int, metavar="N",
                        help="for the tests: send this process --signal after step N, as a person's Ctrl-C would")
    parser.add_argument("--signal", choices=("INT", "TERM"), default="INT")
    parser.add_argument("--pause-at-step", type=int, metavar="N",
                        help="for the tests: queue a pause after step N, as a person's click would")
    args = parser.parse_args()

    def test_hooks(run: babysit.Run) -> None:
        if run.step == args.signal_at_step:
            os.kill(os.getpid(), getattr(signal, f"SIG{args.signal}"))
        if run.step == args.pause_at_step:
            run.store.enqueue_command("pause", source="test")

    hooked = args.signal_at_step is not None or args.pause_at_step is not None
    run = train(args.run_dir, args.epochs, lr=args.lr, optimizer_name=args.optimizer,
                on_step=test_hooks if hooked else None)
    print(f"stateful_lm: {run.status}: {run.message}", flush=True)


if __name__ == "__main__":
    main()
