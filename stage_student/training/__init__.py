"""The training loop's parts (train.py puts them together).

    step.py             one optimizer step: the Distiller loss module, cached and online teachers, train_step
    data.py             the cache stream: shuffled, sharded by rank, resumable to the micro-batch
    parallel.py         one process, DDP or FSDP (--parallel), chosen in one place
    checkpoint.py       checkpoints written whole (temp name, fsync, rename), --resume, final/
    metrics.py          memory, tensor bytes, the logging window, log.jsonl and TensorBoard
    evaluate.py         held-out KD and CE on the cache's last --eval-sequences sequences
    optim.py            8-bit optimizers and the learning-rate schedule
    cross_tokenizer.py  --cross-tokenizer batches (token_align.py: its pure mapping and alignment functions)
"""
