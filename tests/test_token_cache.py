"""Token cache: flips, shards, resume after a kill, refusal of foreign caches."""
import json
import threading
import time

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from generator.cache import CacheMismatchError, TokenDataset, build_token_cache, check_cache, tokenizer_fingerprint
from tokenizer import load_tokenizer


class Images(Dataset):
    """n random 64x64 images with labels i % 3; index ``bad`` is unreadable; optional crash."""

    def __init__(self, n, *, bad=(), crash_at=None):
        g = torch.Generator().manual_seed(0)
        self.images = torch.rand(n, 3, 64, 64, generator=g)
        self.bad, self.crash_at = set(bad), crash_at
        self.classes = ["a", "b", "c"]

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        if self.crash_at is not None and i >= self.crash_at:
            raise KeyboardInterrupt("killed")
        if i in self.bad:
            return None
        return self.images[i], i % 3


@pytest.fixture
def tok(official_tiny):
    d = official_tiny / "tokenizer"
    return load_tokenizer(d / "config.yaml", checkpoint=d / "tokenizer.bin")


def test_cache_holds_images_and_flips(tok, tmp_path):
    data = Images(10, bad=[3])
    manifest = build_token_cache(tokenizer=tok, tokenizer_source="tiny", dataset=data, out_dir=tmp_path / "c", batch_size=4, dtype="fp32")
    assert manifest["num_images"] == 10 and manifest["num_skipped"] == 1 and manifest["num_sequences"] == 18
    assert manifest["tokenizer"]["fingerprint"] == tokenizer_fingerprint(tok)
    tokens = np.load(tmp_path / "c" / "tokens.npy", mmap_mode="r")
    labels = np.load(tmp_path / "c" / "labels.npy")
    assert tokens.dtype == np.uint16 and tokens.shape == (18, 8)
    keep = [i for i in range(10) if i != 3]
    x = data.images[keep]
    want = torch.stack([tok.encode(x), tok.encode(x.flip(-1))], 1).reshape(18, 8)
    assert torch.equal(torch.from_numpy(tokens.astype(np.int64)), want)
    assert labels.tolist() == [i % 3 for i in keep for _ in range(2)]
    assert not (tmp_path / "c" / "shards").exists()

    ds = TokenDataset(tmp_path / "c")
    t, y = ds[1]
    assert t.dtype == torch.int64 and torch.equal(t, want[1]) and int(y) == 0 and len(ds) == 18


def test_kill_loses_at_most_the_batch_in_flight_and_rerun_resumes(tok, tmp_path):
    out = tmp_path / "c"
    with pytest.raises(KeyboardInterrupt):
        build_token_cache(tokenizer=tok, tokenizer_source="tiny", dataset=Images(10, crash_at=8), out_dir=out, batch_size=4, dtype="fp32")
    done = sorted(p.name for p in (out / "shards").glob("shard_*.npz"))
    assert done == ["shard_000000.npz", "shard_000001.npz"]  # the two batches before the kill
    assert not (out / "manifest.json").exists()

    calls = []
    encode = tok.encode
    tok.encode = lambda x: calls.append(len(x)) or encode(x)
    manifest = build_token_cache(tokenizer=tok, tokenizer_source="tiny", dataset=Images(10), out_dir=out, batch_size=4, dtype="fp32")
    assert calls == [4]  # only the missing shard (2 images + their flips)
    assert manifest["num_sequences"] == 20

    with pytest.raises(CacheMismatchError, match="half-built"):
        out2 = tmp_path / "d"
        with pytest.raises(KeyboardInterrupt):
            build_token_cache(tokenizer=tok, tokenizer_source="tiny", dataset=Images(10, crash_at=4), out_dir=out2, batch_size=4, dtype="fp32")
        build_token_cache(tokenizer=tok, tokenizer_source="tiny", dataset=Images(10), out_dir=out2, batch_size=2, dtype="fp32")


def test_foreign_cache_is_refused(tok, tmp_path):
    build_token_cache(tokenizer=tok, tokenizer_source="tiny", dataset=Images(4), out_dir=tmp_path / "c", batch_size=4, dtype="fp32")
    with pytest.raises(CacheMismatchError, match="made by another tokenizer"):
        check_cache(tmp_path / "c", fingerprint="0123456789abcdef")
    with pytest.raises(CacheMismatchError, match="resolution 64, not 256"):
        check_cache(tmp_path / "c", resolution=256)
    other = load_tokenizer(tok.source.replace("tokenizer.bin", "config.yaml"))  # same config, random weights
    with pytest.raises(CacheMismatchError, match="made by another tokenizer"):
        build_token_cache(tokenizer=other, tokenizer_source="random", dataset=Images(4), out_dir=tmp_path / "c", batch_size=4)
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert manifest["format"] == "titok-gen-token-cache/1" and manifest["classes"] == ["a", "b", "c"]


def test_ranks_build_their_own_shards_and_rank0_merges(tok, tmp_path):
    """What each Fabric rank does, run here one after the other: rank r takes shards i % W == r."""
    from generator.cache import build_shards, cache_manifest, merge_shards

    data, out = Images(10), tmp_path / "c"
    build_shards(tokenizer=tok, dataset=data, out_dir=out, batch_size=4, dtype="fp32", rank=1, world_size=2)
    assert sorted(p.name for p in (out / "shards").glob("*.npz")) == ["shard_000001.npz"]
    with pytest.raises(RuntimeError, match="shard"):
        merge_shards(out_dir=out, num_images=10, batch_size=4, manifest=cache_manifest(
            tokenizer=tok, tokenizer_source="tiny", dataset=data, resolution=64))
    build_shards(tokenizer=tok, dataset=data, out_dir=out, batch_size=4, dtype="fp32", rank=0, world_size=2)
    manifest = merge_shards(out_dir=out, num_images=10, batch_size=4, manifest=cache_manifest(
        tokenizer=tok, tokenizer_source="tiny", dataset=data, resolution=64))
    assert manifest["num_sequences"] == 20
    single = tmp_path / "single"
    build_token_cache(tokenizer=tok, tokenizer_source="tiny", dataset=data, out_dir=single, batch_size=4, dtype="fp32")
    assert np.array_equal(np.load(out / "tokens.npy"), np.load(single / "tokens.npy"))


class SlowImages(Images):
    def __getitem__(self, i):
        time.sleep(0.02)
        return super().__getitem__(i)


def test_two_jobs_building_the_same_cache_at_once_both_get_it(tok, tmp_path):
    """Two runs started together on the same data and tokenizer (a sweep) share one cache dir:
    the second waits for the first instead of merging a half-written set of shards."""
    out, results, errors = tmp_path / "c", [], []

    def build():
        try:
            results.append(build_token_cache(tokenizer=tok, tokenizer_source="tiny", dataset=SlowImages(24),
                                             out_dir=out, batch_size=4, dtype="fp32"))
        except Exception as exc:  # noqa: BLE001 -- reported below
            errors.append(exc)

    jobs = [threading.Thread(target=build) for _ in range(2)]
    for job in jobs:
        job.start()
        time.sleep(0.1)  # the second starts while the first is under way
    for job in jobs:
        job.join()
    assert errors == [] and len(results) == 2
    assert results[0] == results[1] and results[0]["num_sequences"] == 48
    assert np.load(out / "tokens.npy").shape == (48, 8)
