"""Perplexity and bits per byte on held-out documents, batched, with a sliding window for long documents.

Each document is scored on its own, conditioned on one leading BOS (or EOS) token so that its first token
is predicted too. Windows of at most max_len tokens advance by `stride`; a window scores only the tokens
the previous window did not, so every token is scored once, with at least max_len - stride tokens of
context once the document is longer than a window (the transformers perplexity recipe).

  perplexity    = exp(total NLL / scored tokens)          (depends on the tokenizer)
  bits_per_byte = total NLL / ln 2 / UTF-8 bytes of text  (does not: compare any two models with it)
"""
from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F


def windows(ids: list[int], max_len: int, stride: int) -> list[tuple[list[int], int]]:
    """[(window ids, leading tokens not scored)]: every token of ids[1:] is scored exactly once."""
    out = []
    prev_end, begin = 1, 0  # ids[0] is the conditioning token and is never scored
    while prev_end < len(ids):
        end = min(begin + max_len, len(ids))
        out.append((ids[begin:end], prev_end - begin))
        prev_end = end
        begin = min(begin + stride, end - 1)  # keep at least one token of context
    return out


@torch.no_grad()
def evaluate_perplexity(model, tokenizer, texts: list[str], max_len: int = 512, stride: int = 256,
                        batch_size: int = 4) -> dict:
    if stride > max_len or stride < 1:
        raise ValueError("stride must be in [1, max_len]")
    device = next(model.parameters()).device
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    items = []
    for text in texts:
        ids = [start, *tokenizer(text, add_special_tokens=False)["input_ids"]]
        items.extend(windows(ids, max_len, stride))
    items.sort(key=lambda w: -len(w[0]))  # similar lengths per batch: less padding
    nll, scored = 0.0, 0
    t0 = time.perf_counter()
    forward_tokens = 0
    for i in range(0, len(items), batch_size):
        chunk = items[i : i + batch_size]
        width = max(len(w) for w, _ in chunk)
        input_ids = torch.zeros(len(chunk), width, dtype=torch.long)
        labels = torch.full((len(chunk), width), -100, dtype=torch.long)
        mask = torch.zeros(len(chunk), width, dtype=torch.long)
        for j, (w, skip) in enumerate(chunk):
            input_ids[j, : len(w)] = torch.tensor(w)
            mask[j, : len(w)] = 1
            labels[j, skip : len(w)] = torch.tensor(w[skip:])
        logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits.float()
        target = labels[:, 1:].to(device)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100, reduction="sum")
        nll += loss.item()
        scored += int((target != -100).sum())
        forward_tokens += int(mask.sum())
    elapsed = time.perf_counter() - t0
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    return {
        "perplexity": math.exp(nll / scored),
        "bits_per_byte": nll / math.log(2) / n_bytes,
        "nll_per_token": nll / scored,
        "tokens": scored,
        "bytes": n_bytes,
        "documents": len(texts),
        "forward_tokens_per_s": forward_tokens / elapsed,
    }
