"""--int8-training: int8 forward and backward matmuls per linear, float latent weights, exact resume, bad input."""
from __future__ import annotations

import json

import pytest
import torch

from pipeline.config import TrainConfig
from pipeline.errors import ConfigError
from stage_student.students.int8 import Int8Linear, to_int8_training

TOL = 2e-2  # relative Frobenius error of Y, dX and dW against float (measured: about 7e-3 on random data)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def int8_rows(a: torch.Tensor) -> torch.Tensor:
    """Row-wise absmax int8 fake quantisation, in float64: codes round(a * 127 / max|row|) (computed in float32, as
    the int8 kernels' inputs are) times max|row| / 127."""
    scale = a.abs().amax(dim=1, keepdim=True) / 127
    codes = (a * (1 / scale.clamp(min=1e-12))).round().clamp(-128, 127)
    return codes.double() * scale.double()


def recipe(x, w, b, dy):
    """The int8 recipe's Y, dX, dW in float64: each matmul's operands quantised along the summed dimension."""
    y = int8_rows(x) @ int8_rows(w).T + b.double()
    dx = int8_rows(dy) @ int8_rows(w.T.contiguous()).T
    dw = (int8_rows(x.T.contiguous()) @ int8_rows(dy.T.contiguous()).T).T
    return y, dx, dw


def test_each_matmul_runs_in_int8_within_tolerance_of_float():
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 80)
    layer = Int8Linear.from_linear(linear)
    assert layer.weight is linear.weight and layer.bias is linear.bias
    x = torch.randn(3, 40, 96, requires_grad=True)
    dy = torch.randn(3, 40, 80)
    y = layer(x)
    y.backward(dy)
    x64, w64 = x.detach().double(), linear.weight.detach().double()
    want = {"Y": x64 @ w64.T + linear.bias.detach().double(), "dX": dy.double() @ w64,
            "dW": dy.double().reshape(-1, 80).T @ x64.reshape(-1, 96)}
    got = {"Y": y.detach(), "dX": x.grad, "dW": linear.weight.grad}
    errors = {k: rel(got[k], want[k]) for k in want}
    print("relative Frobenius error vs float:", {k: f"{v:.2e}" for k, v in errors.items()})
    assert all(1e-3 < e < TOL for e in errors.values()), errors  # quantised (not float), and close to it
    # the error is the recipe's, to float32 rounding: the same row-wise codes multiplied exactly
    ry, rdx, rdw = recipe(x.detach().reshape(-1, 96), linear.weight.detach(), linear.bias.detach(), dy.reshape(-1, 80))
    assert rel(y.detach().reshape(-1, 80), ry) < 1e-5
    assert rel(x.grad.reshape(-1, 96), rdx) < 1e-5
    assert rel(linear.weight.grad, rdw) < 1e-5
    torch.testing.assert_close(linear.bias.grad, dy.sum((0, 1)))


def test_non_contiguous_inputs_and_gradients():
    """A transposed input and a transposed consumer (torchao's function alone fails on both: it .view()s them)."""
    torch.manual_seed(1)
    linear = torch.nn.Linear(64, 48, bias=False)
    layer = Int8Linear.from_linear(linear)
    x = torch.randn(24, 2, 64).transpose(0, 1).requires_grad_()  # [2, 24, 64], not contiguous
    dz = torch.randn(24, 2, 48)
    z = layer(x).transpose(0, 1)  # [24, 2, 48]: the gradient arrives transposed
    z.backward(dz)
    dy = dz.transpose(0, 1).reshape(48, 48)
    ry, rdx, rdw = recipe(x.detach().reshape(-1, 64), linear.weight.detach(), torch.zeros(48), dy)
    assert rel(z.detach().transpose(0, 1).reshape(-1, 48), ry) < 1e-5
    assert rel(x.grad.reshape(-1, 64), rdx) < 1e-5 and rel(linear.weight.grad, rdw) < 1e-5


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, head_dim=32, max_position_embeddings=64)
    return LlamaForCausalLM(cfg)


def test_a_whole_student_keeps_its_float_state_dict_and_gradients():
    model, ref = tiny_llama(), tiny_llama()
    before = model.state_dict()
    names = to_int8_training(model)
    assert len(names) == 2 * 7 and all(".layers." in n for n in names)
    assert type(model.lm_head) is torch.nn.Linear  # the head (inside the fused loss) stays float
    after = model.state_dict()
    assert list(after) == list(before) and all(after[k] is before[k] or after[k].equal(before[k]) for k in after)
    ids = torch.randint(0, 96, (2, 32), generator=torch.Generator().manual_seed(0))
    loss, ref_loss = model(input_ids=ids, labels=ids).loss, ref(input_ids=ids, labels=ids).loss
    loss.backward()
    ref_loss.backward()
    assert abs(loss.item() - ref_loss.item()) < 1e-3 * ref_loss.item()
    grads = dict(model.named_parameters())
    errors = {n: rel(grads[n].grad, p.grad) for n, p in ref.named_parameters()}
    print("worst relative gradient error through 2 layers:", max(errors.items(), key=lambda kv: kv[1]))
    assert max(errors.values()) < 5e-2 and max(errors.values()) > 1e-4


def test_int8_training_is_refused_with_a_bitnet_student():
    from stage_student.plan import validate

    with pytest.raises(ConfigError, match="--int8-training cannot run with --student-quant bitnet"):
        validate(TrainConfig(int8_training=True, student_quant="bitnet"))
    validate(TrainConfig(int8_training=True))


def test_an_int8_run_learns_with_8bit_adamw_and_resumes_exactly(tmp_path, hf_cache):
    from transformers import AutoModelForCausalLM

    from stage_student.train import train

    base = dict(cache=str(hf_cache), student_layers=2, init="random", batch_size=2, logging_steps=1, eval_sequences=4,
                student_config={"hidden_size": 64, "head_dim": 32, "intermediate_size": 128}, lr=1e-2, warmup_steps=2,
                num_workers=0, shuffle_buffer=8, optimizer="adamw8bit", int8_training=True, max_steps=10, save_steps=5)
    full = train(TrainConfig(output=str(tmp_path / "a"), **base))
    rows = [json.loads(l) for l in (tmp_path / "a" / "log.jsonl").read_text().splitlines() if '"loss"' in l]
    print("int8 losses:", [round(r["loss"], 4) for r in rows])
    assert sum(r["loss"] for r in rows[-3:]) < 0.8 * sum(r["loss"] for r in rows[:3])
    run_config = json.loads((tmp_path / "a" / "run_config.json").read_text())
    assert run_config["student"]["int8_training"] == {"modules": 2 * 7}
    train(TrainConfig(output=str(tmp_path / "b"), stop_after_steps=5, **base))
    resumed = train(TrainConfig(output=str(tmp_path / "b"), resume=True, **base))
    b_rows = [json.loads(l) for l in (tmp_path / "b" / "log.jsonl").read_text().splitlines() if '"loss"' in l]
    assert [r["step"] for r in b_rows] == list(range(1, 11))
    for ra, rb in zip(rows, b_rows):
        assert rb["loss"] == pytest.approx(ra["loss"], abs=1e-6), ra["step"]
    assert resumed["eval/forward_kl"] == pytest.approx(full["eval/forward_kl"], rel=1e-6)
    # final/ is a plain float model holding the trained latent weights
    final = AutoModelForCausalLM.from_pretrained(tmp_path / "a" / "final")
    weights = torch.load(tmp_path / "a/checkpoints/step-000010/state.pt", weights_only=False)["model"]
    assert all(type(m) is not Int8Linear for m in final.modules())
    for k, v in final.state_dict().items():
        torch.testing.assert_close(v, weights[k], atol=0, rtol=0)
