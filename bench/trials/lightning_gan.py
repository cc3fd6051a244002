"""Trial 3, the training script: a Lightning GAN under manual optimization, written as Lightning's
GAN example is (`import lightning.pytorch as L`, self.automatic_optimization = False, two Adam
optimizers and two StepLR schedulers from configure_optimizers, self.optimizers(),
self.manual_backward, toggle_optimizer), on scikit-learn's bundled digits, babysat with
babysit.lightning.BabysitCallback.

    PYTHONPATH=. python bench/trials/lightning_gan.py RUN_DIR [EPOCHS]

run_lightning_gan.py drives it through the CLI (nudge --optimizer 1, rollback, kill -9, restart).
"""
import sys
import torch
from torch import nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset
from sklearn.datasets import load_digits
import lightning.pytorch as L
from babysit.lightning import BabysitCallback


class Generator(nn.Module):
    def __init__(self, latent_dim=16):
        super().__init__()
        self.model = nn.Sequential(nn.Linear(latent_dim, 128), nn.LeakyReLU(0.2), nn.Linear(128, 64), nn.Tanh())

    def forward(self, z):
        return self.model(z).view(-1, 1, 8, 8)


class Discriminator(nn.Module):
    def __init__(self):
        super().__init__()
        self.model = nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.LeakyReLU(0.2), nn.Linear(128, 1))

    def forward(self, x):
        return self.model(x)


class GAN(L.LightningModule):
    def __init__(self, latent_dim=16, lr=2e-4, b1=0.5, b2=0.999):
        super().__init__()
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.generator = Generator(latent_dim)
        self.discriminator = Discriminator()

    def forward(self, z):
        return self.generator(z)

    def training_step(self, batch, batch_idx):
        imgs, _ = batch
        optimizer_g, optimizer_d = self.optimizers()
        z = torch.randn(imgs.shape[0], self.hparams.latent_dim).type_as(imgs)

        # train generator
        self.toggle_optimizer(optimizer_g)
        valid = torch.ones(imgs.size(0), 1).type_as(imgs)
        g_loss = F.binary_cross_entropy_with_logits(self.discriminator(self(z)), valid)
        self.log("g_loss", g_loss, prog_bar=True)
        self.manual_backward(g_loss)
        optimizer_g.step()
        optimizer_g.zero_grad()
        self.untoggle_optimizer(optimizer_g)

        # train discriminator
        self.toggle_optimizer(optimizer_d)
        real_loss = F.binary_cross_entropy_with_logits(self.discriminator(imgs), valid)
        fake = torch.zeros(imgs.size(0), 1).type_as(imgs)
        fake_loss = F.binary_cross_entropy_with_logits(self.discriminator(self(z).detach()), fake)
        d_loss = (real_loss + fake_loss) / 2
        self.log("d_loss", d_loss, prog_bar=True)
        self.manual_backward(d_loss)
        optimizer_d.step()
        optimizer_d.zero_grad()
        self.untoggle_optimizer(optimizer_d)

    def on_train_epoch_end(self):
        for sch in self.lr_schedulers():
            sch.step()

    def configure_optimizers(self):
        lr, b1, b2 = self.hparams.lr, self.hparams.b1, self.hparams.b2
        opt_g = torch.optim.Adam(self.generator.parameters(), lr=lr, betas=(b1, b2))
        opt_d = torch.optim.Adam(self.discriminator.parameters(), lr=lr, betas=(b1, b2))
        sch_g = torch.optim.lr_scheduler.StepLR(opt_g, step_size=2, gamma=0.9)
        sch_d = torch.optim.lr_scheduler.StepLR(opt_d, step_size=2, gamma=0.9)
        return [opt_g, opt_d], [sch_g, sch_d]


if __name__ == "__main__":
    run_dir = sys.argv[1]
    epochs = int(sys.argv[2]) if len(sys.argv) > 2 else 10
    L.seed_everything(42)
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 8 - 1
    y = torch.tensor(digits.target)
    dm = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True, num_workers=0)
    model = GAN()
    trainer = L.Trainer(accelerator="auto", devices=1, max_epochs=epochs,
                        callbacks=[BabysitCallback(run_dir)], logger=False, enable_checkpointing=False)
    trainer.fit(model, dm)
    print("DONE epoch", trainer.current_epoch, "step", trainer.global_step,
          "lrs", [o.param_groups[0]["lr"] for o in trainer.optimizers])
