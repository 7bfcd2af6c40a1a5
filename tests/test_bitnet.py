"""BitNet b1.58 students: the quantised forward, straight-through gradients, the packed export and its loading."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from pipeline.config import ExportConfig, TrainConfig
from pipeline.errors import ConfigError, DistilyError
from stage_student.export.run import export, pack_linear
from stage_student.students.bitnet import BitLinear, act_levels, check_student_quant, ternary_codes, to_bitnet
from stage_student.training.evaluate import evaluate


def reference_bitlinear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """BitNet b1.58 in float64, from the paper's definitions: absmean ternary weights, absmax int8 activations."""
    x, w = x.double(), w.double()
    s = 1 / w.abs().mean().clamp(min=1e-5)
    wq = (w * s).round().clamp(-1, 1) / s
    a = 127 / x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-5)
    xq = (x * a).round().clamp(-128, 127) / a
    return xq @ wq.T + (b.double() if b is not None else 0)


def bitlinear(in_features=48, out_features=32, bias=True, seed=0) -> BitLinear:
    torch.manual_seed(seed)
    layer = BitLinear.from_linear(torch.nn.Linear(in_features, out_features, bias=bias))
    with torch.no_grad():
        layer.bias.normal_() if bias else None
    return layer


def tiny_llama(bias: bool = False, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, head_dim=32, max_position_embeddings=64, attention_bias=bias)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # larger than the init's 0.02 std, so the logits differ visibly between layers
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


@pytest.fixture
def eager_transformers():
    """transformers' BitNet functions without torch.compile (seconds of compilation per shape on CPUs). Their
    compiled forms are compared with BitLinear in test_forward_is_transformers_online_autobitlinear."""
    with torch._dynamo.config.patch(disable=True):
        yield


def test_forward_equals_the_float64_reference_and_gradients_go_straight_through():
    layer = bitlinear()
    x = torch.randn(3, 5, 48, requires_grad=True)
    y = layer(x)
    torch.testing.assert_close(y.double(), reference_bitlinear(x.detach(), layer.weight.detach(), layer.bias.detach()),
                               atol=1e-5, rtol=1e-5)
    # STE: the gradients are those of the plain linear layer evaluated at the quantised weight and input
    g = torch.randn_like(y)
    (y * g).sum().backward()
    codes, scale = ternary_codes(layer.weight)
    wq = (codes.float() * scale).requires_grad_()
    a = 127 / x.detach().abs().amax(dim=-1, keepdim=True).clamp(min=1e-5)
    xq = ((x.detach() * a).round().clamp(-128, 127) / a).requires_grad_()
    (F.linear(xq, wq, layer.bias.detach()) * g).sum().backward()
    torch.testing.assert_close(layer.weight.grad, wq.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x.grad, xq.grad, atol=1e-5, rtol=1e-5)
    assert layer.weight.dtype == torch.float32 and set(codes.unique().tolist()) <= {-1, 0, 1}


def test_forward_is_transformers_online_autobitlinear():
    from transformers.integrations.bitnet import ActQuant, AutoBitLinear, WeightQuant

    layer = bitlinear()
    theirs = AutoBitLinear(48, 32, bias=True, online_quant=True)
    theirs.load_state_dict(layer.state_dict())
    x = torch.randn(3, 5, 48)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), theirs(x), atol=1e-6, rtol=1e-6)
        codes, scale = ternary_codes(layer.weight)
        # their (compiled) weight path rounds within an ulp of ours; the codes are the same
        torch.testing.assert_close(codes.float() * scale, WeightQuant.apply(layer.weight), atol=1e-7, rtol=0)
        assert torch.equal(ActQuant.apply(x), (lambda a: (x * a).round().clamp(-128, 127) / a)(
            127 / x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-5)))


def test_packed_weights_unpack_to_the_trained_codes_and_scale(eager_transformers):
    from transformers.integrations.bitnet import AutoBitLinear, unpack_weights

    layer = bitlinear(bias=True)
    packed = pack_linear("l", layer)
    codes, scale = ternary_codes(layer.weight)
    assert packed["l.weight"].dtype == torch.uint8 and packed["l.weight"].shape == (32 // 4, 48)
    assert torch.equal(unpack_weights(packed["l.weight"], dtype=torch.float32), codes.float())
    assert torch.equal(packed["l.weight_scale"], scale.reshape(1))
    torch.testing.assert_close(scale, layer.weight.detach().abs().mean())  # stored as mean|W| (offline multiplies)
    # transformers' offline layer (its load hook unpacks) computes what the training layer computes, bias included
    offline = AutoBitLinear(48, 32, bias=True, online_quant=False)
    offline.load_state_dict({k.removeprefix("l."): v for k, v in packed.items()})
    x = torch.randn(2, 7, 48)
    with torch.no_grad():
        torch.testing.assert_close(offline(x), layer(x), atol=1e-5, rtol=1e-5)
    with pytest.raises(DistilyError, match="multiple of 4"):
        pack_linear("odd", torch.nn.Linear(8, 6))


def test_export_loads_in_transformers_with_the_training_logits_at_two_bits(tmp_path, eager_transformers):
    from transformers import AutoModelForCausalLM

    model = tiny_llama(bias=True)
    replaced = to_bitnet(model)
    assert len(replaced) == 14 and all(".layers." in n for n in replaced)
    assert model.config.quantization_config["modules_to_not_convert"] == ["lm_head"]
    model.save_pretrained(tmp_path / "run" / "final")
    ids = torch.randint(0, 96, (2, 12))
    with torch.no_grad():
        want = model(ids).logits
    sizes = export(ExportConfig(run_dir=str(tmp_path / "run"), output=str(tmp_path / "out")))
    assert json.loads((tmp_path / "out" / "export.json").read_text())["packed_linear_bytes"] == sizes["packed_linear_bytes"]
    assert not list(tmp_path.glob("out.tmp-*"))
    config = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert (config["quantization_mode"], config["linear_class"]) == ("offline", "autobitlinear")

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    with torch.no_grad():
        got = loaded(ids).logits
    diff = (got - want).abs().max().item()
    print(f"\nexported vs training logits: max abs diff {diff:.3g} (logits up to {want.abs().max():.3g})")
    assert diff < 1e-4
    # the loaded ternary weights are the trained codes, the scales the trained scales
    for name in replaced:
        codes, scale = ternary_codes(model.get_submodule(name).weight)
        assert torch.equal(loaded.get_submodule(name).weight, codes.float())
        assert torch.equal(loaded.get_submodule(name).weight_scale, scale.reshape(1))
    # sizes: 2 bits per ternary weight plus one float32 scale per matrix, and the file holds what the accounting says
    linear_params = sum(model.get_submodule(n).weight.numel() for n in replaced)
    assert sizes["linear_params"] == linear_params
    assert sizes["bits_per_linear_param"] <= 2.1
    assert sizes["packed_linear_bytes"] == linear_params // 4 + 4 * len(replaced)
    file = tmp_path / "out" / "model.safetensors"
    header = int.from_bytes(file.read_bytes()[:8], "little")
    assert file.stat().st_size == 8 + header + sizes["tensor_bytes"] == sizes["safetensors_bytes"]
    assert sizes["tensor_bytes"] == sizes["packed_linear_bytes"] + sizes["full_precision_bytes"]
    print(f"tiny model export: {sizes}")
    with pytest.raises(DistilyError, match="already packed"):
        export(ExportConfig(run_dir=str(tmp_path / "out"), output=str(tmp_path / "again")))


def test_bad_input_is_refused_before_work(tmp_path):
    from pipeline.cli import app

    plain = tmp_path / "plain"
    tiny_llama().save_pretrained(plain)

    r = CliRunner().invoke(app, ["export", str(plain), str(tmp_path / "x")])
    assert r.exit_code == 2 and "is not a BitNet student" in r.output and "--student-quant bitnet" in r.output
    assert not (tmp_path / "x").exists()
    r = CliRunner().invoke(app, ["export", str(tmp_path / "nothing"), str(tmp_path / "x")])
    assert r.exit_code == 2 and "holds a model" in r.output
    with pytest.raises(DistilyError, match="--format"):
        export(ExportConfig(run_dir=str(plain), output=str(tmp_path / "x"), format="onnx"))
    with pytest.raises(ConfigError, match="--student-quant 'foo' is unknown; choose one of none, bitnet"):
        check_student_quant("foo")


def test_bitnet_training_learns_saves_and_exports(tmp_path, hf_cache, eager_transformers):
    from transformers import AutoModelForCausalLM

    from pipeline.cli import app
    from stage_student.train import Trainer, train

    base = dict(cache=str(hf_cache), student_layers=2, init="teacher-layers", init_layers="evenly", batch_size=2,
                save_steps=100, logging_steps=1, eval_sequences=4, lr=3e-3, warmup_steps=2, num_workers=0,
                shuffle_buffer=8, optimizer="adamw8bit")
    with pytest.raises(ConfigError, match="--student-quant 'foo'"):
        train(TrainConfig(output=str(tmp_path / "bad"), student_quant="foo", **base))

    trainer = Trainer(TrainConfig(output=str(tmp_path / "run"), student_quant="bitnet", max_steps=20, **base))
    assert trainer.student_info["quant"] == {"kind": "bitnet", "modules": 14}
    assert sum(isinstance(m, BitLinear) for m in trainer.model.modules()) == 14
    assert isinstance(trainer.model.lm_head, torch.nn.Linear) and not isinstance(trainer.model.lm_head, BitLinear)
    before = evaluate(trainer)
    result = trainer.run()
    print(f"\nbitnet student eval forward KL: {before['eval/forward_kl']:.4f} -> {result['eval/forward_kl']:.4f}")
    assert result["eval/forward_kl"] < 0.9 * before["eval/forward_kl"]
    state = trainer.optimizer.state[trainer.model.model.layers[0].mlp.up_proj.weight]
    assert state["state1"].dtype == torch.uint8  # the 8-bit optimizer updates the float32 latent weights

    ids = torch.randint(0, trainer.model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    trainer.model.eval()
    with torch.no_grad():
        want = trainer.model(ids).logits
        final = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final")
        diff_final = (final(ids).logits - want).abs().max().item()
    r = CliRunner().invoke(app, ["export", "--format", "bitnet", str(tmp_path / "run"), str(tmp_path / "exp")])
    assert r.exit_code == 0, r.output
    assert "bits each" in r.output
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "exp")
    levels = {"training": {}, "export": {}}  # each quantised layer's int8 activation levels, in both models
    for side, model in (("training", trainer.model), ("export", exported)):
        for name, module in model.named_modules():
            if name.endswith("_proj"):
                module.register_forward_pre_hook(lambda m, args, side=side, name=name: levels[side].__setitem__(
                    name, act_levels(args[0])[0]))
    with torch.no_grad():
        trainer.model(ids)
        diff_export = (exported(ids).logits - want).abs().max().item()
    flips = [(levels["training"][n] - levels["export"][n]).abs() for n in levels["training"]]
    sizes = json.loads((tmp_path / "exp" / "export.json").read_text())
    print(f"trained student (logits up to {want.abs().max():.3g}): final/ vs training max abs diff {diff_final:.3g}; "
          f"export {diff_export:.3g}, {sum(int((f > 0).sum()) for f in flips)} activation levels flipped; {sizes}")
    # final/ is the training model itself. The export holds the same codes and scales (bit for bit: the tests above),
    # but transformers' offline layer divides by the scales after its integer matmul where training divides before:
    # layer inputs differ by ~1e-6, so an activation on a .5 boundary may round to the neighbouring int8 level. Where
    # none did, the logits agree to 1e-4; a flipped level moves them by ~1e-3 (measured 1.4e-3 of logits up to 5.9
    # once); wrong codes would move levels by more than one and the logits by ~1
    assert len(flips) == 14 and max(f.max().item() for f in flips) <= 1
    assert diff_final < 1e-4 and diff_export < (5e-3 if any(f.any() for f in flips) else 1e-4)
    assert sizes["bits_per_linear_param"] <= 2.1
    assert (tmp_path / "exp" / "tokenizer.json").exists() or (tmp_path / "exp" / "tokenizer_config.json").exists()


def test_a_same_shape_ternary_student_keeps_every_teacher_layer(tmp_path, hf_cache):
    """--init-layers auto at the teacher's depth: nothing to choose, every layer copied (no selection run)."""
    from stage_student.train import Trainer

    trainer = Trainer(TrainConfig(cache=str(hf_cache), output=str(tmp_path), student_layers=4, init="teacher-layers",
                                  student_quant="bitnet", eval_sequences=4))
    assert trainer.student_info["teacher_layers"] == [0, 1, 2, 3] and "layer_selection" not in trainer.student_info
    assert sum(isinstance(m, BitLinear) for m in trainer.model.modules()) == 4 * 7


def test_a_ternary_run_resumes_exactly(tmp_path, hf_cache):
    from stage_student.train import train

    base = dict(cache=str(hf_cache), student_layers=2, init="teacher-layers", init_layers="evenly", batch_size=2,
                logging_steps=1, eval_sequences=4, lr=3e-3, warmup_steps=2, num_workers=0, shuffle_buffer=8,
                student_quant="bitnet", max_steps=6, save_steps=3)
    full = train(TrainConfig(output=str(tmp_path / "a"), **base))
    train(TrainConfig(output=str(tmp_path / "b"), stop_after_steps=3, **base))
    resumed = train(TrainConfig(output=str(tmp_path / "b"), resume=True, **base))
    assert resumed["loss"] == pytest.approx(full["loss"], rel=1e-5)
    assert resumed["eval/forward_kl"] == pytest.approx(full["eval/forward_kl"], rel=1e-5)
    with pytest.raises(DistilyError, match="student_quant='bitnet'"):
        train(TrainConfig(output=str(tmp_path / "b"), resume=True, **{**base, "student_quant": "none", "max_steps": 9}))
