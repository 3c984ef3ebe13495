"""Image files -> preprocessed batches on the device: JPEGs decoded there (nvJPEG on CUDA), resized and cropped there.

The token cache's default path (``decode="pil"``) decodes and resizes every image with PIL in
DataLoader workers (``titok_core.data``: the official preprocessing). On a GPU that is the
bottleneck, so ``decode="device"`` only reads the file bytes in the workers and does the rest on
the device:

* JPEGs are decoded by ``torchvision.io.decode_jpeg`` in one batched call (nvJPEG on CUDA,
  libjpeg-turbo on the CPU), as RGB (greyscale replicated, as PIL's convert);
* each image's shorter side is resized to the resolution (bicubic, antialiased: PIL's filter,
  a = -0.5) and centre-cropped with the PIL path's sizes and offsets; images of one size share
  one resize call;
* anything else goes through the PIL path unchanged: other formats, JPEGs that are CMYK,
  12-bit, lossless or arithmetic-coded, files the device decoder refuses, unreadable files.

The two paths differ only in rounding: PIL's filter weights are fixed-point integers (these are
floats; both round to 8 bits after each pass), and decoders may differ in the inverse DCT.
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from torchvision.io import ImageReadMode, decode_jpeg, read_file

# Frame headers the device decoders take: baseline, extended sequential and progressive Huffman.
_SOF_DEVICE = {0xC0, 0xC1, 0xC2}
_SOF_ALL = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def device_decodable(data: bytes | torch.Tensor) -> bool:
    """Whether the bytes are an 8-bit greyscale or 3-component JPEG in a mode the device decoders read.

    Reads only the marker segments up to the frame header (no decoding).
    """
    tail = data[-64:].numpy().tobytes() if isinstance(data, torch.Tensor) else data[-64:]
    if b"\xff\xd9" not in tail:  # no end-of-image marker: cut short; the PIL path skips it as unreadable
        return False
    if isinstance(data, torch.Tensor):
        data = data[:65536].numpy().tobytes()  # frame headers sit after APPn segments of < 64 KiB each
    if data[:2] != b"\xff\xd8":
        return False
    i = 2
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            return False
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0x01, 0xD8) or 0xD0 <= marker <= 0xD7:  # markers without a length
            i += 2
            continue
        if marker in _SOF_ALL:
            if i + 10 > len(data):
                return False
            precision, components = data[i + 4], data[i + 9]
            return marker in _SOF_DEVICE and precision == 8 and components in (1, 3)
        if marker in (0xDA, 0xD9):  # scan data or the end before any frame header
            return False
        i += 2 + int.from_bytes(data[i + 2 : i + 4], "big")
    return False


class EncodedImages(Dataset):
    """The files of an image folder dataset as bytes: (uint8 [nbytes] tensor or None, label int, index int).

    images: anything with ``samples`` = [(path, label), ...] (``titok_core.data.ImageFolderDataset``).
    None stands for a file that cannot be read at all; the PIL path then decides what it is.
    """

    def __init__(self, images):
        self.samples = images.samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        try:
            data = read_file(str(path))
        except (OSError, RuntimeError):
            data = None
        return data, int(label), index


def collate_encoded(batch: list) -> tuple[list, torch.Tensor, list[int]]:
    """[(bytes, label, index), ...] -> (list of bytes tensors or None, labels int64 [B], indices)."""
    return [b[0] for b in batch], torch.tensor([b[1] for b in batch], dtype=torch.long), [b[2] for b in batch]


def resize_crop(images: torch.Tensor, resolution: int) -> torch.Tensor:
    """uint8 [B,3,H,W] (one size) -> float32 [B,3,R,R] in [0,1]: the PIL path's resize and centre crop.

    The shorter side goes to R (the longer to int(R * long / short), torchvision's rounding),
    bicubic antialiased in two passes rounded to 8 bits, as PIL; then the centre crop.
    """
    h, w = images.shape[-2:]
    nw, nh = (resolution, int(resolution * h / w)) if w <= h else (int(resolution * w / h), resolution)
    x = images.float()
    # As PIL: the horizontal pass, rounded to 8 bits, then the vertical pass (each only if needed).
    for size in ((h, nw), (nh, nw)):
        if tuple(x.shape[-2:]) != size:
            x = F.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=False).round().clamp(0, 255)
    top, left = int(round((nh - resolution) / 2.0)), int(round((nw - resolution) / 2.0))
    return x[..., top : top + resolution, left : left + resolution] / 255


def _decode_all(datas: list[torch.Tensor], device: torch.device) -> list[torch.Tensor | None]:
    """Decode in one batched call; if it fails, one by one (None where a file fails)."""
    if not datas:
        return []
    try:
        return list(decode_jpeg(datas, mode=ImageReadMode.RGB, device=device))
    except RuntimeError:
        out = []
        for data in datas:
            try:
                out.append(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
            except RuntimeError:
                out.append(None)
        return out


def decode_batch(
    encoded: list[torch.Tensor | None], *, resolution: int, device: torch.device,
    fallback: Callable[[int], torch.Tensor | None],
) -> list[torch.Tensor | None]:
    """File bytes -> float32 [3,R,R] in [0,1] on ``device`` per item, or None for an unreadable file.

    fallback(i): item i through the PIL path (float [3,R,R] or None), for what the device
    decoder does not take.
    """
    device = torch.device(device)
    out: list[torch.Tensor | None] = [None] * len(encoded)
    on_device = [i for i, data in enumerate(encoded) if data is not None and device_decodable(data)]
    decoded = dict(zip(on_device, _decode_all([encoded[i] for i in on_device], device)))
    by_size: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i, image in decoded.items():
        if image is not None:
            by_size[tuple(image.shape[-2:])].append(i)
    for members in by_size.values():
        batch = resize_crop(torch.stack([decoded[i] for i in members]), resolution)
        for i, image in zip(members, batch):
            out[i] = image
    for i in range(len(encoded)):
        if i not in decoded or decoded[i] is None:
            image = fallback(i)
            out[i] = None if image is None else image.to(device)
    return out
