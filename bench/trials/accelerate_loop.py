"""Trial 2, the training script: a custom accelerate loop in the transformers examples' style (a
tiny GPT-2 from a config, AdamW with weight-decay groups, get_scheduler("cosine") with warmup,
gradient_accumulation_steps=2 under `with accelerator.accumulate(model):`, a log line every step),
wrapped in babysit.Run(run_dir, model, optimizer, lr_scheduler).

    PYTHONPATH=. python bench/trials/accelerate_loop.py RUN_DIR [EPOCHS]

run_accelerate_loop.py drives it through the CLI (nudge, pause, rollback, kill -9, restart).
"""
import logging, math, sys
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from accelerate import Accelerator
from accelerate.utils import set_seed
from transformers import GPT2Config, GPT2LMHeadModel, get_scheduler
import babysit

logger = logging.getLogger(__name__)
logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)

run_dir = sys.argv[1]
num_train_epochs = int(sys.argv[2]) if len(sys.argv) > 2 else 3
gradient_accumulation_steps = 2
accelerator = Accelerator(gradient_accumulation_steps=gradient_accumulation_steps)
set_seed(1234)

rows = (torch.randint(0, 64, (1024, 1)) + torch.randint(1, 4, (1024, 1)) * torch.arange(32)) % 64
train_dataloader = DataLoader(TensorDataset(rows), batch_size=16, shuffle=True)
model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=64, n_layer=2, n_head=2,
                                   bos_token_id=0, eos_token_id=0))
no_decay = ["bias", "layer_norm.weight"]
optimizer_grouped_parameters = [
    {"params": [p for n, p in model.named_parameters() if not any(nd in n for nd in no_decay)], "weight_decay": 0.01},
    {"params": [p for n, p in model.named_parameters() if any(nd in n for nd in no_decay)], "weight_decay": 0.0},
]
optimizer = torch.optim.AdamW(optimizer_grouped_parameters, lr=5e-4)
num_update_steps_per_epoch = math.ceil(len(train_dataloader) / gradient_accumulation_steps)
max_train_steps = num_train_epochs * num_update_steps_per_epoch
lr_scheduler = get_scheduler(name="cosine", optimizer=optimizer,
                             num_warmup_steps=10 * accelerator.num_processes,
                             num_training_steps=max_train_steps * accelerator.num_processes)
model, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(model, optimizer, train_dataloader, lr_scheduler)

logger.info("***** Running training *****")
completed_steps = 0
with babysit.Run(run_dir, model, optimizer, lr_scheduler) as run:                      # babysit
    for epoch in run.epochs(num_train_epochs):                                        # babysit
        model.train()
        total_loss = 0
        for step, (batch,) in run.enumerate(train_dataloader):                        # babysit
            with accelerator.accumulate(model):
                outputs = model(input_ids=batch, labels=batch)
                loss = outputs.loss
                total_loss += loss.detach().float()
                accelerator.backward(loss)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
            if accelerator.sync_gradients:
                completed_steps += 1
            run.log(loss=loss)                                                          # babysit
            logger.info(f"epoch {epoch} step {step} loss {loss.item():.4f} lr {lr_scheduler.get_last_lr()[0]:.3e}")
        logger.info(f"epoch {epoch}: train_loss {total_loss.item() / len(train_dataloader):.4f}")
print("DONE completed_steps", completed_steps, "final lr", lr_scheduler.get_last_lr()[0])
