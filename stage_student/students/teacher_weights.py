"""The teacher's weights read by name, never the whole model at once (`--init teacher-layers`, `--init-layers auto`).

`TeacherCheckpoint(path)` is a lazy, read-only mapping from the teacher's state-dict names to its tensors: each
lookup reads that one tensor from the safetensors files (`safe_open(...).get_tensor(name)`), in the dtype it was
stored in, so copying 15 of a teacher's 30 layers reads those 15 layers and nothing else.

`streaming_model()` is the teacher as a model whose decoder layers hold no weights (meta tensors): a layer's
weights are read just before it runs and dropped right after, so the layer search (select_layers.py) holds the
embeddings, final norm, head and one decoder layer, not the whole teacher.
"""
from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from pipeline.decoder import layer_list_name
from pipeline.errors import DistilyError


def default_device() -> torch.device:
    """The GPU this process uses, when there is one (under torchrun: its LOCAL_RANK's), else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def empty_model(config) -> nn.Module:
    """The HF model of `config` with meta parameters and real buffers (rotary tables): no weight memory."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config).eval()
    model.tie_weights()  # a tied head is the embedding's parameter (from_config leaves that to from_pretrained)
    return model


def tied_groups(model: nn.Module) -> dict[str, list[str]]:
    """{first name: every name} of each parameter; tied weights (a tied LM head) share one entry."""
    groups: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    return {names[0]: names for names in groups.values()}


def assign(model: nn.Module, names: list[str], tensor: torch.Tensor) -> None:
    """Make `tensor` the (frozen) parameter behind every name in `names`."""
    param = nn.Parameter(tensor, requires_grad=False)
    for name in names:
        owner, _, leaf = name.rpartition(".")
        model.get_submodule(owner)._parameters[leaf] = param


class TeacherCheckpoint(Mapping):
    """The teacher's tensors by the names of its HF model's state dict, read from its files when asked.

    Names follow the model (`model.layers.3.mlp.up_proj.weight`, `lm_head.weight` for a tied head too), whatever
    prefix the files use. `bytes_read` counts the tensor bytes read so far.
    """

    def __init__(self, path: str | Path):
        from transformers import AutoConfig

        self.path = Path(path)
        self.config = AutoConfig.from_pretrained(self.path)
        self.files = self._weight_files()  # {name in the files: file}
        skeleton = empty_model(self.config)
        self.layer_prefix = layer_list_name(skeleton)
        self.groups = tied_groups(skeleton)
        self.names = self._match(skeleton)  # {model name: name in the files}
        self.bytes_read = 0

    def _weight_files(self) -> dict[str, Path]:
        index = self.path / "model.safetensors.index.json"
        if index.exists():
            return {name: self.path / f for name, f in json.loads(index.read_text())["weight_map"].items()}
        single = self.path / "model.safetensors"
        if single.exists():
            from safetensors import safe_open

            with safe_open(single, "pt") as f:
                return {name: single for name in f.keys()}
        bins = sorted(self.path.glob("pytorch_model*.bin"))
        if not bins:
            raise DistilyError(f"--init teacher-layers found no weights (model.safetensors or pytorch_model.bin) in {self.path}")
        return {name: b for b in bins for name in torch.load(b, mmap=True, weights_only=True, map_location="cpu")}

    def _match(self, skeleton: nn.Module) -> dict[str, str]:
        """Model names -> file names: equal, or differing by the base-model prefix (GPT-2 files store `h.0...`
        for `transformer.h.0...`); a tied weight maps to whichever of its names the files hold."""
        base = getattr(skeleton, "base_model_prefix", "")
        names = {}
        for names_of_one in self.groups.values():
            for name in names_of_one:
                stored = next((n for n in (name, name.removeprefix(f"{base}.")) if n in self.files), None)
                if stored:
                    names.update({alias: stored for alias in names_of_one})
                    break
        return names

    # Mapping: model name -> tensor (read now, in its stored dtype, on the CPU)
    def __getitem__(self, name: str) -> torch.Tensor:
        stored = self.names[name]
        file = self.files[stored]
        if file.suffix == ".bin":
            tensor = torch.load(file, mmap=True, weights_only=True, map_location="cpu")[stored].clone()
        else:
            from safetensors import safe_open

            with safe_open(file, "pt") as f:  # closed (unmapped) at once: only the returned copy stays
                tensor = f.get_tensor(stored)
        self.bytes_read += tensor.numel() * tensor.element_size()
        return tensor

    def __iter__(self):
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)

    def shape(self, name: str) -> tuple[int, ...]:
        """A tensor's shape from the file header, without reading its data."""
        stored = self.names[name]
        file = self.files[stored]
        if file.suffix == ".bin":
            return tuple(torch.load(file, mmap=True, weights_only=True, map_location="cpu")[stored].shape)
        from safetensors import safe_open

        with safe_open(file, "pt") as f:
            return tuple(f.get_slice(stored).get_shape())

    def state_dict(self) -> "TeacherCheckpoint":
        """The mapping itself (so callers written for an nn.Module's state_dict() work unchanged)."""
        return self

    def streaming_model(self, device: torch.device | None = None, dtype: torch.dtype | None = None) -> nn.Module:
        """The teacher with its non-layer weights loaded and each decoder layer's read just before it runs and
        freed after it (forward hooks). dtype: the compute dtype (default: float32 on the CPU, where bfloat16
        matmuls are slow and inexact; the stored dtype on a GPU)."""
        device = device or default_device()
        model = empty_model(self.config)
        for module in model.modules():  # rotary tables and other buffers follow the compute device
            module._buffers.update({k: b.to(device) for k, b in module._buffers.items() if b is not None})
        layer_of = lambda name: name.startswith(f"{self.layer_prefix}.")  # noqa: E731

        def load(names_by_param: dict[str, list[str]], where: nn.Module, strip: str = "") -> None:
            for first, names in names_by_param.items():
                t = self[first]
                want = dtype or (torch.float32 if device.type == "cpu" else t.dtype)
                assign(where, [n.removeprefix(strip) for n in names], t.to(device=device, dtype=want))

        load({k: v for k, v in self.groups.items() if not layer_of(k)}, model)
        for i, layer in enumerate(model.get_submodule(self.layer_prefix)):
            prefix = f"{self.layer_prefix}.{i}."
            own = {k: v for k, v in self.groups.items() if k.startswith(prefix)}
            meta = {n: p.shape for n, p in layer.named_parameters()}

            def before(module, _args, own=own, prefix=prefix):
                load(own, module, prefix)

            def after(module, _args, _output, meta=meta):
                for n, shape in meta.items():
                    assign(module, [n], torch.empty(shape, device="meta"))

            layer.register_forward_pre_hook(before)
            layer.register_forward_hook(after)
        return model


def copy_plan(model, names, layers: list[int], copy_embeddings: bool) -> dict[str, str]:
    """{student name: teacher name} of what --init teacher-layers copies: student layer i <- teacher layer
    layers[i]; with copy_embeddings the non-layer weights too (a tied teacher's embeddings as the LM head)."""
    own = model.state_dict()
    prefix = layer_list_name(model)
    layer_key = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.")
    plan = {}
    for name in names:
        m = layer_key.search(name)
        if m:
            for s_layer, src in enumerate(layers):
                if src == int(m.group(1)):
                    plan[layer_key.sub(f"{prefix}.{s_layer}.", name, count=1)] = name
        elif copy_embeddings:
            plan[name] = name
    head = next((f"{n}.weight" for n, mod in model.named_modules() if mod is model.get_output_embeddings()), None)
    embed = next((f"{n}.weight" for n, mod in model.named_modules() if mod is model.get_input_embeddings()), None)
    if copy_embeddings and head in own and head not in plan and embed in plan:
        plan[head] = plan[embed]  # a tied teacher stores no separate LM head
    missing = [n for n in own if n not in plan and layer_key.search(n)]
    if missing:
        raise DistilyError(f"--init teacher-layers found no teacher weights for {missing[:3]}...")
    return {s: t for s, t in plan.items() if s in own}
