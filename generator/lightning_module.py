"""Masked-token training of the generator (the official MaskGIT recipe) as a LightningModule.

The recipe: t ~ U(0,1) per sequence, round(L * arccos(t) / (pi/2)) positions masked (at
least one); cross-entropy with label smoothing 0.1 weighted 1 on masked and 0.1 on unmasked
positions; class labels dropped to the null label with probability 0.1 (for guidance); AdamW
(2e-4, betas 0.9/0.96, weight decay 0.03 on matrices only), linear warm-up then cosine to
1e-5; gradient clipping 1.0 (Trainer); EMA of the weights (``titok_core.trainer.ema_callback``).

Besides the recipe, the masked-diffusion alternative (``mask_schedule="linear"``,
``loss_weighting="elbo"``): the masked fraction drawn uniformly, and each sequence weighing the
same whatever its number of masked tokens (the mean over its masked tokens), which is the ELBO
of a masked diffusion model with the linear schedule (Shi et al. 2024, Sahoo et al. 2024) up to
the rounding of the masked count. The official weighting averages over all masked tokens of the
batch, so sequences with many masked tokens count for more.
"""
from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback

from generator.mask_schedule import MASK_SCHEDULES
from generator.model import build_generator
from generator.sampler import sample_tokens
from titok_core.errors import UsageError
from titok_core.images import save_png
from titok_core.lr_schedule import warmup_cosine
from titok_core.trainer import param_groups


def mask_tokens(
    tokens: torch.Tensor, mask_id: int, *, generator: torch.Generator | None = None, schedule: str = "arccos",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask a random subset of each row, its size drawn from the mask ``schedule`` (arccos: the official).

    tokens int64 [B,L] -> (inputs int64 [B,L] with ``mask_id`` where masked, mask bool [B,L]).
    """
    b, length = tokens.shape
    t = torch.rand(b, device=tokens.device, generator=generator)
    ratio = MASK_SCHEDULES[schedule](t).clamp(1e-6, 1.0)
    num_masked = (length * ratio).round().clamp(min=1)
    ranks = torch.rand(b, length, device=tokens.device, generator=generator).argsort(dim=-1)
    mask = ranks < num_masked[:, None]
    return torch.where(mask, mask_id, tokens), mask


def masked_token_loss(
    logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, *, label_smoothing: float = 0.1,
    unmasked_weight: float = 0.1, weighting: str = "official",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted cross-entropy over all positions and accuracy on the masked ones.

    logits float [B,L,K], targets int64 [B,L], mask bool [B,L] -> (loss scalar, accuracy scalar).
    weighting: "official" (masked positions 1, unmasked ``unmasked_weight``, over the sum of the
    weights) or "elbo" (a masked position of a row with m of L masked weighs L / m, an unmasked one
    ``unmasked_weight``, over B * L: every row's masked tokens count as its mean).
    """
    logits = logits.float()  # the loss in fp32; the argmax below is also faster on fp32 than on bf16 on CPUs
    ce = F.cross_entropy(logits.transpose(1, 2), targets, label_smoothing=label_smoothing, reduction="none")
    if weighting == "elbo":
        per_row = mask.shape[1] / mask.sum(1, keepdim=True).clamp(min=1)
        weights = torch.where(mask, per_row, unmasked_weight)
        loss = (ce * weights).sum() / mask.numel()
    else:
        weights = torch.where(mask, 1.0, unmasked_weight)
        loss = (ce * weights).sum() / (weights.sum() + 1e-8)
    hits = ((logits.argmax(-1) == targets) & mask).sum(1) / mask.sum(1).clamp(min=1)
    return loss, hits.float().mean()


LOSS_WEIGHTINGS = ("official", "elbo")
# The official exclusion, besides vectors: norms, biases, embeddings and the mask token.
NO_DECAY_KEYS = ("norm", "bias", "embed", "mask_token")


class MaskGITModule(L.LightningModule):
    """Owns the loss, optimiser and logging; the network is a plain generator from ``build_generator``."""

    def __init__(
        self, *, model_config: dict, lr: float = 2e-4, betas: tuple[float, float] = (0.9, 0.96),
        weight_decay: float = 0.03, warmup_steps: int = 10_000, max_steps: int = 500_000, end_lr: float = 1e-5,
        label_smoothing: float = 0.1, unmasked_weight: float = 0.1, class_dropout: float = 0.1,
        mask_schedule: str = "arccos", loss_weighting: str = "official", ema: bool = True, ema_decay: float = 0.999,
        fused_adamw: bool | None = None, compile: bool = False,
    ):
        """The keyword arguments are the ``optim`` config group of ``generator.train``. ema, ema_decay:
        the EMA of the weights, which the entry point adds as ``titok_core.trainer.ema_callback``.
        fused_adamw: the fused AdamW kernel (None: on CUDA and CPUs, without fp16 loss scaling); compile:
        torch.compile the network and the loss (the masking stays eager). Neither changes the recipe."""
        super().__init__()
        if mask_schedule not in MASK_SCHEDULES:
            raise UsageError(f"optim.mask_schedule={mask_schedule}: expected one of {', '.join(MASK_SCHEDULES)}")
        if loss_weighting not in LOSS_WEIGHTINGS:
            raise UsageError(f"optim.loss_weighting={loss_weighting}: expected one of {', '.join(LOSS_WEIGHTINGS)}")
        self.save_hyperparameters()
        self.model = build_generator(dict(model_config))

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.model(tokens, labels)

    def _step(self, batch, *, train: bool):
        tokens, labels = batch
        if train and self.hparams.class_dropout > 0:
            drop = torch.rand(labels.shape, device=labels.device) < self.hparams.class_dropout
            labels = torch.where(drop, self.model.null_label, labels)
        hp = self.hparams
        inputs, mask = mask_tokens(tokens, self.model.mask_id, schedule=hp.get("mask_schedule", "arccos"))
        network, loss_fn = self._compiled() if self.hparams.get("compile") else (self.model, masked_token_loss)
        logits = network(inputs, labels)
        return loss_fn(
            logits, tokens, mask, label_smoothing=hp.label_smoothing, unmasked_weight=hp.unmasked_weight,
            weighting=hp.get("loss_weighting", "official"),
        )

    def training_step(self, batch, batch_idx):
        loss, acc = self._step(batch, train=True)
        self.log_dict({"train/loss": loss, "train/masked_acc": acc}, prog_bar=True, batch_size=batch[0].shape[0])
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], batch_size=batch[0].shape[0])
        return loss

    def validation_step(self, batch, batch_idx):
        loss, acc = self._step(batch, train=False)
        self.log_dict({"val/loss": loss, "val/masked_acc": acc}, sync_dist=True, batch_size=batch[0].shape[0])

    def configure_optimizers(self):
        hp = self.hparams
        groups = param_groups(self.model.named_parameters(), weight_decay=hp.weight_decay, no_decay_keys=NO_DECAY_KEYS)
        opt = torch.optim.AdamW(groups, lr=hp.lr, betas=tuple(hp.betas), fused=self._fused_adamw() or None)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt,
            lambda step: warmup_cosine(
                step, warmup_steps=hp.warmup_steps, max_steps=hp.max_steps, base_lr=hp.lr, end_lr=hp.end_lr
            ) / hp.lr,
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def _compiled(self) -> tuple:
        # Kept in __dict__, not as a submodule: the state dict keeps its keys.
        if "_compiled_parts" not in self.__dict__:
            self.__dict__["_compiled_parts"] = (torch.compile(self.model), torch.compile(masked_token_loss))
        return self.__dict__["_compiled_parts"]

    def __getstate__(self):
        state = super().__getstate__()
        state.pop("_compiled_parts", None)  # the EMA's deep copy takes the weights, not compiled code
        return state

    def _grad_scaler(self):
        trainer = self._trainer
        return getattr(trainer.precision_plugin, "scaler", None) if trainer is not None else None

    def _fused_adamw(self) -> bool:
        fused = self.hparams.get("fused_adamw")
        if fused is None:  # fp16 loss scaling would unscale inside the fused step, before clipping
            fused = self.device.type in ("cuda", "cpu") and self._grad_scaler() is None
        return bool(fused)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        # Lightning's mixed-precision plugin refuses to clip for any fused optimizer, because with
        # fp16 loss scaling it unscales inside step(). Without a scaler (bf16, fp32) the gradients
        # are already unscaled, so clipping them here is the same clipping the Trainer would do.
        if not (gradient_clip_val and self._fused_adamw() and self._grad_scaler() is None):
            return super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        params = [p for group in optimizer.param_groups for p in group["params"]]
        if gradient_clip_algorithm in (None, "norm"):
            torch.nn.utils.clip_grad_norm_(params, gradient_clip_val)
        else:
            torch.nn.utils.clip_grad_value_(params, gradient_clip_val)


class SampleGrid(Callback):
    """Every ``every_n_steps`` steps, sample two images of each of ``num_classes`` classes with the
    current weights (``sampling``: the settings of :func:`generator.sampler.sample_tokens`), decode
    them with ``tokenizer`` and write ``<out_dir>/samples_step<N>.png``."""

    def __init__(self, *, tokenizer, sampling: dict, every_n_steps: int, num_classes: int, out_dir: Path):
        self.tokenizer, self.sampling = tokenizer, sampling
        self.every, self.num_classes, self.out_dir = every_n_steps, num_classes, out_dir

    def write(self, pl_module: MaskGITModule, step: int) -> Path:
        model = pl_module.model
        was_training = model.training
        model.eval()
        labels = torch.arange(self.num_classes, device=pl_module.device) % model.num_classes
        rng = torch.Generator(device=pl_module.device).manual_seed(0)
        tokens = sample_tokens(model, labels.repeat_interleave(2), rng=rng, **self.sampling)
        self.tokenizer.to(pl_module.device)
        images = self.tokenizer.decode(tokens)
        model.train(was_training)
        return save_png(images, self.out_dir / f"samples_step{step:07d}.png", nrow=8)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if self.every and step % self.every == 0 and trainer.is_global_zero:
            self.write(pl_module, step)
