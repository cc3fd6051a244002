"""Trial 1, the training script: a Hugging Face Trainer written as the quick tour writes it (a tiny
BERT built from a config, eval and save every epoch, save_total_limit=2, load_best_model_at_end on
eval_loss, a linear schedule with warmup), babysat with two lines: the callback and
babysit.hf.train(trainer).

    PYTHONPATH=. python bench/trials/hf_quicktour.py RUN_DIR [EPOCHS]

run_hf_quicktour.py drives it through the CLI (nudge, rollback, kill -9, restart).
"""
import sys
import numpy as np
import torch
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments, set_seed
import babysit.hf

run_dir = sys.argv[1]
set_seed(42)
n = 512
ids = torch.randint(5, 100, (n, 16))
labels = (ids[:, 0] > 50).long()


class Tokenized(torch.utils.data.Dataset):
    def __init__(self, ids, labels):
        self.ids, self.labels = ids, labels
    def __len__(self):
        return len(self.ids)
    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": self.labels[i]}


split = {"train": Tokenized(ids[:400], labels[:400]), "test": Tokenized(ids[400:], labels[400:])}

config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                    intermediate_size=64, max_position_embeddings=32, num_labels=2)
model = BertForSequenceClassification(config)

def compute_metrics(eval_pred):
    logits, labels = eval_pred
    return {"accuracy": float((np.argmax(logits, -1) == labels).mean())}

args = TrainingArguments(
    output_dir=f"{run_dir}/hf-out",
    eval_strategy="epoch",
    save_strategy="epoch",
    save_total_limit=2,
    load_best_model_at_end=True,
    metric_for_best_model="eval_loss",
    learning_rate=2e-4,
    lr_scheduler_type="linear",
    warmup_steps=10,
    per_device_train_batch_size=16,
    per_device_eval_batch_size=64,
    num_train_epochs=int(sys.argv[2]) if len(sys.argv) > 2 else 6,
    weight_decay=0.01,
    logging_steps=5,
    report_to="none",
)
trainer = Trainer(model=model, args=args, train_dataset=split["train"], eval_dataset=split["test"],
                  compute_metrics=compute_metrics,
                  callbacks=[babysit.hf.BabysitCallback(run_dir)])
out = babysit.hf.train(trainer)
print("TRAIN OUTPUT", out)
print("BEST", trainer.state.best_model_checkpoint, trainer.state.best_metric)
print("FINAL EVAL", trainer.evaluate())
