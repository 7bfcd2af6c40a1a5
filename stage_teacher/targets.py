"""Teacher targets from the teacher's logits, a chunk of positions at a time: the one place both backends
(vLLM hooks, HF) turn logits into what the cache stores.

Per position (row t predicts the token at t+1): the top-k token ids and their log-probs, the log-prob of
the true next token, and for RS-KD ("Sparse Logit Sampling", arXiv 2503.16870) N tokens drawn with
replacement from q = softmax(z / t), reduced to the unique ids with their counts, plus the teacher's
entropy H(p) (exact, from the full distribution: the loss's value becomes a KL estimate). Weighted by count / N
(times p / q when t != 1) those ids give an unbiased estimate of the full teacher distribution p:
E[sum_i w_i f(x_i)] = sum_v p_v f(v) for any f, so a loss that is linear in p (forward KL, CE) is unbiased.

Padded vocabularies: a teacher's LM head may have more rows than its tokenizer has tokens (Qwen2.5-7B: 152,064
rows, 151,665 tokens). Rows at or beyond `vocab` (len(tokenizer)) are padding: no text holds them, so they cannot
be the next token. Their mass is an artefact, and the logits are cut to [0, vocab) before anything is made: the
targets are the teacher's distribution conditioned on a real token (renormalised), never a padding id.

The draws of sequence s come from a generator seeded with (seed, s): a cache is the same whatever the batch
order, the array-job split or a resume. No [positions, V] float32 tensor larger than one chunk is made.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pipeline import schema


@dataclass
class TargetSpec:
    top_k: int = 64
    targets: str = "topk"  # topk | sampled | both | sampled-exact
    samples: int = 64
    sample_temperature: float = 1.0
    sampling: str = "iid"  # iid | systematic (draw)
    seed: int = 0
    chunk_positions: int = 512
    vocab: int | None = None  # the real tokens, len(tokenizer): logits beyond are cut (None: the whole head)

    @property
    def topk(self) -> bool:
        return self.targets in ("topk", "both")

    @property
    def sampled(self) -> bool:
        return self.targets in ("sampled", "both", "sampled-exact")

    @property
    def exact(self) -> bool:
        """sampled-exact: the drawn ids (and the true next token) with their exact log-probs, no counts."""
        return self.targets == "sampled-exact"


def sequence_generator(seed: int, seq_index: int, device) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(int(np.random.SeedSequence([seed, int(seq_index)]).generate_state(1, np.uint64)[0] >> 1))
    return g


@torch.no_grad()
def sequence_targets(logits_fn, next_ids: torch.Tensor, spec: TargetSpec, seq_index: int) -> dict[str, torch.Tensor]:
    """One sequence's targets. logits_fn(start, stop) -> the teacher's logits [stop - start, V] for those
    positions (a fresh tensor, or one nothing reads again: it is overwritten); next_ids [P] the true next tokens. Returns CPU tensors [P, ...] (samples padded with id -1)."""
    p = next_ids.shape[0]
    parts: list[dict] = []
    gen = None
    for start in range(0, p, spec.chunk_positions):
        stop = min(p, start + spec.chunk_positions)
        z = without_padding_columns(logits_fn(start, stop).float(), spec.vocab)
        if gen is None and spec.sampled:
            gen = sequence_generator(spec.seed, seq_index, z.device)
        parts.append(chunk_targets(z, next_ids[start:stop].to(z.device), spec, gen))
    return concat_padded(parts)


def without_padding_columns(z: torch.Tensor, vocab: int | None) -> torch.Tensor:
    """Logits [C, V] cut to the first `vocab` columns (the tokenizer's tokens; the rest are padding rows of the
    head): a contiguous copy when there is padding, z itself otherwise."""
    if vocab is None or vocab >= z.shape[-1]:
        return z
    return z[:, :vocab].contiguous()


def chunk_targets(z: torch.Tensor, next_ids: torch.Tensor, spec: TargetSpec, gen: torch.Generator | None) -> dict:
    """Targets of one chunk of logits z [C, V] (float32, owned: it is overwritten in place).

    One read for the true token and the top-k, then z - max in place and exp in place: the log-sum-exp costs a
    fifth of torch.logsumexp's time on CPU (no [C, V] temporaries), and the exponentials are the unnormalised
    probabilities the samples are drawn from."""
    out = {}
    next_logit = z.gather(-1, next_ids[:, None].long())[:, 0]
    if spec.topk:
        top = z.topk(spec.top_k, dim=-1, sorted=True)
    mx = z.amax(-1, keepdim=True)
    z.sub_(mx)  # z - max: every entry <= 0
    t = spec.sample_temperature
    if spec.sampled and spec.exact:
        out.update(exact_samples(z, next_ids, spec, gen))
        total = z.exp_().sum(-1)
    elif spec.sampled:
        e = z.exp()
        total = e.sum(-1)
        # H(p) = log S - sum e (z - max) / S: with it the loss's value is the KL estimate, not just its gradient
        out["teacher_entropy"] = total.log() - torch.linalg.vecdot(e, z, dim=-1) / total
        if t != 1.0:
            e = (z / t).exp_()  # q's unnormalised probabilities, exp((z - max) / t)
        draws = draw(e, spec.samples, spec.sampling, gen)
        ids, counts = unique_counts(draws)
        out["sample_ids"], out["sample_counts"] = ids, counts
        if t != 1.0:
            safe = ids.clamp_min(0)
            zx = z.gather(-1, safe)  # z_x - max
            logp = zx - total.log()[:, None]
            logq = zx / t - e.sum(-1).log()[:, None]
            out["sample_iw"] = torch.where(ids >= 0, torch.exp(logp - logq), 0.0)
    else:
        total = z.exp_().sum(-1)
    lse = mx[:, 0] + total.log()
    out["target_logprob"] = next_logit - lse
    if spec.topk:
        out["topk_ids"] = top.indices.int()
        out["topk_logprobs"] = top.values - lse[:, None]
    return {k: v.cpu() for k, v in out.items()}


def exact_samples(z: torch.Tensor, next_ids: torch.Tensor, spec: TargetSpec, gen: torch.Generator) -> dict:
    """--targets sampled-exact: N draws from q = softmax(z / t), reduced to their unique ids, joined with the true
    next token, each with its exact teacher log-prob log p (z holds z - max, read only). The reader weights id i by
    p_i / pi_i, pi_i its chance to be drawn at least once (`draw`: 1 - (1 - q_i)^N iid, min(1, N q_i) systematic;
    1 for the true token, which is always there): the Horvitz-Thompson estimate of p, unbiased, and exact for every
    token likely to be drawn (pi ~ 1).
    t != 1 also stores sample_logq_norm, c with log q_i = log p_i / t + c."""
    t = spec.sample_temperature
    log_total = torch.logsumexp(z, dim=-1)
    e = (z / t).exp() if t != 1.0 else z.exp()
    draws = draw(e, spec.samples, spec.sampling, gen)
    ids, _ = unique_counts(torch.cat([draws, next_ids[:, None].long()], dim=-1))
    logp = z.gather(-1, ids.clamp_min(0)) - log_total[:, None]
    out = {"sample_ids": ids, "sample_logprobs": torch.where(ids >= 0, logp, 0.0)}
    if schema.can_drop_tail_logprobs(spec.targets, spec.sampling, t):  # H(p), which such a cache stores (e = exp(z))
        out["teacher_entropy"] = log_total - torch.linalg.vecdot(e, z, dim=-1) * torch.exp(-log_total)
    if t != 1.0:
        out["sample_logq_norm"] = log_total / t - torch.logsumexp(z / t, dim=-1)
    return out


SYSTEMATIC_ROWS = 64  # rows per float64 cumulative sum in `draw` (bounds its [rows, V] temporaries)


def draw(e: torch.Tensor, n: int, sampling: str, gen: torch.Generator) -> torch.Tensor:
    """n draws per row from the unnormalised probabilities e [C, V] -> ids [C, n].

    iid: independent draws with replacement; id v appears at least once with chance 1 - (1 - q_v)^n.
    systematic: one offset u ~ U[0, 1) per row and the points (u + j) / n, j < n, on the cumulative sum of q: id v
    appears at least once with chance min(1, n q_v) exactly, whatever the ids' order, and its count is floor or
    ceil of n q_v (Madow's systematic sampling; particle filters' systematic resampling). Every id with q >= 1/n
    is always drawn, and the draws falling in the tail number its mass times n to within one."""
    if sampling == "iid":
        return torch.multinomial(e, n, replacement=True, generator=gen)
    out = []
    steps = torch.arange(n, dtype=torch.float64, device=e.device)
    for rows in e.split(SYSTEMATIC_ROWS):
        cdf = rows.double().cumsum_(-1)
        u = torch.rand(rows.shape[0], 1, generator=gen, dtype=torch.float64, device=e.device)
        points = (u + steps) / n * cdf[:, -1:]
        out.append(torch.searchsorted(cdf, points, right=True).clamp_max_(rows.shape[-1] - 1))
    return torch.cat(out)


def unique_counts(draws: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[C, N] draws -> unique ids [C, m] (ascending, padded with -1) and their counts [C, m] (padded 0)."""
    s, _ = draws.sort(dim=-1)
    new = torch.ones_like(s, dtype=torch.bool)
    new[:, 1:] = s[:, 1:] != s[:, :-1]
    slot = new.long().cumsum(-1) - 1
    m = int(slot[:, -1].max()) + 1
    ids = torch.full((s.shape[0], m), -1, dtype=torch.long, device=s.device).scatter_(1, slot, s)
    counts = torch.zeros((s.shape[0], m), dtype=torch.long, device=s.device).scatter_add_(1, slot, torch.ones_like(s))
    return ids, counts


SAMPLE_FILL = {"sample_ids": -1}
PER_POSITION = ("sample_logq_norm",)  # sample_* keys with one value per position, not per sample


def concat_padded(parts: list[dict], dim: int = 0) -> dict:
    """Concatenate (dim 0) or stack (dim None) results, padding the sample arrays to the widest."""
    out = {}
    for key in parts[0]:
        values = [part[key] for part in parts]
        if key.startswith("sample_") and key not in PER_POSITION:
            m = max(v.shape[-1] for v in values)
            values = [torch.nn.functional.pad(v, (0, m - v.shape[-1]), value=SAMPLE_FILL.get(key, 0)) for v in values]
        out[key] = torch.cat(values) if dim == 0 else torch.stack(values)
    return out


def batch_targets(per_sequence: list[dict]) -> dict[str, np.ndarray]:
    """Stack sequences' targets into [N, T-1, ...] numpy arrays (sample arrays padded to the batch's widest)."""
    return {k: v.numpy() for k, v in concat_padded(per_sequence, dim=None).items()}
