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
    manifest = build_token_cache(tokenizer=tok, tokenizer_source="tiny", dataset=data,
                                 out_dir=tmp_path / "c", batch_size=4, dtype="fp32")
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
        build_token_cache(tokenizer=tok, tokenizer_source="tiny", dataset=Images(10, crash_at=8), out_dir=out,
                          batch_size=4, dtype="fp32")
    done = sorted(p.name for p in (out / "shards").glob("shard_*.npz"))
    assert done == ["shard_000000.npz", "shard_000001.npz"]  # the two batches before the kill
    assert not (out / "manifest.json").exists()

    calls = []
    encode = tok.encode
    tok.encode = lambda x: calls.append(len(x)) or encode(x)
    manifest = build_token_cache(tokenizer=tok, tokenizer_source="tiny", dataset=Images(10), out_dir=out,
                                 batch_size=4, dtype="fp32")
    assert calls == [4]  # only the missing shard (2 images + their flips)
    assert manifest["num_sequences"] == 20

    with pytest.raises(CacheMismatchError, match="half-built"):
        out2 = tmp_path / "d"
        with pytest.raises(KeyboardInterrupt):
            build_token_cache(tokenizer=tok, tokenizer_source="tiny", dataset=Images(10, crash_at=4), out_dir=out2,
                              batch_size=4, dtype="fp32")
        build_token_cache(tokenizer=tok, tokenizer_source="tiny", dataset=Images(10), out_dir=out2, batch_size=2, dtype="fp32")


def test_foreign_cache_is_refused(tok, tmp_path):
    build_token_cache(tokenizer=tok, tokenizer_source="tiny", dataset=Images(4), out_dir=tmp_path / "c",
                      batch_size=4, dtype="fp32")
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
    # The lock they shared is gone with the build: nothing beside the cache, nothing in it but the cache.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]
    assert sorted(p.name for p in out.iterdir()) == ["labels.npy", "manifest.json", "tokens.npy"]


# ---------------------------------------------------------------- the dataset is part of the key; the files match the manifest


def _folder(root, n=4, *, seed=0):
    """<root>/train/<a|b>/<i>.png: n small random images."""
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    for i in range(n):
        d = root / "train" / "ab"[i % 2]
        d.mkdir(parents=True, exist_ok=True)
        arr = (torch.rand(20, 20, 3, generator=g) * 255).byte().numpy()
        Image.fromarray(arr).save(d / f"{i}.png")
    return root


def _build(tok, root, out, **kw):
    from titok_core.formats import open_split
    from titok_core.runs import dataset_identity

    data = dataset_identity(root, "train")
    dataset = open_split(root, "train", resolution=tok.image_size)
    return build_token_cache(tokenizer=tok, tokenizer_source="tiny", dataset=dataset, out_dir=out, batch_size=2,
                             dtype="fp32", data=data, **kw), data


def test_the_dataset_is_recorded_and_a_cache_of_another_dataset_is_refused(tok, tmp_path):
    from titok_core.runs import dataset_identity

    a, b = _folder(tmp_path / "a" / "data"), _folder(tmp_path / "b" / "data", seed=1)  # same folder names, same files
    manifest, data = _build(tok, a, tmp_path / "c")
    assert manifest["data"] == data
    assert data["root"] == str(a) and data["split"] == "train" and data["format"] == "folder" and data["files"] == 4
    assert check_cache(tmp_path / "c", data=data)["num_sequences"] == 8

    other = dataset_identity(b, "train")
    expected = r"manifest.json was made from another dataset: root \(was .*a/data, now .*b/data\)"
    with pytest.raises(CacheMismatchError, match=expected):
        check_cache(tmp_path / "c", data=other)
    with pytest.raises(CacheMismatchError, match="made from another dataset: root"):
        _build(tok, b, tmp_path / "c")  # the same cache.dir given for the other dataset

    # The same folder with one more file: another version of the dataset.
    (a / "train" / "a" / "extra.png").write_bytes((a / "train" / "a" / "0.png").read_bytes())
    with pytest.raises(CacheMismatchError, match=r"another dataset: files \(was 4, now 5\); sha256"):
        check_cache(tmp_path / "c", data=dataset_identity(a, "train"))
    with pytest.raises(CacheMismatchError, match="split"):
        check_cache(tmp_path / "c", data={**data, "split": "val"})


def test_default_cache_dirs_of_two_roots_with_one_folder_name_differ(tok, tmp_path):
    from generator.cache import default_cache_dir

    for root in ("a", "b"):
        (tmp_path / root / "data" / "train").mkdir(parents=True)
    a = default_cache_dir(root=tmp_path / "a" / "data", split="train", tokenizer=tok, flip=True)
    b = default_cache_dir(root=tmp_path / "b" / "data", split="train", tokenizer=tok, flip=True)
    assert a != b and a.name.startswith("data-") and b.name.startswith("data-")
    assert a.name.endswith(f"-train-{tokenizer_fingerprint(tok)}") and b.parent == a.parent
    relative = default_cache_dir(root="data", split="train", tokenizer=tok, flip=False)
    assert relative.name.endswith("-noflip") and relative != a


def test_a_half_built_cache_of_another_dataset_is_refused(tok, tmp_path, monkeypatch):
    from generator import cache

    a, b = _folder(tmp_path / "a" / "data"), _folder(tmp_path / "b" / "data", seed=1)
    encode = tok.encode

    def dies_on_second_batch(x, calls=[]):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        return encode(x)

    monkeypatch.setattr(tok, "encode", dies_on_second_batch)
    with pytest.raises(KeyboardInterrupt):
        _build(tok, a, tmp_path / "c")
    monkeypatch.setattr(tok, "encode", encode)
    plan = json.loads((tmp_path / "c" / "shards" / "plan.json").read_text())
    assert plan["data"]["root"] == str(a) and plan["flip"] is True
    with pytest.raises(CacheMismatchError, match=r"half-built token cache .* was started from another dataset: root"):
        _build(tok, b, tmp_path / "c")
    with pytest.raises(CacheMismatchError, match=r"half-built token cache .* differs in flip \(was True, now False\)"):
        _build(tok, a, tmp_path / "c", flip=False)
    # A plan written before plans recorded the dataset and flips: resumed, checked for the rest.
    del plan["data"], plan["flip"]
    (tmp_path / "c" / "shards" / "plan.json").write_text(json.dumps(plan))
    manifest, _ = _build(tok, a, tmp_path / "c")
    assert manifest["num_sequences"] == 8 and manifest["data"]["root"] == str(a)
    assert cache.check_cache(tmp_path / "c")["num_images"] == 4


def test_a_manifest_from_before_the_dataset_was_recorded_is_checked_for_the_tokenizer_only(tok, tmp_path, caplog):
    from titok_core.runs import dataset_identity

    a = _folder(tmp_path / "a" / "data")
    manifest, data = _build(tok, a, tmp_path / "c")
    path = tmp_path / "c" / "manifest.json"
    del manifest["data"]
    path.write_text(json.dumps(manifest))
    with caplog.at_level("WARNING", logger="generator.cache"):
        assert check_cache(tmp_path / "c", data=dataset_identity(a, "train"), fingerprint=tokenizer_fingerprint(tok))
    assert "does not record its dataset" in caplog.text
    with pytest.raises(CacheMismatchError, match="another tokenizer"):
        check_cache(tmp_path / "c", data=data, fingerprint="0" * 16)


@pytest.mark.parametrize("damage, message", [
    ("tokens_short", r"tokens.npy does not match its manifest: shape \(6, 8\), the manifest says \(8, 8\)"),
    ("labels_dtype", r"labels.npy does not match its manifest: dtype int64, the manifest says int32"),
    ("tokens_truncated", r"tokens.npy does not match its manifest: \d+ bytes, its header says \d+ \(truncated\)"),
    ("labels_missing", r"labels.npy is missing"),
    ("tokens_garbage", r"tokens.npy is not a readable .npy"),
    ("manifest_garbage", r"manifest.json is not readable JSON"),
])
def test_shards_that_do_not_match_the_manifest_stop_the_job(tok, tmp_path, damage, message):
    out = tmp_path / "c"
    build_token_cache(tokenizer=tok, tokenizer_source="tiny", dataset=Images(4), out_dir=out, batch_size=4, dtype="fp32")
    tokens, labels = np.load(out / "tokens.npy"), np.load(out / "labels.npy")
    if damage == "tokens_short":
        np.save(out / "tokens.npy", tokens[:6])
    elif damage == "labels_dtype":
        np.save(out / "labels.npy", labels.astype(np.int64))
    elif damage == "tokens_truncated":
        data = (out / "tokens.npy").read_bytes()
        (out / "tokens.npy").write_bytes(data[:-5])
    elif damage == "labels_missing":
        (out / "labels.npy").unlink()
    elif damage == "tokens_garbage":
        (out / "tokens.npy").write_bytes(b"not an array")
    else:
        (out / "manifest.json").write_text('{"format": "titok-gen-token-cache/1", "tok')
    for read in (lambda: check_cache(out), lambda: TokenDataset(out), lambda: build_token_cache(
            tokenizer=tok, tokenizer_source="tiny", dataset=Images(4), out_dir=out, batch_size=4, dtype="fp32")):
        with pytest.raises(CacheMismatchError, match=message) as err:
            read()
        assert "\n" not in str(err.value) and str(out) in str(err.value)
