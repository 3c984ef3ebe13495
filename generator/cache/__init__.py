"""Token cache: a frozen tokenizer turns an image dataset into token sequences with labels.

Each image is tokenized as is and horizontally flipped (two sequences, as the official
pre-tokenisation), or as is only (``data.hflip=false``, ``flip=False`` here: data whose mirror is
another thing). Layout of a finished cache directory::

    manifest.json   format, tokenizer identity (source, config, fingerprint), dataset identity
                    (absolute root, split, format, a fingerprint of its files), resolution,
                    image and sequence counts, class names
    tokens.npy      uint16 [M, L]  read with np.load(mmap_mode="r")
    labels.npy      int32  [M]

While it is being built, ``shards/shard_XXXXXX.npz`` hold one batch each, written
atomically: a kill loses at most the batch in flight and a rerun resumes. Shard i covers
dataset indices [i*S, (i+1)*S); rank r of W builds the shards with i % W == r, and rank 0
merges them into the flat arrays once all exist. ``manifest.json`` is written last, so a
directory with a manifest is complete. ``shards/plan.json`` records what the half-built cache is
made of (tokenizer, dataset, batch size, flips): a rerun with anything else stops instead of
mixing two caches.

Reading a cache checks it against what asks for it (:func:`check_cache`): another tokenizer,
resolution, flip setting or dataset stops with one line (CacheMismatchError), and so does a
tokens.npy / labels.npy that is missing, truncated, or of another length or dtype than the
manifest says. A manifest written before caches recorded their dataset is checked for the rest
only (a warning says so).

Streamed WebDataset shards (:class:`titok_core.formats.WebDatasetShards`) have no index:
rank r of W streams the tar shards with i % W == r, and batch c of tar i (its samples
[c*S, (c+1)*S) in stream order) becomes ``shards/tar_IIIIII_CCCCCC.npz``; ``tar_IIIIII.done``
records how many batches tar i had. A rerun skips the batches that exist without decoding
them. The merged arrays follow tar order, then stream order: the same images stored as a
folder (in its class-then-path order) give the same cache.
"""
from __future__ import annotations

# One concern a module: identity (what a cache records of its tokenizer and dataset, the manifest,
# the default folder), shards (each rank's shards and their merge), build (build_token_cache:
# reuse, resume or start), check (a finished cache against what asks for it and against its
# manifest), dataset (TokenDataset), command (python -m generator.cache). The docstring above is
# the command's --help.
from generator.cache.build import build_token_cache, open_cache
from generator.cache.check import CacheMismatchError, check_cache
from generator.cache.command import CACHE_RANGES, RENAMED, SCALAR_GROUPS, main
from generator.cache.command import _main as _main  # the task function, run in-process by tests
from generator.cache.dataset import TokenDataset
from generator.cache.identity import FORMAT, cache_manifest, dataset_identity, default_cache_dir, tokenizer_fingerprint
from generator.cache.shards import DECODERS, build_shards, build_stream_shards, merge_shards

__all__ = [
    "FORMAT", "DECODERS", "CacheMismatchError", "TokenDataset", "build_token_cache", "build_shards",
    "build_stream_shards", "merge_shards", "cache_manifest", "check_cache", "dataset_identity", "default_cache_dir",
    "tokenizer_fingerprint", "open_cache", "CACHE_RANGES", "RENAMED", "SCALAR_GROUPS", "main",
]
