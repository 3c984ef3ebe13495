"""Benchmarks: commands that print throughput and memory figures, apart from the code they measure.

    python -m titok_bench.tokenizer   # TiTok encode / decode
    python -m titok_bench.generator   # generator training steps
    python -m titok_bench.cache       # token cache building
    python -m titok_bench.formats     # dataset formats for the token cache
    python -m titok_bench.sampling    # sampling end to end
    python -m titok_bench.eval        # eval.gfid end to end
"""
