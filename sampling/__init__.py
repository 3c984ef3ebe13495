"""Sampling: token sequences from a generator, decoded into images (``sampling.pipeline``),
the fast CUDA paths (``sampling.fast``), the command line (``sampling.generate``) and a page
(``sampling.serve``). MaskGIT's decoding loop lives with the generator (``generator.sampler``)
so that training can draw sample grids; it is re-exported here.

    from sampling import sample_tokens
    tokens = sample_tokens(gen, labels, rng=torch.Generator().manual_seed(0), **gen.sampling)
"""
from generator.sampler import sample_tokens

__all__ = ["sample_tokens"]
