"""The default demo: a small character-level transformer trained on Python's own standard library.

Every Python ships its standard library as source, so this needs no download: the text is the
top-level ``*.py`` modules of the running interpreter's stdlib directory (sorted by name; every
tenth one held out for validation, so the validation text is whole modules the model never saw).
The model is a two-layer GPT in the style of nanoGPT; it predicts the next character. An epoch is
``steps_per_epoch`` batches of random windows, so it lasts a few seconds on two CPU cores whatever
the size of the text; the validation loss is measured on the same fixed windows every epoch, so two
epochs' numbers compare exactly.

At the defaults (SGD with momentum, lr 0.3) the validation loss keeps falling for many epochs,
halving lr when it flattens gives a clear drop within an epoch or two, and four times the lr from the
start makes it diverge: there is something to babysit. bench/demo_curve.py measures all three.
The five babysit lines are marked ``# babysit``.
"""

from __future__ import annotations

import random
import sysconfig
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, RandomSampler

import babysit
from babysit.errors import SettingsError
from babysit.jobs.common import build_optimizer, check_settings, configure_threads

# The vocabulary is fixed, not read from the text, so a checkpoint fits any Python's stdlib:
# tab, newline and printable ASCII; anything else (a few accented letters in comments) is one token.
VOCAB = "\t\n" + "".join(chr(c) for c in range(32, 127))
OTHER = len(VOCAB)
VOCAB_SIZE = len(VOCAB) + 1
VAL_EVERY = 10  # every tenth module (in name order) is validation text
VAL_WINDOWS = 128  # validation windows, evenly spaced over the validation text


@dataclass(frozen=True)
class CharLMConfig:
    epochs: int = 100
    lr: float = 0.3
    momentum: float = 0.9
    optimizer: str = "sgd"
    seed: int = 0
    batch_size: int = 32
    seq_len: int = 64
    steps_per_epoch: int = 100
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 64
    checkpoint_every_steps: int | None = None  # a periodic checkpoint every N steps
    checkpoint_every_minutes: float | None = None  # and/or every M minutes (babysit.cadence)

    def __post_init__(self) -> None:
        check_settings(self, ("batch_size", "seq_len", "steps_per_epoch", "n_layer", "n_head", "n_embd"))
        if self.n_embd % self.n_head:
            raise SettingsError(f"n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head})")


# -- data --------------------------------------------------------------------------------------
def stdlib_dir() -> Path:
    """The running interpreter's standard library directory (where ``os.py`` lives)."""
    return Path(sysconfig.get_paths()["stdlib"])


def source_files(root: Path | None = None) -> tuple[list[Path], list[Path]]:
    """The top-level ``*.py`` modules of the stdlib, in name order, as (train, validation) files."""
    files = sorted((root or stdlib_dir()).glob("*.py"), key=lambda p: p.name)
    if len(files) < VAL_EVERY:
        raise FileNotFoundError(f"expected the standard library's modules in {root or stdlib_dir()}, "
                                f"found {len(files)} .py files")
    val = files[::VAL_EVERY]
    train = [f for i, f in enumerate(files) if i % VAL_EVERY]
    return train, val


_TABLE = np.full(256, OTHER, dtype=np.uint8)
_TABLE[[ord(c) for c in VOCAB]] = np.arange(len(VOCAB), dtype=np.uint8)


def encode(text: bytes) -> torch.Tensor:
    """Bytes to token ids (one per byte; bytes outside the vocabulary become ``OTHER``)."""
    return torch.from_numpy(_TABLE[np.frombuffer(text, dtype=np.uint8)].astype(np.int64))


def decode(tokens: torch.Tensor) -> str:
    return "".join(VOCAB[t] if t < OTHER else "?" for t in tokens.tolist())


def read_tokens(files: list[Path]) -> torch.Tensor:
    """The files' bytes, concatenated in the order given, as one tensor of token ids."""
    return encode(b"".join(f.read_bytes() for f in files))


class Windows(Dataset):
    """Window ``i`` is (text[i : i+seq_len], text[i+1 : i+seq_len+1]): input and next characters."""

    def __init__(self, tokens: torch.Tensor, seq_len: int) -> None:
        self.tokens, self.seq_len = tokens, seq_len

    def __len__(self) -> int:
        return len(self.tokens) - self.seq_len

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        chunk = self.tokens[i : i + self.seq_len + 1]
        return chunk[:-1], chunk[1:]


def validation_batch(tokens: torch.Tensor, seq_len: int, windows: int = VAL_WINDOWS) -> tuple[torch.Tensor, torch.Tensor]:
    """The same ``windows`` windows every time, evenly spaced over the validation text."""
    starts = torch.linspace(0, len(tokens) - seq_len - 1, windows).long()
    chunks = torch.stack([tokens[s : s + seq_len + 1] for s in starts.tolist()])
    return chunks[:, :-1], chunks[:, 1:]


# -- model (a small GPT) -----------------------------------------------------------------------
class Block(nn.Module):
    def __init__(self, n_embd: int, n_head: int) -> None:
        super().__init__()
        self.n_head = n_head
        self.ln_1 = nn.LayerNorm(n_embd)
        self.qkv = nn.Linear(n_embd, 3 * n_embd)
        self.proj = nn.Linear(n_embd, n_embd)
        self.ln_2 = nn.LayerNorm(n_embd)
        self.mlp = nn.Sequential(nn.Linear(n_embd, 4 * n_embd), nn.GELU(), nn.Linear(4 * n_embd, n_embd))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln_1(x)).split(c, dim=2)
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attended.transpose(1, 2).reshape(b, t, c))
        return x + self.mlp(self.ln_2(x))


class CharGPT(nn.Module):
    def __init__(self, config: CharLMConfig) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(VOCAB_SIZE, config.n_embd)
        self.position_embedding = nn.Embedding(config.seq_len, config.n_embd)
        self.blocks = nn.Sequential(*(Block(config.n_embd, config.n_head) for _ in range(config.n_layer)))
        self.ln_f = nn.LayerNorm(config.n_embd)
        self.head = nn.Linear(config.n_embd, VOCAB_SIZE)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.token_embedding(tokens) + self.position_embedding(positions)
        return self.head(self.ln_f(self.blocks(x)))


def next_char_loss(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the next character, in nats (exp() of it is the perplexity)."""
    logits = model(inputs)
    return F.cross_entropy(logits.reshape(-1, VOCAB_SIZE), targets.reshape(-1))


@torch.no_grad()
def evaluate(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> float:
    model.eval()
    loss = next_char_loss(model, inputs, targets).item()
    model.train()
    return loss


# -- training ----------------------------------------------------------------------------------
def train(run_dir: str | Path, config: CharLMConfig, *, on_run: object = None, replay: Any = None) -> babysit.Run:
    """Train (or resume) the character model in ``run_dir``. ``on_run(run)`` is called once the run exists;
    ``replay``: a panda journal whose lr and momentum settings are applied at their steps."""
    configure_threads()
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    np.random.seed(config.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    train_files, val_files = source_files()
    train_windows = Windows(read_tokens(train_files), config.seq_len)
    sampler = RandomSampler(train_windows, replacement=True, num_samples=config.steps_per_epoch * config.batch_size)
    loader = DataLoader(train_windows, batch_size=config.batch_size, sampler=sampler)
    val_inputs, val_targets = (t.to(device) for t in validation_batch(read_tokens(val_files), config.seq_len))
    model = CharGPT(config).to(device)
    optimizer = build_optimizer(config, model)

    run = babysit.Run(run_dir, model, optimizer, config={"job": "charlm", **asdict(config)},  # babysit
                      items_per_step=config.batch_size * config.seq_len, item_unit="tokens", replay=replay,
                      checkpoint_every_steps=config.checkpoint_every_steps,
                      checkpoint_every_minutes=config.checkpoint_every_minutes,
                      evaluate=lambda: {"val_loss": evaluate(model, val_inputs, val_targets)})  # ranks probes
    with run:
        if callable(on_run):
            on_run(run)
        for epoch in run.epochs(config.epochs):  # babysit
            for inputs, targets in run.batches(loader):  # babysit
                loss = next_char_loss(model, inputs.to(device), targets.to(device))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                run.log(loss=loss)  # babysit
            run.log_epoch(val_loss=evaluate(model, val_inputs, val_targets))  # babysit
    return run
