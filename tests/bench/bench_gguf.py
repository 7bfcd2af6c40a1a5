"""A ternary SmolLM2-shaped student in llama.cpp (`distily export --format gguf`) against the same student in
transformers: file sizes, logit agreement and perplexity on held-out text, tokens/s on this CPU (issue 22, section 5).

    python tests/bench/bench_gguf.py [--student RUN_DIR] [--tokens 512] [--decode 64] [--threads 2] [--json out.json]

Trains nothing. Without --student it makes the student once under .cache/bench-gguf: the embedded SmolLM2-135M
teacher's weights with every decoder linear made BitNet (to_bitnet, as `--student-quant bitnet` starts training),
so the shapes, vocabulary and tokenizer are the real ones (its perplexity is that of an untrained ternary model).
Held-out text: the embedded `lee` corpus (the demo trains on `lee-background`).

Per GGUF type (TQ2_0, TQ1_0) llama.cpp's logits (llama-cpp-python, logits_all, default f16 KV cache) on --tokens
tokens are compared with (a) the trained model (BitLinear: int8 activations per token) and (b) the weights-only
reference (the same ternary weights, float activations: what llama.cpp's Llama graph computes). Tokens/s: prompt
processing of --tokens tokens and greedy decoding of --decode tokens, llama.cpp against transformers float32 (the
ternary weights as plain nn.Linear, and the BitLinear training model), --threads threads each.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from llama_cpp_loader import load_llama_cpp  # noqa: E402

from pipeline.config import ExportConfig  # noqa: E402
from pipeline.resolve import (  # noqa: E402
    DatasetSpec,
    load_texts,
    resolve_model,
    trained_model_dir,  # noqa: E402
)
from stage_student.export.run import export, load_latent  # noqa: E402
from stage_student.students.bitnet import ternary_codes, to_bitnet  # noqa: E402

WORK = ROOT / ".cache" / "bench-gguf"


def make_student() -> Path:
    """The embedded teacher made BitNet (latent weights = the teacher's), saved as train-student's final/ would be."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = WORK / "student" / "final"
    if (out / "config.json").exists():
        return out.parent
    teacher, _ = resolve_model(None)
    model = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32)
    to_bitnet(model)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(teacher).save_pretrained(out)
    return out.parent


def weights_only(model, names):
    """The student with its ternary weights as plain float nn.Linear (no activation quantisation)."""
    import copy

    ref = copy.deepcopy(model)
    for name in names:
        codes, scale = ternary_codes(model.get_submodule(name).weight)
        linear = torch.nn.Linear(codes.shape[1], codes.shape[0], bias=False)
        linear.weight = torch.nn.Parameter(codes.float() * scale, requires_grad=False)
        ref.set_submodule(name, linear)
    return ref.eval()


def nll(logits: np.ndarray, ids: list[int]) -> float:
    """Mean negative log-likelihood of ids[1:] under logits[:-1] (float64)."""
    x = torch.from_numpy(np.asarray(logits[:-1], dtype=np.float64))
    return torch.nn.functional.cross_entropy(x, torch.tensor(ids[1:])).item()


def compare(got: np.ndarray, want: np.ndarray) -> dict:
    g, w = torch.from_numpy(got).double(), torch.from_numpy(want).double()
    kl = torch.nn.functional.kl_div(g.log_softmax(-1), w.log_softmax(-1), log_target=True, reduction="none").sum(-1)
    return {"max_abs": (g - w).abs().max().item(), "mean_abs": (g - w).abs().mean().item(),
            "kl_mean": kl.mean().item(), "top1": (g.argmax(-1) == w.argmax(-1)).double().mean().item()}


def torch_speed(model, ids: list[int], decode: int) -> dict:
    with torch.no_grad():
        x = torch.tensor([ids])
        model(x[:, :8])  # warm-up
        t = time.perf_counter()
        out = model(x, use_cache=True)
        prompt_s = time.perf_counter() - t
        past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        t = time.perf_counter()
        for _ in range(decode):
            out = model(nxt, past_key_values=past, use_cache=True)
            past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        decode_s = time.perf_counter() - t
    return {"prompt_tok_s": len(ids) / prompt_s, "decode_tok_s": decode / decode_s}


def llama_logits(path: Path, ids: list[int], threads: int) -> np.ndarray:
    llm = load_llama_cpp(path, n_ctx=len(ids) + 8, n_batch=len(ids), logits_all=True,
                         n_threads=threads, n_threads_batch=threads, verbose=False)
    llm.eval(ids)
    logits = np.array(llm.scores[: len(ids)], dtype=np.float64)
    llm.close()
    return logits


def llama_speed(path: Path, ids: list[int], decode: int, threads: int) -> dict:
    llm = load_llama_cpp(path, n_ctx=len(ids) + decode + 8, n_batch=len(ids), n_threads=threads,
                         n_threads_batch=threads, verbose=False)
    llm.eval(ids[:8])  # warm-up
    llm.reset()
    t = time.perf_counter()
    llm.eval(ids)
    prompt_s = time.perf_counter() - t
    last = lambda: int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))))  # noqa: E731
    nxt = last()  # greedy, from the last position's logits (without logits_all llm.scores is not filled)
    t = time.perf_counter()
    for _ in range(decode):
        llm.eval([nxt])
        nxt = last()
    decode_s = time.perf_counter() - t
    llm.close()
    return {"prompt_tok_s": len(ids) / prompt_s, "decode_tok_s": decode / decode_s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--student", help="a --student-quant bitnet run dir (default: the embedded teacher made BitNet)")
    ap.add_argument("--tokens", type=int, default=512, help="held-out tokens scored (one sequence)")
    ap.add_argument("--decode", type=int, default=64, help="tokens decoded one by one for tokens/s")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default="bench-results/gguf.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer

    run = Path(args.student) if args.student else make_student()
    src = Path(trained_model_dir(str(run)))
    tok = AutoTokenizer.from_pretrained(src)
    ids = tok("\n\n".join(load_texts(DatasetSpec("lee"))))["input_ids"][: args.tokens]

    sizes = {"float32 student (final/)": sum(f.stat().st_size for f in src.glob("*.safetensors"))}
    exports = {}
    for fmt, kind in (("bitnet", None), ("gguf", "tq2_0"), ("gguf", "tq1_0")):
        name = kind or fmt
        t = time.perf_counter()
        exports[name] = export(ExportConfig(run_dir=str(run), output=str(WORK / f"export-{name}"), format=fmt,
                                            gguf_type=kind or "tq2_0"), log=lambda s: None)
        exports[name]["export_s"] = time.perf_counter() - t
        sizes[f"{fmt} export ({name})"] = exports[name]["total_bytes"]

    model, names = load_latent(src)
    model.eval()
    ref = weights_only(model, names)
    with torch.no_grad():
        trained_logits = model(torch.tensor([ids])).logits[0].double().numpy()
        ref_logits = ref(torch.tensor([ids])).logits[0].double().numpy()
    result = {"student": str(src), "tokens": len(ids), "decode": args.decode, "threads": args.threads,
              "sizes_bytes": sizes, "exports": exports,
              "ppl": {"transformers trained (int8 activations)": float(np.exp(nll(trained_logits, ids))),
                      "transformers weights-only (float activations)": float(np.exp(nll(ref_logits, ids)))},
              "reference_vs_trained": compare(ref_logits, trained_logits), "llama_cpp": {}, "speed": {}}
    for kind in ("tq2_0", "tq1_0"):
        path = Path(exports[kind]["output"]) / "model.gguf"
        got = llama_logits(path, ids, args.threads)
        result["ppl"][f"llama.cpp {kind.upper()}"] = float(np.exp(nll(got, ids)))
        result["llama_cpp"][kind] = {"vs_trained": compare(got, trained_logits), "vs_weights_only": compare(got, ref_logits)}
        result["speed"][f"llama.cpp {kind.upper()}"] = llama_speed(path, ids, args.decode, args.threads)
    result["speed"]["transformers float32 (ternary weights as nn.Linear)"] = torch_speed(ref, ids, args.decode)
    result["speed"]["transformers float32 BitLinear (training forward)"] = torch_speed(model, ids, args.decode)

    mib = lambda b: f"{b / 2**20:8.2f} MiB"  # noqa: E731
    print(f"\nstudent {src}, {len(ids)} held-out tokens (lee), {args.threads} threads\n")
    print(f"{'file':44s} {'size':>12s}")
    for k, v in sizes.items():
        print(f"{k:44s} {mib(v)}")
    print(f"\n{'logits':44s} {'max|d|':>8s} {'mean|d|':>8s} {'KL':>9s} {'top-1':>6s}")
    rows = [("weights-only reference vs trained", result["reference_vs_trained"])]
    for kind, r in result["llama_cpp"].items():
        rows += [(f"llama.cpp {kind.upper()} vs trained", r["vs_trained"]),
                 (f"llama.cpp {kind.upper()} vs weights-only reference", r["vs_weights_only"])]
    for name, c in rows:
        print(f"{name:44s} {c['max_abs']:8.4f} {c['mean_abs']:8.4f} {c['kl_mean']:9.2e} {c['top1']:6.3f}")
    print(f"\n{'perplexity on held-out text':44s}")
    for k, v in result["ppl"].items():
        print(f"{k:44s} {v:10.3f}")
    print(f"\n{'tokens/s':52s} {'prompt':>8s} {'decode':>8s}")
    for k, v in result["speed"].items():
        print(f"{k:52s} {v['prompt_tok_s']:8.1f} {v['decode_tok_s']:8.1f}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1, default=str))
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
