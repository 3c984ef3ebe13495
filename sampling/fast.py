"""Fast paths for sampling on a GPU; each is optional and none changes the eager defaults.

* :class:`StaticSampler` — the sampler's step (:func:`generator.sampler.sampling_step`) with its
  per-step constants held as device tensors, so one compiled graph serves every step of a
  kind; ``compile="reduce-overhead"`` captures each kind as a CUDA graph. The Gumbel noise is
  drawn outside the graph from the caller's ``torch.Generator`` in the eager order, so a seed
  gives the eager sampler's tokens (up to the compiler's float rounding).
* :class:`FastDecoder` — tokens -> images without the id range check (two host syncs), the
  pixel decoder in channels_last, optionally compiled, optionally straight to uint8.
* :func:`pipelined` — run stages (sample, decode, Inception, ...) over a stream of batches
  with each stage on its own CUDA stream, so batch i+1 is generated while batch i decodes.

Modes for ``compile``: "none" (eager), "default", "reduce-overhead" (CUDA graphs),
"max-autotune", "max-autotune-no-cudagraphs". CUDA graphs belong to the sampler only: its
step is launch-bound, the decoder is not, and graphs of several stages that overlap on
different streams would share torch.compile's one graph memory pool.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence

import torch

from generator.sampler import draw_uniforms, plan_steps, sampling_step
from titok_core.errors import UsageError
from titok_core.images import to_uint8

COMPILE_MODES = ("none", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def _compiled(fn: Callable, mode: str) -> Callable:
    if mode not in COMPILE_MODES:
        raise UsageError(f"compile must be one of {', '.join(COMPILE_MODES)}, got {mode!r}")
    if mode == "none":
        return fn
    # fullgraph: a graph break (a host sync, a branch on a tensor value) is an error, not a slow path.
    return torch.compile(fn, mode=None if mode == "default" else mode, fullgraph=True)


def _uses_cudagraphs(mode: str, device: torch.device) -> bool:
    return device.type == "cuda" and mode in ("reduce-overhead", "max-autotune")


class StaticSampler:
    """``sample_tokens`` with static shapes, no host syncs and an optionally compiled step.

    generator: a masked-token generator (eval mode, on its device). sampling: the settings of
    :func:`sampling.sample_tokens` (num_steps, guidance_scale, guidance_decay,
    guidance_scale_pow, randomize_temperature, softmax_temperature_annealing).
    ``sampler(labels, rng)``: labels int64 [B] on the generator's device -> tokens int64 [B,N];
    call it under the same autocast as the eager sampler. With CUDA graphs the tokens are a
    copy, so they stay valid across calls.
    """

    def __init__(self, generator: torch.nn.Module, *, sampling: dict, compile: str = "none"):
        self.generator = generator
        self.guidance_decay = sampling["guidance_decay"]
        self.steps = plan_steps(num_tokens=generator.num_tokens, **sampling)
        self.device = next(generator.parameters()).device
        self.compile = compile
        # Per-step constants as device tensors: one graph per step kind instead of one per step.
        self._floats = torch.tensor(
            [[s.scale, s.temperature, s.divisor] for s in self.steps], dtype=torch.float32, device=self.device
        )
        self._targets = torch.tensor([s.remask_target for s in self.steps], dtype=torch.int64, device=self.device)
        self._step = _compiled(sampling_step, compile)
        self._cudagraphs = _uses_cudagraphs(compile, self.device)

    @torch.no_grad()
    def __call__(self, labels: torch.Tensor, rng: torch.Generator | None = None) -> torch.Tensor:
        gen = self.generator
        labels = labels.long()
        b, n, k = labels.shape[0], gen.num_tokens, gen.codebook_size
        tokens = torch.full((b, n), gen.mask_id, dtype=torch.long, device=labels.device)
        if self._cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
        for i, step in enumerate(self.steps):
            u_logits, u_confidence = draw_uniforms(step, (b, n, k), device=labels.device, rng=rng)
            tokens = self._step(
                gen, tokens, labels, kind=step.kind, guidance_decay=self.guidance_decay, scale=self._floats[i, 0],
                temperature=self._floats[i, 1], divisor=self._floats[i, 2], remask_target=self._targets[i],
                u_logits=u_logits, u_confidence=u_confidence,
            )
        # A CUDA graph's output is overwritten by its next replay.
        return tokens.clone() if self._cudagraphs else tokens


def _decode(tokenizer: torch.nn.Module, tokens: torch.Tensor, uint8: bool) -> torch.Tensor:
    # TiTok.decode minus its id range check, whose min()/max() are host syncs.
    images = tokenizer.decode_latents(tokenizer.quantize.lookup(tokens)).clamp(0.0, 1.0)
    return to_uint8(images) if uint8 else images


class FastDecoder:
    """TiTok tokens -> images, for tokens known to be in range (a sampler's).

    ``decoder(tokens)``: int64 [B,N] in [0, codebook_size) -> float [B,3,H,W] in [0,1] (the
    autocast dtype), or uint8 [B,3,H,W] with ``uint8=True``. ``channels_last`` converts the
    tokenizer's pixel decoder in place (its weights' memory layout only; the values and the
    state dict are unchanged). compile: a mode of :data:`COMPILE_MODES`.
    """

    def __init__(self, tokenizer: torch.nn.Module, *, compile: str = "none", channels_last: bool = False,
                 uint8: bool = False):
        self.tokenizer, self.uint8 = tokenizer, uint8
        if channels_last and hasattr(tokenizer, "pixel_decoder"):
            tokenizer.pixel_decoder.to(memory_format=torch.channels_last)
        self.device = next(tokenizer.parameters()).device
        self._fn = _compiled(_decode, compile)
        self._cudagraphs = _uses_cudagraphs(compile, self.device)

    @torch.no_grad()
    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        if self._cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
        images = self._fn(self.tokenizer, tokens, self.uint8)
        return images.clone() if self._cudagraphs else images


# ---------------------------------------------------------------- stages on CUDA streams


def _tensors(value) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _tensors(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)


def _hand_over(value, stream: torch.cuda.Stream) -> None:
    """Tell the caching allocator that ``stream`` uses value's CUDA tensors (no early reuse)."""
    for t in _tensors(value):
        if t.is_cuda:
            t.record_stream(stream)


def pipelined(
    items: Iterable, stages: Sequence[Callable], *, device: torch.device, overlap: bool = True
) -> Iterator:
    """Yield ``stages[-1](...stages[1](stages[0](item)))`` for each item, in order.

    On CUDA with ``overlap``, stage j runs on its own stream: while stage j works on item i,
    stage j-1 already works on item i+1 (a software pipeline; an event orders each item's
    stages). Each stage must only launch GPU work on the current stream; values are tensors
    or tuples/lists/dicts of them. Results are the same as without overlap; elsewhere
    (CPU, ``overlap=False``) the stages simply run one after the other.
    """
    if not (overlap and device.type == "cuda"):
        for item in items:
            for stage in stages:
                item = stage(item)
            yield item
        return

    main = torch.cuda.current_stream(device)
    streams = [torch.cuda.Stream(device=device) for _ in stages]
    slots: list[tuple[object, torch.cuda.Event] | None] = [None] * len(stages)  # stage j's unconsumed output
    source = iter(items)
    exhausted = False
    while True:
        # The last stage first: its input has waited longest; then each earlier stage refills.
        for j in reversed(range(len(stages))):
            if j == 0:
                if exhausted:
                    continue
                try:
                    value = next(source)
                except StopIteration:
                    exhausted = True
                    continue
                main_done = torch.cuda.Event()
                main_done.record(main)
                ready = main_done
            else:
                if slots[j - 1] is None:
                    continue
                value, ready = slots[j - 1]
                slots[j - 1] = None
            stream = streams[j]
            stream.wait_event(ready)
            _hand_over(value, stream)
            with torch.cuda.stream(stream):
                out = stages[j](value)
                done = torch.cuda.Event()
                done.record(stream)
            slots[j] = (out, done)
            del value
        if slots[-1] is not None:
            out, done = slots[-1]
            slots[-1] = None
            main.wait_event(done)
            _hand_over(out, main)
            yield out
        elif exhausted and all(s is None for s in slots):
            return
