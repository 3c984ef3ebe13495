"""Screenshot a running sampling page after one Generate (the README's docs/serve.png).

    python -m sampling.serve &                 # the latest demo run
    python scripts/serve_screenshot.py http://127.0.0.1:7860/ docs/serve.png --class star --n 16

Drives Debian's chromium through Playwright (the dev extra; no browser download), types
``--class`` into the class box, picks the first match, presses Generate, waits for the grid
and saves the page as a 256-colour PNG.
"""
from __future__ import annotations

import argparse
import io
import shutil

from PIL import Image

CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run", "--disable-quic",
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("url")
    p.add_argument("out")
    p.add_argument("--class", dest="klass", default="star", help="text typed into the class box")
    p.add_argument("--n", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--width", type=int, default=1100)
    p.add_argument("--timeout", type=float, default=600, help="seconds to wait for the samples")
    args = p.parse_args()

    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=shutil.which("chromium"), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": args.width, "height": 800})
        page.goto(args.url)
        box = page.locator("#class input")
        box.click()
        box.fill("")
        box.press_sequentially(args.klass)
        page.get_by_role("option").first.click()
        for field, value in (("#n input[type=number]", args.n), ("#seed input", args.seed)):
            page.locator(field).fill(str(value))
            page.locator(field).press("Tab")
        page.locator("#generate").click()
        expect(page.locator("#summary")).to_contain_text("samples of class", timeout=args.timeout * 1000)
        page.mouse.move(0, 0)  # no hover highlight in the picture
        png = page.screenshot(full_page=True)
        browser.close()
    Image.open(io.BytesIO(png)).convert("RGB").quantize(256).save(args.out, optimize=True)
    print(args.out)


if __name__ == "__main__":
    main()
