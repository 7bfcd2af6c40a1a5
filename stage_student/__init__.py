"""Stage two: students trained from a teacher cache (`distily train-student`), and their export.

    train.py      the recipe: plan the run, build its parts, loop, finish
    plan.py       what a run needs, resolved once from the config and the cache's manifest
    cli.py        the `train-student` and `export` commands
    losses/       each loss as a pure function, and the chunked LM-head loss that runs them
    students/     building a student: recipes, layer selection, teacher weights, BitNet, int8
    training/     the step, the data stream, DDP/FSDP, checkpoints, metrics, the optimizer
    export/       packed BitNet HF dirs and GGUF files
"""
import logging

# On CPU torchao logs "Failed to load ... _C_mxfp8" (its CUDA kernels) when imported: harmless, silenced once here.
logging.getLogger("torchao").setLevel(logging.ERROR)
