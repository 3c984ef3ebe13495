"""Helpers of the sampler tests: tiny generators and the settings they sample with."""
import torch

from generator import build_generator

SAMPLING = dict(
    num_steps=6, guidance_scale=3.0, guidance_decay="linear", guidance_scale_pow=3.0, randomize_temperature=4.0,
    softmax_temperature_annealing=True,
)


def tiny_generator(arch="imagebert"):
    torch.manual_seed(0)
    return build_generator(dict(
        arch=arch, hidden_size=32, depth=3, num_heads=2, mlp_dim=64, codebook_size=16, num_tokens=10, num_classes=5,
    )).eval()


class FixedLogits(torch.nn.Module):
    """A generator whose logits are the same at every call: float [N,K] for every row."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = logits
        self.num_tokens, self.codebook_size = logits.shape
        self.mask_id, self.null_label, self.num_classes = self.codebook_size, 3, 3

    def forward(self, tokens, labels):
        return self.logits.expand(len(tokens), -1, -1).clone()
