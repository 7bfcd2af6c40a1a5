"""Any GGUF file as a teacher or student (`--teacher FILE.gguf`): converted once, keyed by the file's hash, and
equal to the model it was written from and to transformers' own GGUF load."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import build_llama, build_tokenizer, capture_cfg
from gguf_models import build_gemma3, build_qwen2, write_gguf

from pipeline.cache import CacheReader
from pipeline.errors import DistilyError
from pipeline.resolve import resolve_model


@pytest.fixture(scope="module")
def gguf_files(tmp_path_factory, texts) -> dict[str, tuple[Path, Path]]:
    """{arch: (the HF model dir it was written from, the .gguf)} for a tiny Llama, Qwen2 and Gemma 3."""
    root = tmp_path_factory.mktemp("gguf")
    files = {}
    for arch, build in (("llama", lambda d, v: build_llama(d, v, layers=2, hidden=64, heads=4, kv_heads=2)),
                        ("qwen2", build_qwen2), ("gemma3", build_gemma3)):
        src = root / f"{arch}-src"
        tok = build_tokenizer(texts, src)
        build(src, len(tok))
        files[arch] = (src, write_gguf(src, root / f"tiny-{arch}.gguf", arch))
    return files


def logits(model_dir, ids: torch.Tensor, **kw) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, **kw).eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_a_gguf_converts_once_to_the_model_it_was_written_from(gguf_files, texts, arch, capsys):
    from transformers import AutoTokenizer

    src, path = gguf_files[arch]
    local, info = resolve_model(str(path))
    assert Path(local).name.startswith(f"tiny-{arch}-") and info["source"] == "gguf" and info["revision"].startswith("gguf sha256 ")
    assert "converting" in capsys.readouterr().out
    assert resolve_model(str(path))[0] == local and "converting" not in capsys.readouterr().out  # once
    tok = AutoTokenizer.from_pretrained(local)
    want = AutoTokenizer.from_pretrained(src)
    if arch != "gemma3":  # transformers reads a Gemma GGUF's vocabulary with Gemma's own space handling, which the
        # byte-level BPE written here does not have (real Gemma GGUFs carry a sentencepiece one): its weights are checked
        assert [tok.encode(t) for t in texts[:20]] == [want.encode(t) for t in texts[:20]]
    ids = torch.tensor([want.encode(texts[0])[:48]])
    converted = logits(local, ids)
    torch.testing.assert_close(converted, logits(src, ids), atol=1e-4, rtol=1e-4)  # F32 GGUF: nothing lost
    torch.testing.assert_close(converted, logits(path.parent, ids, gguf_file=path.name), atol=1e-5, rtol=1e-5)


def test_a_changed_gguf_is_converted_again(gguf_files, tmp_path):
    src, path = gguf_files["llama"]
    copy = shutil.copy(path, tmp_path / path.name)
    first = resolve_model(str(copy))[0]
    with open(copy, "ab") as f:  # trailing bytes: another file, the same model
        f.write(b"\0" * 32)
    assert resolve_model(str(copy))[0] != first


def test_a_gguf_transformers_cannot_read_is_refused_naming_its_architecture(tmp_path):
    import gguf

    path = tmp_path / "enc.gguf"
    writer = gguf.GGUFWriter(path, "bert")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(DistilyError, match="architecture 'bert'.*qwen2"):
        resolve_model(str(path))
    with pytest.raises(DistilyError, match="no such GGUF file"):
        resolve_model(str(tmp_path / "missing.gguf"))
    (tmp_path / "text.gguf").write_text("not a model")
    with pytest.raises(DistilyError, match="not a readable GGUF file"):
        resolve_model(str(tmp_path / "text.gguf"))


def test_jobs_converting_one_gguf_at_once_convert_it_once(gguf_files, tmp_path):
    """Two processes resolve the same new GGUF together: one converts (a file lock), the other waits and uses its dir;
    neither leaves a temporary dir behind."""
    import os
    import subprocess
    import sys

    path = gguf_files["qwen2"][1]
    env = {**os.environ, "DISTILY_HOME": str(tmp_path / "home")}
    code = f"from pipeline.resolve import resolve_model; print('DIR', resolve_model({str(path)!r})[0])"
    jobs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env,
                             cwd=Path(__file__).parents[1]) for _ in range(2)]
    outs = [j.communicate(timeout=300)[0] for j in jobs]
    assert all(j.returncode == 0 for j in jobs), outs
    assert sum(line.startswith("converting ") for o in outs for line in o.splitlines()) == 1
    dirs = {line.split(" ", 1)[1] for o in outs for line in o.splitlines() if line.startswith("DIR ")}
    assert len(dirs) == 1
    teachers = tmp_path / "home" / "teachers"
    assert sorted(p.name for p in teachers.iterdir() if not p.name.startswith(".gguf-sha256")
                  and not p.name.endswith(".lock")) == [Path(dirs.pop()).name]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_a_gguf_teachers_cache_equals_transformers_forward_of_the_gguf(gguf_files, text_file, tmp_path, arch):
    """Log-probs within 1e-3 in float32; top-1 agreement >= 0.999 wherever the top two are not tied within 1e-3
    (random tiny models have near-ties)."""
    from stage_teacher.capture import run

    src, path = gguf_files[arch]
    cache = tmp_path / "cache"
    run(capture_cfg(str(path), text_file, cache, hidden_layers=[], max_tokens=64 * 8))
    reader = CacheReader(cache)
    assert reader.manifest["teacher"]["path"] == resolve_model(str(path))[0]
    top1, n = 0, 0
    for seq in reader.iter_sequences():
        ids = torch.from_numpy(seq["input_ids"].astype(np.int64))[None]
        want = torch.log_softmax(logits(path.parent, ids, gguf_file=path.name)[0, :-1], -1)
        got_ids = torch.from_numpy(seq["topk_ids"].astype(np.int64))
        got = torch.from_numpy(seq["topk_logprobs"])
        torch.testing.assert_close(got, want.gather(-1, got_ids), atol=1e-3, rtol=0)
        two = want.topk(2, dim=-1).values
        clear = two[:, 0] - two[:, 1] > 1e-3  # where the top two are not tied within the log-prob tolerance
        top1 += int((got_ids[clear, 0] == want[clear].argmax(-1)).sum())
        n += int(clear.sum())
    assert top1 / n >= 0.999


@pytest.mark.parametrize("gguf_as", ["baseline", "model"])
def test_eval_takes_a_gguf_as_model_or_baseline(gguf_files, text_file, tmp_path, gguf_as):
    """`distily eval --baseline FILE.gguf` (e.g. a pretrained student's starting point) or `--model FILE.gguf`:
    converted like a teacher, scored like the model it was written from (F32 GGUF: the same perplexity)."""
    from eval.run import run
    from pipeline.config import EvalConfig

    src, path = gguf_files["llama"]
    first, second = (src, path) if gguf_as == "baseline" else (path, src)
    summary = run(EvalConfig(model=str(first), baseline=[str(second)], tasks=[], dataset=str(text_file),
                             max_documents=4, max_seq_len=64, stride=32, output=str(tmp_path / "eval")))
    scored = dict(zip((first, second), summary["models"].values()))
    assert list(summary["models"]) == [first.name, second.name]
    assert scored[path]["path"] == resolve_model(str(path))[0]
    assert scored[path]["metrics"]["heldout/perplexity"] == pytest.approx(scored[src]["metrics"]["heldout/perplexity"],
                                                                          rel=1e-5)
