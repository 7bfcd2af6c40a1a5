"""Streaming cache shards into training batches, deterministically and resumably.

The order of sequences is computed from the manifest alone (shard row counts), before any data is read:
per epoch, shards in a seeded random order, rows in a seeded random order, then a seeded shuffle buffer
across shards. Rank r of a torchrun job takes every world-th sequence (disjoint data); its micro-batch m
is fully determined by (seed, m). So the loader's position is just the micro-batch counter: a resumed run
starts at the next unseen batch without reading what came before.

Decoding runs in DataLoader workers: worker w of W builds micro-batches m = start + w, start + w + W, ...,
and the DataLoader hands them back in order. Each worker keeps the few shards the shuffle buffer spans.
"""
from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.cache import SAMPLE_KEYS, CacheReader, inclusion_probability, inclusion_weights
from pipeline.errors import CacheError
from pipeline.schema import QKV, hidden_key, qkv_key, sampling_of


def split_eval(shards: list[dict], eval_sequences: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """All (shard position, row) pairs; the last `eval_sequences` are held out for the eval loss."""
    pairs = [(i, r) for i, s in enumerate(shards) for r in range(s["rows"])]
    if eval_sequences >= len(pairs):
        raise CacheError(f"the cache holds {len(pairs)} sequences, not more than --eval-sequences {eval_sequences}")
    cut = len(pairs) - eval_sequences
    return pairs[:cut], pairs[cut:]


def epoch_order(pairs: list[tuple[int, int]], seed: int, epoch: int, buffer: int) -> list[tuple[int, int]]:
    rng = np.random.default_rng([seed, epoch])
    by_shard: dict[int, list[tuple[int, int]]] = {}
    for p in pairs:
        by_shard.setdefault(p[0], []).append(p)
    stream = []
    for shard in rng.permutation(sorted(by_shard)):
        rows = by_shard[int(shard)]
        stream.extend(rows[i] for i in rng.permutation(len(rows)))
    out, buf = [], []
    for item in stream:  # shuffle buffer: mixes sequences across neighbouring shards
        buf.append(item)
        if len(buf) >= buffer:
            out.append(buf.pop(int(rng.integers(len(buf)))))
    while buf:
        out.append(buf.pop(int(rng.integers(len(buf)))))
    return out


def rank_batches(pairs, seed, epoch, buffer, rank, world, batch_size) -> list[list[tuple[int, int]]]:
    """This rank's micro-batches for one epoch (disjoint across ranks, same count on every rank)."""
    order = epoch_order(pairs, seed, epoch, buffer)
    per_rank = len(order) // world
    mine = order[rank::world][:per_rank]
    n = len(mine) // batch_size
    if n == 0:
        raise CacheError(
            f"the cache's {len(order)} training sequences give no full batch of {batch_size} per rank "
            f"on {world} ranks; lower --batch-size or capture more tokens"
        )
    return [mine[i * batch_size : (i + 1) * batch_size] for i in range(n)]


def epoch_subset(row: dict, draws: int, keep: int, seed: int, epoch: int, sampling: str = "iid") -> dict:
    """--draws-per-epoch: the row of a sampled-exact cache (t = 1) as if `keep` of its `draws` draws had been made.

    Each drawn id i stays with probability pi_i(keep) / pi_i(draws), pi_i(n) = 1 - (1 - p_i)^n (min(1, n p_i) for a
    systematic cache), so its chance to be in the epoch's set is pi_i(keep), and it is weighted p_i / pi_i(keep): the Horvitz-Thompson estimate of a
    keep-draw sample, unbiased. The true next token stays, at weight p. The coins come from (seed, the sequence,
    epoch): every epoch sees another subset, a resumed run the same one, and each sequence lives on one DDP rank.
    The row's teacher_entropy (exact, or the estimate from all the draws) stays: only the loss's value reads it. An id
    stored without its log-prob reads log p = -log N (pipeline/cache.py): it stays with chance keep / N and weighs
    1 / keep, as any systematic id below 1/N does."""
    ids, logp = row["sample_ids"], row["sample_logprobs"].astype(np.float64)
    valid, certain = ids >= 0, ids == row["input_ids"][1:, None]
    rng = np.random.default_rng([seed, int(row["seq_index"]), epoch, 0x5EED])
    pi_draws, pi_keep = (inclusion_probability(logp, n, sampling) for n in (draws, keep))
    stays = certain | (rng.random(ids.shape) * pi_draws < pi_keep)
    weights = inclusion_weights(logp, logp, keep, certain, valid & stays, sampling)  # t = 1: q = p
    return {**row, "sample_weights": weights.astype(np.float32)}


class CacheStream(IterableDataset):
    def __init__(self, cache: str, pairs, batch_size: int, seed: int, buffer: int, rank: int = 0, world: int = 1,
                 start: int = 0, hidden_layers: list[int] | None = None, epochs: int | None = None,
                 qkv_layers: list[int] | None = None, collate_fn=None, draws_per_epoch: int = 0):
        self.cache, self.pairs, self.batch_size = cache, pairs, batch_size
        self.collate = collate_fn or collate  # cross-tokenizer runs: cross_tokenizer.CrossTokenizer
        self.seed, self.buffer, self.rank, self.world, self.start = seed, buffer, rank, world, start
        self.hidden_layers, self.epochs, self.qkv_layers = hidden_layers or [], epochs, qkv_layers or []
        self.draws_per_epoch = draws_per_epoch
        self.per_epoch = len(rank_batches(pairs, seed, 0, buffer, rank, world, batch_size))

    def __iter__(self):
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        reader = CacheReader(self.cache)
        shards = reader.shards
        keep = max(2, self.buffer // max(1, min(s["rows"] for s in shards)) + 2)
        cache: OrderedDict[int, dict] = OrderedDict()
        batches, batches_epoch = None, -1
        m = self.start + wid
        draws = int(reader.manifest["capture"].get("samples") or 0)  # --draws-per-epoch subsets these
        sampling = sampling_of(reader.manifest["capture"])
        while self.epochs is None or m < self.epochs * self.per_epoch:
            epoch, b = divmod(m, self.per_epoch)
            if epoch != batches_epoch:
                batches = rank_batches(self.pairs, self.seed, epoch, self.buffer, self.rank, self.world, self.batch_size)
                batches_epoch = epoch
            rows = [self._row(reader, shards, cache, keep, s, r) for s, r in batches[b]]
            if self.draws_per_epoch:
                rows = [epoch_subset(row, draws, self.draws_per_epoch, self.seed, epoch, sampling) for row in rows]
            yield self.collate(rows)
            m += nw

    def _row(self, reader, shards, cache, keep, s, r):
        if s not in cache:  # a shard's Parquet is decoded once; its hidden-state file is opened, read row by row
            hfile = (reader.open_hidden(shards[s], self.hidden_layers, self.qkv_layers)
                     if self.hidden_layers or self.qkv_layers else None)
            cache[s] = reader.read_shard(shards[s], hidden=False), hfile
            while len(cache) > keep:
                cache.popitem(last=False)
        cache.move_to_end(s)
        data, hfile = cache[s]
        row = {k: v[r] for k, v in data.items()}
        rows = slice(r, r + 1)
        row["hidden_states"] = {l: hfile.decode(hidden_key(l), rows)[0] for l in self.hidden_layers}
        row["qkv"] = {l: {x: hfile.decode(qkv_key(x, l), rows)[0] for x in QKV} for l in self.qkv_layers}
        return row


def collate(rows: list[dict]) -> dict:
    """Rows -> a batch of tensors; the sample arrays of RS-KD caches padded to the batch's widest m (id -1)."""
    stack = lambda key, dtype=None: torch.from_numpy(np.stack([r[key] for r in rows]).astype(dtype or rows[0][key].dtype))  # noqa: E731
    batch = {
        "seq_index": torch.tensor([int(r["seq_index"]) for r in rows]),
        "input_ids": stack("input_ids", np.int64),
        "target_logprob": stack("target_logprob"),
        "hidden_states": {l: torch.from_numpy(np.stack([r["hidden_states"][l] for r in rows])) for l in rows[0]["hidden_states"]},
        "qkv": {l: {x: torch.from_numpy(np.stack([r["qkv"][l][x] for r in rows])) for x in parts}
                for l, parts in rows[0].get("qkv", {}).items()},
    }
    for key in ("loss_mask", "behaviour_logprob"):  # graded caches (on-policy data)
        if key in rows[0]:
            batch[key] = stack(key)
    if "topk_ids" in rows[0]:
        batch.update(topk_ids=stack("topk_ids", np.int64), topk_logprobs=stack("topk_logprobs"), tail_mass=stack("tail_mass"))
    if "sample_ids" in rows[0]:
        m = max(r["sample_ids"].shape[-1] for r in rows)
        for key in (k for k in SAMPLE_KEYS if k in rows[0]):
            fill = -1 if key == "sample_ids" else 0
            batch[key] = torch.from_numpy(np.stack([
                np.pad(r[key], ((0, 0), (0, m - r[key].shape[-1])), constant_values=fill) for r in rows]))
        batch["teacher_entropy"] = stack("teacher_entropy")
    return batch


def auto_workers(device_type: str) -> int:
    """--num-workers by default: decode in a worker process only where it has a core of its own.

    On a GPU node the CPU cores are idle while the GPU trains, so one worker decodes ahead. When training on
    the CPU, torch's compute threads use every core and a worker can only take cycles from them (measured
    1.09x in back-to-back blocks on 2 cores), while decoding a batch in the loop costs about 10 ms of a
    7.7 s step; so decode inline unless there are cores beyond torch's threads. Measured step by step
    (bench_train.py), streamed / in-memory is 0.99 inline and 0.97 with one worker: within noise either way.
    """
    import os

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return 1 if device_type == "cuda" or cores > torch.get_num_threads() else 0


def make_loader(stream: CacheStream, num_workers: int) -> DataLoader:
    return DataLoader(
        stream, batch_size=None, num_workers=num_workers, prefetch_factor=4 if num_workers else None,
        persistent_workers=False, pin_memory=torch.cuda.is_available(),
    )
