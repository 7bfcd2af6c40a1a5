"""The distillation core: each loss a pure function of tensors, tested against float64 references.

    kd.py         logit losses on cached targets (forward/reverse KL, JSD, skew KL, CAKLD, TVD, Sinkhorn) and CE
    chunked.py    the LM head and those losses fused, a chunk of positions at a time (--loss-chunk-size)
    hidden.py     hidden-state losses and projectors (MSE, cosine, InfoNCE, logsum)
    attention.py  MiniLM-style Q/K/V relation losses and direct MHA losses
    cross.py      losses between a teacher and a student with different tokenizers
    balance.py    per-loss gradients: cosines, PCGrad, GradNorm (--loss-balance)
"""
