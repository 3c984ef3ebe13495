"""sampling.serve: the request handler in-process, and the page itself in headless Chromium.

Both run a tiny random-weights generator and tokenizer made here (32x32 images, 8 tokens,
16 codes, the demo's 10 class names). The browser test starts ``python -m sampling.serve`` as a
user does and drives Debian's chromium through Playwright; it skips only where no chromium is
installed (scripts/setup.sh installs it where it can).
"""
from __future__ import annotations

import html
import io
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import zipfile
from pathlib import Path

import gradio as gr
import pytest
import torch
from PIL import Image

from titok_core.demo_shapes import CLASS_NAMES

from commands import PAD, assert_one_line_error  # tests/ is on sys.path under pytest
from commands import run_module as run_cli
from conftest import REPO

SIZE = 32  # the tiny tokenizer's images
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run", "--disable-quic",
]
SAMPLING = {
    "num_steps": 4, "guidance_scale": 2.0, "guidance_decay": "constant", "guidance_scale_pow": 3.0,
    "randomize_temperature": 1.0, "softmax_temperature_annealing": True,
}


def make_tiny_models(folder: Path) -> Path:
    """A random TiTok and a random ImageBert that records it, its sampling settings and class names;
    returns the generator file (all ``sampling.serve`` needs)."""
    from generator import build_generator
    from titok_core.checkpoints import save_model_file
    from tokenizer import build_tokenizer

    torch.manual_seed(0)
    folder.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer({
        "image_size": SIZE, "patch_size": 8, "enc_width": 32, "enc_depth": 1, "enc_heads": 2, "dec_width": 32,
        "dec_depth": 1, "dec_heads": 2, "num_tokens": 8, "codebook_size": 16, "token_size": 4,
        "legacy_layout": False, "decoder_output": "rgb",
    })
    save_model_file(folder / "tokenizer.safetensors", kind="tokenizer", config=tok.config.to_dict(), state_dict=tok.state_dict())
    gen = build_generator({
        "arch": "imagebert", "hidden_size": 32, "depth": 1, "num_heads": 2, "mlp_dim": 64, "codebook_size": 16,
        "num_tokens": 8, "num_classes": len(CLASS_NAMES),
    })
    extra = {"sampling": SAMPLING, "classes": CLASS_NAMES, "tokenizer": {"spec": str(folder / "tokenizer.safetensors")}}
    path = folder / "generator.safetensors"
    save_model_file(path, kind="generator", config=gen.config, state_dict=gen.state_dict(), extra=extra)
    return path


@pytest.fixture(scope="module")
def tiny_generator(tmp_path_factory) -> Path:
    return make_tiny_models(tmp_path_factory.mktemp("tiny_models"))


def png_sizes(pngs: dict[str, bytes]) -> dict[str, tuple[int, int]]:
    """Decode each PNG fully (a broken file raises) and return its size."""
    sizes = {}
    for name, data in pngs.items():
        with Image.open(io.BytesIO(data)) as im:
            assert im.format == "PNG", name
            im.load()
            sizes[name] = im.size
    return sizes


def grid_size(n: int, size: int = SIZE) -> tuple[int, int]:
    cols, rows = min(8, n), -(-n // 8)
    return cols * size + (cols + 1) * PAD, rows * size + (rows + 1) * PAD


# ---------------------------------------------------------------- class names


def test_class_names_and_lookup():
    from sampling.classes import class_names, find_class

    imagenet = class_names(1000)  # a released ImageNet generator records no names
    assert len(imagenet) == len(set(imagenet)) == 1000
    assert (imagenet[0], imagenet[207], imagenet[999]) == ("tench", "golden retriever", "toilet tissue")
    wnids = [f"n{i:08d}" for i in range(1000)]  # one of ours trained on ImageNet's folders
    assert class_names(1000, wnids) == imagenet
    assert class_names(10, CLASS_NAMES) == CLASS_NAMES
    assert class_names(3, ["a", "b"]) == ["class 0", "class 1", "class 2"]  # a list that does not fit is not used

    assert find_class("golden retr", imagenet) == find_class("Golden Retriever", imagenet) == 207
    assert find_class("207: golden retriever", imagenet) == find_class(" 207 ", imagenet) == 207
    assert find_class("red circle", CLASS_NAMES) == find_class("circle", CLASS_NAMES) == 0
    with pytest.raises(ValueError) as caught:
        find_class("retriever", imagenet)
    assert str(caught.value) == ("'retriever' is part of 5 class names (flat-coated retriever, curly-coated retriever, "
                                 "golden retriever, Labrador retriever, ...): pick one")


# ---------------------------------------------------------------- the request handler, in-process


@pytest.fixture()
def service(tiny_generator, tmp_path):
    from sampling.pipeline import load_pipeline
    from sampling.serve import SamplingService

    # A path that needs quoting both for the shell and for Hydra, to test the command line echo.
    odd = tmp_path / "my models" / "gen's.safetensors"
    odd.parent.mkdir()
    shutil.copy(tiny_generator, odd)
    pipe = load_pipeline(generator={"checkpoint": odd})
    return SamplingService(pipe, model_args={"generator": {"checkpoint": str(odd)}}, out_dir=tmp_path / "out",
                           batch_size=2, max_n=8)


GOOD = dict(class_query="3: 03_yellow_star", n=3, guidance_scale=1.5, guidance_decay="linear", temperature=2.0,
            num_steps=3, seed=5)


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"class_query": "zzz"}, "no class name contains 'zzz'"),
        ({"class_query": " "}, "no class picked: type part of a class name and pick one"),
        ({"class_query": "ar"}, "'ar' is part of 4 class names (01_green_square, 03_yellow_star, 07_white_heart, "
                                "08_purple_arrow): pick one"),
        ({"class_query": "r"}, "'r' is part of 10 class names (00_red_circle, 01_green_square, 02_blue_triangle, "
                               "03_yellow_star, ...): pick one"),
        ({"class_query": "12"}, "class 12 is out of range: this generator has classes 0..9"),
        ({"n": 0}, "n must be a whole number from 1 to 8, got 0"),
        ({"n": 9}, "n must be a whole number from 1 to 8, got 9"),
        ({"n": 2.5}, "n must be a whole number from 1 to 8, got 2.5"),
        ({"guidance_scale": -1}, "guidance scale must be a number >= 0, got -1"),
        ({"guidance_scale": float("nan")}, "guidance scale must be a number >= 0, got nan"),
        ({"guidance_decay": "cosine"}, "guidance schedule must be one of constant, linear, power-cosine, got 'cosine'"),
        ({"temperature": None}, "temperature is empty"),
        ({"num_steps": 0}, "steps must be a whole number from 1 to 128, got 0"),
        ({"seed": -1}, "seed must be a whole number from 0 to 2147483647, got -1"),
        ({"class_query": "<b>x</b>"}, "no class name contains '<b>x</b>'"),
    ],
    ids=lambda v: next(iter(v)) if isinstance(v, dict) else "",
)
def test_handler_rejects_bad_input(service, bad, message):
    from sampling.serve import handle_request

    request = {**GOOD, **bad}
    with pytest.raises(gr.Error) as caught:
        handle_request(service, *request.values())
    assert caught.value.message == html.escape(message, quote=False)  # the page renders it as HTML
    assert not service.out_dir.exists() or not list(service.out_dir.rglob("*.png"))


def test_handler_samples_and_echoes_the_generate_command(service, tmp_path):
    """The page's files: n PNGs + grid (zip), progress per sampler step; the echoed command line
    makes sampling.generate write byte-identical PNGs."""
    from sampling.generate import generate, generate_kwargs
    from sampling.serve import handle_request

    from conftest import compose_config

    steps = []
    grid, archive, summary, command = handle_request(
        service, *{**GOOD, "class_query": "Yellow Star"}.values(), progress=lambda p, desc, unit: steps.append(p)
    )
    odd = str(tmp_path / "my models" / "gen's.safetensors").replace("'", "\\'")  # Hydra's escape in quotes
    assert shlex.split(command) == [
        "python", "-m", "sampling.generate", "class=3", "n=3", "seed=5", f"generator.checkpoint='{odd}'",
        "batch_size=2", "sampling.num_steps=3", "sampling.guidance_scale=1.5", "sampling.guidance_decay=linear",
        "sampling.guidance_scale_pow=3.0", "sampling.randomize_temperature=2.0",
        "sampling.softmax_temperature_annealing=true",
    ]
    assert summary.startswith("3 samples of class 3 (03_yellow_star), 32x32, seed 5: 3 steps, guidance 1.5 linear, "
                              "temperature 2; ")
    assert steps == [(i, 8) for i in range(1, 9)]  # 2 batches x (3 steps + decode)

    with zipfile.ZipFile(archive) as zf:
        pngs = {name: zf.read(name) for name in zf.namelist()}
    names = [f"sample_{i:05d}_class3.png" for i in range(3)]
    assert list(pngs) == [*names, "grid.png"]
    assert png_sizes(pngs) == {**{name: (SIZE, SIZE) for name in names}, "grid.png": grid_size(3)}
    assert Path(grid).read_bytes() == pngs["grid.png"]
    assert len({pngs[name] for name in names}) == 3  # temperature 2: samples of one class differ

    cfg = compose_config("sampling.generate", [*shlex.split(command)[3:], f"out_dir={tmp_path / 'cli'}"])
    result = generate(**generate_kwargs(cfg))
    assert [Path(p).name for p in result["images"]] == names
    assert {Path(p).name: Path(p).read_bytes() for p in [*result["images"], result["grid"]]} == pngs


# ---------------------------------------------------------------- the page, in a real browser


def _chromium() -> str | None:
    return "/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else shutil.which("chromium")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def page_url(tiny_generator, tmp_path_factory):
    """``python -m sampling.serve`` on a free port, as a user starts it; its URL once it answers."""
    if _chromium() is None:
        pytest.skip("no chromium browser installed (apt-get install chromium; scripts/setup.sh does it as root)")
    cwd = tmp_path_factory.mktemp("serve")
    port = _free_port()
    tmp = tmp_path_factory.mktemp("serve_tmp")
    env = {
        **os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        "TMPDIR": str(tmp),
    }
    log = open(cwd / "serve.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "sampling.serve", f"generator.checkpoint={tiny_generator}", f"port={port}", "max_n=8"],
        cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 180  # imports and model loading, on a busy 2-core machine
        while f"sampling page on {url}" not in (cwd / "serve.log").read_text():  # printed once it listens
            assert proc.poll() is None, (cwd / "serve.log").read_text()
            assert time.monotonic() < deadline, "the server did not start in 180 s: " + (cwd / "serve.log").read_text()
            time.sleep(0.5)
        with urllib.request.urlopen(url, timeout=30) as response:
            assert response.status == 200
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
    assert proc.returncode == 0, (cwd / "serve.log").read_text()
    assert [p.name for p in cwd.iterdir()] == ["serve.log"], "the server wrote files in its working directory"
    assert not list(tmp.glob("titok-serve-*")), "the request files outlived the server"


def test_page_in_browser(page_url, tiny_generator, tmp_path):
    """Type part of a class name, pick it, set n and seed, Generate: the grid and a zip of n
    decodable PNGs come back, the command line matches; a class that matches nothing gives a notice."""
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=_chromium(), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900}, accept_downloads=True)
            page.goto(page_url)
            expect(page).to_have_title("titok-gen sampling")

            box = page.locator("#class input")
            box.click()
            box.fill("")
            box.press_sequentially("star")
            expect(page.get_by_role("option")).to_have_count(1)  # the typed text filters the 10 names
            page.get_by_role("option", name="3: 03_yellow_star", exact=True).click()
            expect(box).to_have_value("3: 03_yellow_star")
            for field, value in (("#n input[type=number]", "6"), ("#seed input", "7")):
                page.locator(field).fill(value)
                page.locator(field).press("Tab")

            page.locator("#generate").click()
            summary = page.locator("#summary")
            expect(summary).to_contain_text("6 samples of class 3 (03_yellow_star), 32x32, seed 7", timeout=60_000)
            assert page.locator("#command textarea").input_value() == (
                f"python -m sampling.generate class=3 n=6 seed=7 generator.checkpoint={tiny_generator} batch_size=32 "
                "sampling.num_steps=4 sampling.guidance_scale=2.0 sampling.guidance_decay=constant "
                "sampling.guidance_scale_pow=3.0 sampling.randomize_temperature=1.0 "
                "sampling.softmax_temperature_annealing=true"
            )

            grid_src = page.locator("#grid img").get_attribute("src")
            grid_png = page.request.get(grid_src).body()
            assert png_sizes({"grid": grid_png}) == {"grid": grid_size(6)}

            with page.expect_download() as download:
                page.locator("#download a").first.click()
            archive = tmp_path / "samples.zip"
            download.value.save_as(archive)
            with zipfile.ZipFile(archive) as zf:
                pngs = {name: zf.read(name) for name in zf.namelist()}
            names = [f"sample_{i:05d}_class3.png" for i in range(6)]
            assert png_sizes(pngs) == {**{name: (SIZE, SIZE) for name in names}, "grid.png": grid_size(6)}
            assert pngs["grid.png"] == grid_png

            # Bad input: a notice on the page naming the problem, no stack trace.
            box.click()
            box.fill("zzz")
            page.locator("#generate").click()
            notice = page.get_by_text("no class name contains 'zzz'")
            expect(notice).to_be_visible(timeout=30_000)
            assert "Traceback" not in page.content()
        finally:
            browser.close()


def test_serve_without_generator_is_one_line(tmp_path):
    proc = run_cli("sampling.serve", f"generator.checkpoint={tmp_path / 'none.safetensors'}", cwd=tmp_path)
    assert_one_line_error(proc, "generator checkpoint not found", "none.safetensors")
