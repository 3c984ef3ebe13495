"""A local web page for sampling: pick a class by name, set the knobs, press Generate, see the grid.

    python -m sampling.serve                        # the latest demo run, on http://127.0.0.1:7860
    python -m sampling.serve generator.spec=maskgit_l32 generator.checkpoint=generator_titok_l32.bin \\
        tokenizer.checkpoint=tokenizer_titok_l32.bin port=8080

Takes the model arguments of ``sampling.generate`` (conf/sampling/serve.yaml). The page sets n,
guidance scale and schedule, temperature, steps and seed; it shows the grid, offers the PNGs as
a zip and prints the ``python -m sampling.generate`` command line that writes the same images.
Requests wait in a queue and run one at a time; the model stays loaded between them.
Needs the ``serve`` extra (gradio).
"""
from __future__ import annotations

import html
import importlib.util
import logging
import math
import re
import shlex
import shutil
import signal
import sys
import tempfile
import threading
import time
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig

from generator.official import GUIDANCE_DECAYS
from generator.sampler import SAMPLING_KEYS, SAMPLING_RANGES
from sampling.classes import class_choice, class_names, find_class
from sampling.pipeline import (
    RENAMED_MODEL_KEYS,
    Pipeline,
    load_pipeline,
    pipeline_kwargs,
    sample_images,
    save_samples,
)
from titok_core.cli import Ranges, hydra_entry
from titok_core.errors import MissingPackageError, UsageError, UserError, exit_on_user_error
from titok_core.runtime import pick_device, resolve_dtype

MAX_SEED = 2**31 - 1  # a range that every number box (JavaScript doubles) and tool keeps exact
KEEP_RESULTS = 8  # request folders kept on disk (the page holds its own copies)
_PLAIN = r"[A-Za-z_./][\w./+-]*"  # override values Hydra reads back as the same string unquoted


@dataclass
class Samples:
    """One request's result: the sample PNGs in order, the grid, a zip of both, the labels,
    the equivalent ``sampling.generate`` command line and a one-line summary."""

    images: list[Path]
    grid: Path
    zip: Path
    labels: list[int]
    command: str
    summary: str


def _whole(name: str, value, low: int, high: int) -> int:
    if value is None or value == "":
        raise UsageError(f"{name} is empty")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise UsageError(f"{name} must be a whole number, got {value!r}") from None
    if not number.is_integer() or not low <= number <= high:
        raise UsageError(f"{name} must be a whole number from {low} to {high}, got {value}")
    return int(number)


def _real(name: str, value, low: float) -> float:
    if value is None or value == "":
        raise UsageError(f"{name} is empty")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise UsageError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(number) or number < low:
        raise UsageError(f"{name} must be a number >= {low:g}, got {value}")
    return number


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _override(value) -> str:
    """A value as Hydra reads it back from the command line (then quoted for the shell)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    text = str(value)
    if re.fullmatch(_PLAIN, text) and text.lower() not in ("true", "false", "null") and not _is_float(text):
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def generate_command(args: Mapping) -> str:
    """``python -m sampling.generate k=v ...`` for ``args`` in order, None values left out."""
    parts = [shlex.quote(f"{k}={_override(v)}") for k, v in args.items() if v is not None]
    return " ".join(["python -m sampling.generate", *parts])


class SamplingService:
    """The page's work, free of any web framework: validate a request, sample, write the files.

    pipe: a loaded :class:`Pipeline` on ``device``. model_args: the generator/tokenizer arguments
    it was loaded from (echoed in the command line). Results go to folders under ``out_dir``;
    the last ``KEEP_RESULTS`` are kept.
    """

    def __init__(
        self, pipe: Pipeline, *, model_args: Mapping, out_dir: str | Path, device: str = "auto", dtype: str = "auto",
        batch_size: int = 32, max_n: int = 64, max_steps: int = 128,
    ):
        self.pipe, self.device, self.dtype = pipe, device, dtype
        # as sampling.generate spells them: generator.spec=..., tokenizer.checkpoint=...
        self.model_args = {f"{group}.{k}": v for group in ("generator", "tokenizer")
                           for k, v in (model_args.get(group) or {}).items()}
        self.batch_size, self.max_n, self.max_steps = batch_size, max_n, max_steps
        self.out_dir = Path(out_dir)
        self.names = class_names(pipe.generator.num_classes, pipe.classes)
        self.choices = [class_choice(i, name) for i, name in enumerate(self.names)]
        self._lock = threading.Lock()  # one sampling at a time, also outside the page's queue
        self._requests = 0

    def sample(
        self, *, class_query, n, guidance_scale, guidance_decay, temperature, num_steps, seed,
        on_step: Callable[[int, int], None] | None = None,
    ) -> Samples:
        """Check the inputs (UsageError with a short message naming the bad one), then sample n
        images of the class; on_step(done, total) reports progress."""
        label = find_class(class_query, self.names)
        n = _whole("n", n, 1, self.max_n)
        settings = dict(self.pipe.sampling)
        settings["guidance_scale"] = _real("guidance scale", guidance_scale, 0)
        if guidance_decay not in GUIDANCE_DECAYS:
            raise UsageError(f"guidance schedule must be one of {', '.join(GUIDANCE_DECAYS)}, got {guidance_decay!r}")
        settings["guidance_decay"] = guidance_decay
        settings["randomize_temperature"] = _real("temperature", temperature, 0)
        settings["num_steps"] = _whole("steps", num_steps, 1, self.max_steps)
        seed = _whole("seed", seed, 0, MAX_SEED)

        labels = torch.full((n,), label, dtype=torch.long)
        with self._lock:
            self._requests += 1
            out = self.out_dir / f"request{self._requests:05d}"
            start = time.perf_counter()
            images = sample_images(
                self.pipe, labels, seed=seed, batch_size=self.batch_size, dtype=self.dtype, sampling=settings,
                on_step=on_step,
            )
            seconds = time.perf_counter() - start
            paths, grid = save_samples(images, labels, out)
            archive = out / "samples.zip"
            with zipfile.ZipFile(archive, "w") as zf:  # PNGs are compressed already: store them
                for path in [*paths, grid]:
                    zf.write(path, path.name)
            self._prune()
        command = generate_command({
            "class": label, "n": n, "seed": seed, **self.model_args, "batch_size": self.batch_size,
            "device": None if self.device == "auto" else self.device,
            "dtype": None if self.dtype == "auto" else self.dtype,
            **{f"sampling.{k}": settings[k] for k in SAMPLING_KEYS if k in settings},
        })
        size = images.shape[-1]
        summary = (
            f"{n} sample{'s' if n > 1 else ''} of class {label} ({self.names[label]}), {size}x{size}, seed {seed}: "
            f"{settings['num_steps']} steps, guidance {settings['guidance_scale']:g} {guidance_decay}, "
            f"temperature {settings['randomize_temperature']:g}; {seconds:.{1 if seconds >= 1 else 2}f} s"
        )
        return Samples(paths, grid, archive, labels.tolist(), command, summary)

    def _prune(self) -> None:
        folders = sorted(p for p in self.out_dir.glob("request*") if p.is_dir())
        for old in folders[:-KEEP_RESULTS]:
            shutil.rmtree(old, ignore_errors=True)


def handle_request(service: SamplingService, class_query, n, guidance_scale, guidance_decay, temperature, num_steps,
                   seed, progress: Callable | None = None) -> tuple[str, str, str, str]:
    """The Generate button: the page's inputs -> (grid PNG path, zip path, summary, command line).

    Bad input raises ``gradio.Error`` with the one-line message, which the page shows as a notice.
    progress: a ``gradio.Progress`` (called with ((done, total), desc)) or None.
    """
    import gradio as gr

    def on_step(done: int, total: int) -> None:
        if progress is not None:
            progress((done, total), desc="sampling", unit="steps")

    try:
        result = service.sample(
            class_query=class_query, n=n, guidance_scale=guidance_scale, guidance_decay=guidance_decay,
            temperature=temperature, num_steps=num_steps, seed=seed, on_step=on_step,
        )
    except UserError as exc:
        # gradio renders the message as HTML: what the user typed must show as text
        raise gr.Error(html.escape(str(exc), quote=False), title="Cannot sample", print_exception=False) from None
    return str(result.grid), str(result.zip), result.summary, result.command


def build_page(service: SamplingService, *, initial: Mapping | None = None):
    """The gradio page for ``service``; ``initial`` holds the first values of its inputs
    (class, n, seed and the sampling keys; missing or None: the pipeline's settings)."""
    import gradio as gr

    initial = {k: v for k, v in (initial or {}).items() if v is not None}
    first_n = min(_whole("n", initial.get("n", 16), 1, 2**31), service.max_n)
    settings = {**service.pipe.sampling, **initial}
    first_class = find_class(initial.get("class", 0), service.names)
    gen = service.pipe.generator
    description = (
        f"Generator `{service.pipe.source}`: {gen.num_classes} classes, {gen.num_tokens} tokens of "
        f"{gen.codebook_size} codes; {service.pipe.tokenizer.image_size}x{service.pipe.tokenizer.image_size} images, "
        f"sampled on {next(gen.parameters()).device.type}."
    )
    with gr.Blocks(title="titok-gen sampling", analytics_enabled=False, delete_cache=(600, 3600)) as page:
        gr.Markdown(f"## titok-gen: class-conditional samples\n{description}")
        with gr.Row():
            with gr.Column(scale=1, min_width=280):
                klass = gr.Dropdown(
                    service.choices, value=service.choices[first_class], label="class",
                    info="type part of a name, then pick it", allow_custom_value=True, filterable=True,
                    elem_id="class",
                )
                n = gr.Slider(1, service.max_n, value=first_n, step=1, label="n", elem_id="n")
                scale = gr.Number(settings["guidance_scale"], label="guidance scale", elem_id="guidance-scale")
                decay = gr.Dropdown(
                    list(GUIDANCE_DECAYS), value=settings["guidance_decay"], label="guidance schedule",
                    elem_id="guidance-schedule",
                )
                temperature = gr.Number(
                    settings["randomize_temperature"], label="temperature", info="Gumbel noise on the token choices",
                    elem_id="temperature",
                )
                steps = gr.Slider(
                    1, service.max_steps, value=settings["num_steps"], step=1, label="steps", elem_id="steps",
                )
                seed = gr.Number(initial.get("seed", 0), label="seed", precision=0, elem_id="seed")
                button = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Column(scale=2):
                grid = gr.Image(
                    label="samples", type="filepath", format="png", interactive=False, elem_id="grid",
                    buttons=["download", "fullscreen"],
                )
                archive = gr.File(label="PNGs (zip: every sample and the grid)", interactive=False, elem_id="download")
                summary = gr.Markdown(elem_id="summary")
                command = gr.Textbox(
                    label="the same images from the command line", lines=2, max_lines=8, interactive=False,
                    buttons=["copy"], elem_id="command",
                )

        def on_generate(class_query, n, guidance_scale, guidance_decay, temperature, num_steps, seed,
                        progress=gr.Progress()):
            return handle_request(
                service, class_query, n, guidance_scale, guidance_decay, temperature, num_steps, seed, progress=progress
            )

        button.click(
            on_generate, inputs=[klass, n, scale, decay, temperature, steps, seed],
            outputs=[grid, archive, summary, command], concurrency_limit=1, api_name="generate",
        )
    return page.queue(default_concurrency_limit=1)


# Small samples (64x64 demo images) are scaled up with their pixels kept sharp, large grids
# scaled down to the column; the command line reads best in a fixed-width font.
PAGE_CSS = """
#grid img { width: 100%; height: auto; max-height: 75vh; object-fit: contain; image-rendering: pixelated; }
#command textarea { font-family: var(--font-mono); }
"""


def page_style() -> dict:
    """launch() arguments for the page's look. System fonts only: the default theme loads its
    font from the web, and the page must work offline."""
    import gradio as gr

    theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])
    return {"theme": theme, "css": PAGE_CSS}


def _main(cfg: DictConfig) -> None:
    with exit_on_user_error(), tempfile.TemporaryDirectory(prefix="titok-serve-") as out_dir:
        if importlib.util.find_spec("gradio") is None:  # say so before minutes of model loading
            raise MissingPackageError("the page needs gradio: pip install 'titok-gen[serve]'")
        logging.getLogger("httpx").setLevel(logging.WARNING)  # gradio's own start-up checks, one line each
        device = pick_device(cfg.device)
        resolve_dtype(device, cfg.dtype)  # a bad dtype fails now, not at the first request
        kwargs = pipeline_kwargs(cfg)
        pipe = load_pipeline(**kwargs).to(device)
        service = SamplingService(
            pipe, model_args=kwargs, out_dir=out_dir, device=cfg.device, dtype=cfg.dtype,
            batch_size=cfg.batch_size, max_n=cfg.max_n, max_steps=cfg.max_steps,
        )
        page = build_page(service, initial={**{k: cfg[k] for k in ("class", "n", "seed")}, **cfg.sampling})
        try:
            _, url, _ = page.launch(
                server_name=cfg.host, server_port=cfg.port, prevent_thread_lock=True, quiet=True, show_error=True,
                ssr_mode=False, mcp_server=False, **page_style(),
            )
        except OSError:  # gradio's own message names its launch() arguments
            raise UsageError(
                f"cannot listen on {cfg.host}:{cfg.port} (port in use, or not an address of this machine): "
                "pass another port=... or host=..."
            ) from None
        print(f"sampling page on {url} (generator {pipe.source}, {len(service.names)} classes); Ctrl+C stops it",
              flush=True)
        # A plain `kill` (SIGTERM) stops it as Ctrl+C does: server closed, request files removed.
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        try:
            page.block_thread()
        finally:
            page.close()


main = hydra_entry(config="sampling/serve", description=__doc__, renamed=RENAMED_MODEL_KEYS,
                   scalar_groups={"generator": "generator.spec", "tokenizer": "tokenizer.spec"},
                   ranges=SAMPLING_RANGES | Ranges(at_least_one=("n", "batch_size", "max_n", "max_steps"),
                                                   not_negative=("seed",)),
                   on_interrupt="stopped")(_main)


if __name__ == "__main__":
    main()
