"""distily's contract between the stages: cache schema, manifest, config, model/data resolution, CLI."""
__version__ = "0.1.0"

import logging as _logging

# transformers imports torchao (a dependency: --optimizer ao_adamw8bit, --int8-training) whenever it loads a model;
# torchao then logs that its CUDA-only kernels do not load on a CPU, and torch that torchao registers enums the
# old way: four lines on every run that say nothing about the run. Errors still show.
for _name in ("torchao", "torch.utils._pytree"):
    _logging.getLogger(_name).setLevel(_logging.ERROR)
