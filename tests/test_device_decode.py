"""Token cache with decode="device": JPEGs decoded, resized and cropped by torch (here on the CPU) vs the PIL path."""
import io

import numpy as np
import pytest
import torch
from PIL import Image

from generator.cache import build_token_cache
from generator.device_decode import EncodedImages, decode_batch, device_decodable
from titok_core.data import ImageFolderDataset
from tokenizer import load_tokenizer


def _smooth(h, w, seed, channels=3):
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(1, channels, 6, 6, generator=g)
    x = torch.nn.functional.interpolate(low, size=(h, w), mode="bicubic", align_corners=False)[0]
    x = x + 0.15 * torch.rand(channels, h, w, generator=g)  # texture, so resampling matters
    return (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """JPEGs of many sizes (down- and upscaled, one exactly 64), progressive, grey, CMYK, a PNG, bad files."""
    root = tmp_path_factory.mktemp("jpegs")
    sizes = [(72, 96), (96, 72), (64, 64), (40, 50), (65, 130), (300, 200), (200, 300), (64, 80), (120, 120), (80, 64)]
    for i, (h, w) in enumerate(sizes):
        (root / "ab"[i % 2]).mkdir(exist_ok=True)
        Image.fromarray(_smooth(h, w, i)).save(root / "ab"[i % 2] / f"rgb{i}.jpg", quality=90)
    Image.fromarray(_smooth(70, 90, 20)).save(root / "a" / "progressive.jpg", quality=85, progressive=True)
    Image.fromarray(_smooth(64, 80, 21, 1)[..., 0], "L").save(root / "b" / "grey.jpg", quality=90)
    Image.fromarray(_smooth(80, 64, 22, 4), "CMYK").save(root / "b" / "cmyk.jpg", quality=90)
    Image.fromarray(_smooth(90, 70, 23)).save(root / "a" / "photo.png")
    (root / "a" / "garbage.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg" * 3)
    buf = io.BytesIO()
    Image.fromarray(_smooth(96, 96, 24)).save(buf, format="JPEG", quality=90)
    (root / "b" / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) * 2 // 3])
    return root


def test_which_files_the_device_decoder_takes(folder):
    got = {p.name: device_decodable(p.read_bytes()) for p in folder.rglob("*.*")}
    assert got.pop("cmyk.jpg") is False and got.pop("photo.png") is False and got.pop("garbage.jpg") is False
    assert got.pop("truncated.jpg") is False  # no end marker: left to the PIL path, which skips it
    assert all(got.values()) and "progressive.jpg" in got and "grey.jpg" in got


def test_device_preprocessing_matches_pil(folder):
    """Same sizes and crops as the PIL path; pixels differ by at most one 8-bit step, rarely."""
    data = ImageFolderDataset(folder, resolution=64, train=False)
    encoded = [item[0] for item in map(EncodedImages(data).__getitem__, range(len(data)))]
    fell_back = []

    def pil_path(i):
        fell_back.append(data.samples[i][0].rsplit("/", 1)[-1])
        item = data[i]
        return None if item is None else item[0]

    images = decode_batch(encoded, resolution=64, device=torch.device("cpu"), fallback=pil_path)
    assert {"cmyk.jpg", "photo.png", "garbage.jpg"} <= set(fell_back)
    diffs = []
    for i, image in enumerate(images):
        want = data[i]
        assert (image is None) == (want is None), data.samples[i][0]
        if image is not None:
            assert image.shape == want[0].shape == (3, 64, 64) and image.dtype == torch.float32
            diffs.append(((image - want[0]).abs() * 255).round())
    diffs = torch.stack(diffs)
    assert len(diffs) == len(data) - 2  # all but the garbage and the truncated file
    assert float(diffs.max()) <= 1 and float((diffs > 0).float().mean()) < 0.001


def test_cache_from_device_decoding_agrees_with_pil(folder, official_tiny, tmp_path):
    """The default path is untouched; the device path gives the same tokens here (measured: 100%)."""
    d = official_tiny / "tokenizer"
    tok = load_tokenizer(d / "config.yaml", checkpoint=d / "tokenizer.bin")
    caches = {}
    for decode in ("pil", "device"):
        data = ImageFolderDataset(folder, resolution=64, train=False)
        manifest = build_token_cache(tokenizer=tok, tokenizer_source="tiny", dataset=data, out_dir=tmp_path / decode,
                                     batch_size=6, dtype="fp32", decode=decode)
        assert manifest["decode"] == decode and manifest["num_skipped"] == 2 and manifest["num_sequences"] == 28
        caches[decode] = np.load(tmp_path / decode / "tokens.npy"), np.load(tmp_path / decode / "labels.npy")
    assert np.array_equal(caches["pil"][1], caches["device"][1])
    assert (caches["pil"][0] == caches["device"][0]).mean() >= 0.99
