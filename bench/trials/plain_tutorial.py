"""Trial 4, the training script: a plain PyTorch loop written as tutorials write it (an MLP on
scikit-learn's digits, SGD with momentum, OneCycleLR stepped every batch, gradient clipping, a tqdm
bar, `if i % 50 == 0: print(...)`, an evaluation and its own torch.save every epoch), converted as
the README says: `for epoch in run.epochs(n)`, `for i, (x, y) in run.enumerate(tqdm(loader))`,
run.log(loss=loss).

    PYTHONPATH=. python bench/trials/plain_tutorial.py RUN_DIR [EPOCHS]

run_plain_tutorial.py drives it through the CLI (nudge lr and momentum, rollback --skip-batches 3,
SIGTERM, restart).
"""
import os, sys
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from sklearn.datasets import load_digits
from tqdm import tqdm
import babysit

run_dir = sys.argv[1]
num_epochs = int(sys.argv[2]) if len(sys.argv) > 2 else 5
torch.manual_seed(0)
digits = load_digits()
X = torch.tensor(digits.data, dtype=torch.float32) / 16.0
Y = torch.tensor(digits.target)
train_loader = DataLoader(TensorDataset(X[:1500], Y[:1500]), batch_size=16, shuffle=True)
test_x, test_y = X[1500:], Y[1500:]

model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Dropout(0.2), nn.Linear(128, 10))
criterion = nn.CrossEntropyLoss()
optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.1, epochs=num_epochs,
                                                steps_per_epoch=len(train_loader))
os.makedirs(f"{run_dir}-saves", exist_ok=True)

with babysit.Run(run_dir, model, optimizer, scheduler) as run:
    for epoch in run.epochs(num_epochs):
        model.train()
        running_loss = 0.0
        for i, (inputs, labels) in run.enumerate(tqdm(train_loader, desc=f"Epoch {epoch}")):
            optimizer.zero_grad()
            outputs = model(inputs)
            loss = criterion(outputs, labels)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0)
            optimizer.step()
            scheduler.step()
            run.log(loss=loss)
            running_loss += loss.item()
            if i % 50 == 0:
                print(f"[{epoch}, {i:5d}] loss: {loss.item():.3f} lr: {scheduler.get_last_lr()[0]:.5f} "
                      f"momentum: {optimizer.param_groups[0]['momentum']:.4f}")
        model.eval()
        with torch.no_grad():
            acc = (model(test_x).argmax(1) == test_y).float().mean().item()
        print(f"Epoch {epoch}: train loss {running_loss / len(train_loader):.3f}, test acc {acc:.3f}")
        torch.save({"epoch": epoch, "model_state_dict": model.state_dict(),
                    "optimizer_state_dict": optimizer.state_dict()}, f"{run_dir}-saves/model_epoch{epoch}.pt")
print("Finished Training")
