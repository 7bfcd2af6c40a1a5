"""Gradient-weighted loss balancing: how the logit loss's gradient and each auxiliary loss's (hidden states,
attention) relate, and two ways to combine them.

The roadmap asked where "the activation gradients push the model in the opposite direction to the logit
gradients, or are orthogonal". `term_gradients` computes each weighted term's gradient separately
(torch.autograd.grad, nothing accumulated), `cosines` measures them (logged every logging window as
grad/cos_hs, grad/norm_logit, ...), and --loss-balance combines them:

  none     the plain sum (what .backward() of the total gives)
  pcgrad   PCGrad (Yu et al. 2020, arXiv 2001.06782) with the logit loss as the primary task: an auxiliary
           gradient that conflicts with the logit gradient (cosine < 0) loses its component along it,
           g_aux - (g_aux . g_logit / |g_logit|^2) g_logit; one that does not is unchanged.
  gradnorm each auxiliary gradient rescaled to its weight times the logit gradient's norm,
           |g_aux'| = w_aux |g_logit| (the fixed-ratio form of GradNorm, Chen et al. 2018, arXiv 1711.02257:
           the ratio is set, not learned), so --hs-weight / --attn-weight mean "this share of the logit
           gradient's size" whatever the raw loss scales.

Vectors are all trainable parameters flattened (zeros where a term does not reach a parameter: the
projectors only get auxiliary gradient, so a projection leaves them unchanged).
"""
from __future__ import annotations

import torch

BALANCES = ("none", "pcgrad", "gradnorm")
EPS = 1e-12


def term_gradients(terms: dict[str, torch.Tensor], params: list[torch.Tensor]) -> dict[str, list[torch.Tensor]]:
    """{term: [d term / d p for p in params]} (zeros where unused), by one autograd pass per term."""
    out = {}
    names = list(terms)
    for i, name in enumerate(names):
        grads = torch.autograd.grad(terms[name], params, retain_graph=i < len(names) - 1, allow_unused=True)
        out[name] = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]
    return out


def flat(grads: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([g.reshape(-1).float() for g in grads])


def cosines(grads: dict[str, list[torch.Tensor]]) -> dict[str, float]:
    """grad/norm_<term> for every term and grad/cos_<aux> (cosine with the logit gradient) for every auxiliary."""
    vectors = {k: flat(v) for k, v in grads.items()}
    out = {f"grad/norm_{k}": float(v.norm()) for k, v in vectors.items()}
    logit = vectors.get("logit")
    for k, v in vectors.items():
        if k != "logit" and logit is not None:
            out[f"grad/cos_{k}"] = float(torch.dot(v, logit) / (v.norm() * logit.norm() + EPS))
    return out


def pcgrad(g_aux: torch.Tensor, g_logit: torch.Tensor) -> torch.Tensor:
    """g_aux without its component along g_logit when the two conflict (dot < 0); else g_aux unchanged."""
    dot = torch.dot(g_aux, g_logit)
    if dot >= 0:
        return g_aux
    return g_aux - dot / (g_logit.dot(g_logit) + EPS) * g_logit


def gradnorm(g_aux: torch.Tensor, g_logit: torch.Tensor, ratio: float) -> torch.Tensor:
    """g_aux rescaled to norm ratio * |g_logit| (its direction kept)."""
    return g_aux * (ratio * g_logit.norm() / (g_aux.norm() + EPS))


def combine(grads: dict[str, list[torch.Tensor]], method: str, ratios: dict[str, float]) -> list[torch.Tensor]:
    """The step's gradient from the per-term gradients: the logit term's plus each auxiliary's, balanced by
    `method`. ratios: gradnorm's target norm ratio per auxiliary term (its loss weight)."""
    shapes = [g.shape for g in next(iter(grads.values()))]
    vectors = {k: flat(v) for k, v in grads.items()}
    logit = vectors.get("logit")
    total = torch.zeros_like(next(iter(vectors.values()))) if logit is None else logit.clone()
    for name, g in vectors.items():
        if name == "logit":
            continue
        if logit is not None and method == "pcgrad":
            g = pcgrad(g, logit)
        elif logit is not None and method == "gradnorm":
            g = gradnorm(g, logit, ratios[name])
        total += g
    return [t.view(s) for t, s in zip(torch.split(total, [s.numel() for s in shapes]), shapes)]
