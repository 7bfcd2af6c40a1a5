"""The token store: a text dataset tokenised once, for every job and node, as one flat int32 token stream.

    TOKEN_STORE/KEY.npy    the stream: each document (BOS first where the tokenizer adds one), then EOS
    TOKEN_STORE/KEY.json   {tokens, complete, rows (source rows consumed), dataset}

KEY names the text's content, column, sample_by and tokenizer (see `resolve.packed_sequences`). The stream is
the same, token for token, as `resolve.tokenise` gives, so caches keep their dataset fingerprint.

How it is made, in bounded memory whatever the dataset size:
  * `datasets.Dataset.map(batched=True, num_proc=N)` tokenises rows of the (memory-mapped) Arrow text into
    Arrow files inside a per-job work dir of the store;
  * those files are read back with plain reads, batch by batch, and appended to a .npy file whose header
    is written last: the stream is never whole in memory;
  * rows go in chunks of about CHUNK_TOKENS tokens, each by a fresh pool, so neither the Arrow files nor the
    text pages a worker reads grow with the dataset; with --max-tokens, chunks stop once enough tokens are
    in (a prefix of the rows), and a later job that wants more continues where the stored stream stops.
The finished .npy is fsynced and renamed into place, then its description: many array jobs may tokenise at
once, harmlessly (same content; the last rename wins, a stream that covers less never replaces one that
covers more). Readers check that the two files agree and tokenise again otherwise.

Jobs read their [N, T] sequences as a read-only memory map of the stream (only their own pages are read), and
`fingerprint_tokens` hashes the file with plain reads.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import mmap
import os
import shutil
import time
from pathlib import Path

import numpy as np

from .errors import CacheError, ConfigError
from .manifest import make_temp_dir

TOKEN_DTYPE = np.dtype("<i4")
FIRST_ROWS = 256  # the fewest rows of a chunk, and the first chunk for --max-tokens (the old 256-document batch)
ROWS_PER_PROCESS = 1000  # below this many rows per process, tokenise in this process (a pool costs ~1 s)
CHUNK_TOKENS = 1 << 24  # about this many tokens per chunk of rows: bounds the Arrow files and each pool's pages
BLOCK = 1 << 24  # bytes per plain read when copying or hashing a stream
STALE_WORK_S = 86400  # work dirs of killed jobs older than this are removed


def stream_sequences(tokenizer, ds, column: str, store: Path, key: str, max_seq_len: int, max_tokens: int | None,
                     processes: int, describe: dict) -> tuple[np.memmap, str]:
    """([N, max_seq_len] read-only memory map of the stored stream, how the stream was obtained), tokenising
    into the store only what it does not hold yet."""
    meta = read_meta(store, key)
    how = "reused (tokenised earlier)"
    if not covers(meta, max_tokens):
        with tokenising_lock(store, key):  # array jobs arriving together: one tokenises, the others wait and reuse
            meta = read_meta(store, key)
            if not covers(meta, max_tokens):
                meta = tokenise_into_store(tokenizer, ds, column, store, key, max_tokens, processes, meta, describe)
                how = "tokenised"
    return sequences_view(store / f"{key}.npy", meta["tokens"], max_seq_len, max_tokens), how


@contextlib.contextmanager
def tokenising_lock(store: Path, key: str):
    """An exclusive flock on store/KEY.lock while one job tokenises (NFSv4 and Lustre mounted with `flock` honour
    it across nodes). Where the filesystem refuses locks, jobs tokenise side by side as before: each writes its
    own temporary stream and the rename wins, so the result is the same."""
    try:
        store.mkdir(parents=True, exist_ok=True)
        lock = open(store / f"{key}.lock", "a")
    except OSError as e:
        raise unwritable(store, e) from e
    with lock as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX)
        except OSError:
            yield
            return
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def covers(meta: dict | None, max_tokens: int | None) -> bool:
    """Whether a stored stream holds what a capture of max_tokens (None: all) needs."""
    return bool(meta) and (meta["complete"] or bool(max_tokens and meta["tokens"] >= max_tokens))


def read_meta(store: Path, key: str) -> dict | None:
    """The stored stream's description, or None when there is none or it disagrees with the .npy (a write in
    progress by another job)."""
    try:
        meta = json.loads((store / f"{key}.json").read_text())
        stream = np.load(store / f"{key}.npy", mmap_mode="r")  # the header only; no page is read
    except (OSError, ValueError):
        return None
    if stream.dtype != TOKEN_DTYPE or stream.ndim != 1 or len(stream) != meta.get("tokens"):
        return None
    return meta


def sequences_view(path: Path, tokens: int, max_seq_len: int, max_tokens: int | None) -> np.memmap:
    """The first min(tokens, max_tokens) // max_seq_len sequences of a stored stream, as a read-only memory map
    of exactly those bytes (so `fingerprint_tokens` knows where they lie in the file)."""
    usable = min(tokens, max_tokens) if max_tokens else tokens
    n = usable // max_seq_len
    if n == 0:
        raise CacheError(
            f"the dataset gives {usable} tokens, fewer than one sequence of --max-seq-len {max_seq_len}; "
            "use more text or a shorter --max-seq-len"
        )
    header = np.load(path, mmap_mode="r")
    return np.memmap(path, dtype=TOKEN_DTYPE, mode="r", offset=header.offset, shape=(n, max_seq_len))


def fingerprint_tokens(sequences: np.ndarray) -> str:
    """sha256 of the sequences as int32 [N, T] bytes, in blocks of 16 MiB. A memory map made by
    `sequences_view` is hashed from its file with plain reads: touching every page of the map would count
    the whole dataset in the job's RSS."""
    h = hashlib.sha256()
    if is_whole_map(sequences) and hash_file_range(h, sequences.filename, sequences.offset, sequences.nbytes):
        return h.hexdigest()
    h = hashlib.sha256()
    rows = max(1, BLOCK // max(1, sequences[0].size * 4)) if len(sequences) else 1
    for i in range(0, len(sequences), rows):
        h.update(np.ascontiguousarray(sequences[i : i + rows], dtype=np.int32).tobytes())
    return h.hexdigest()


def is_whole_map(a: np.ndarray) -> bool:
    """An np.memmap made directly over a file (not a view of one), int32 and C-ordered: its `offset` and
    `nbytes` are exactly where its data lies in `filename`."""
    return (isinstance(a, np.memmap) and isinstance(a.base, mmap.mmap) and a.filename is not None
            and a.dtype == TOKEN_DTYPE and a.flags.c_contiguous)


def hash_file_range(h, path: str, offset: int, size: int) -> bool:
    """Feed `size` bytes of a file from `offset` to h; False when the file is shorter (replaced meanwhile)."""
    with open(path, "rb") as f:
        f.seek(offset)
        while size:
            block = f.read(min(size, BLOCK))
            if not block:
                return False
            h.update(block)
            size -= len(block)
    return True


# ------------------------------------------------------------------------------------------- writing


def check_writable(store: Path) -> Path:
    """A fresh work dir inside the store, or a ConfigError saying the store cannot be written."""
    try:
        store.mkdir(parents=True, exist_ok=True)
        return make_temp_dir(store, prefix=".work.")
    except OSError as e:
        raise unwritable(store, e) from e


def unwritable(store: Path, e: OSError) -> ConfigError:
    return ConfigError(
        f"--token-store {store} cannot be written ({e.strerror or e}): the text must be tokenised into it once. "
        "Point --token-store at a writable dir (a shared filesystem serves every node), or tokenise once "
        "from a node that can write there."
    )


def tokenise_into_store(tokenizer, ds, column: str, store: Path, key: str, max_tokens: int | None, processes: int,
                        meta: dict | None, describe: dict) -> dict:
    """Tokenise the rows the stored stream lacks (all of them, or until max_tokens), write the longer stream
    atomically, and return its description."""
    if tokenizer.eos_token_id is None:
        raise CacheError("the tokenizer has no EOS token to join documents with")
    work = check_writable(store)
    remove_stale_work(store)
    try:
        new = build_stream(tokenizer, ds.select_columns([column]), column, work, store / f"{key}.npy",
                           meta if meta and "rows" in meta else None, max_tokens, processes)
        if new["complete"] and new["tokens"] == 0:
            raise CacheError(f"--dataset {describe.get('path')!r} holds no text in column {column!r}")
        new["dataset"] = describe
        return publish(work / "stream.npy", store, key, new)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def build_stream(tokenizer, ds, column: str, work: Path, old: Path, meta: dict | None, max_tokens: int | None,
                 processes: int) -> dict:
    """Write work/stream.npy: the stored stream's tokens (when it can be continued), then rows tokenised chunk
    by chunk until the dataset or max_tokens is reached. Returns {tokens, complete, rows}."""
    rows, tokens = (meta["rows"], meta["tokens"]) if meta else (0, 0)
    with open(work / "stream.npy", "wb") as out:
        data_start = write_header(out, 0)
        if tokens:
            copy_stream(old, out, tokens)
        while rows < len(ds) and not (max_tokens and tokens >= max_tokens):
            n = next_chunk(rows, tokens, len(ds), max_tokens, processes)
            tokens += append_chunk(tokenizer, ds.select(range(rows, rows + n)), column, work / f"ids-{rows}.arrow",
                                   out, processes)
            rows += n
        out.seek(0)
        if write_header(out, tokens) != data_start:
            raise CacheError("the .npy header changed size (numpy format change?)")
        out.flush()
        os.fsync(out.fileno())
    return {"tokens": int(tokens), "complete": rows >= len(ds), "rows": int(rows)}


def next_chunk(rows: int, tokens: int, total_rows: int, max_tokens: int | None, processes: int) -> int:
    """Rows to tokenise next: about CHUNK_TOKENS tokens' worth, or fewer when max_tokens needs fewer, estimated
    from the tokens per row so far (at least FIRST_ROWS). Before any token: FIRST_ROWS rows for max_tokens (as
    the old code tokenised 256 documents at a time), else ROWS_PER_PROCESS per process, doubling while the rows
    give no tokens."""
    left = total_rows - rows
    if tokens == 0:
        return min(left, max(FIRST_ROWS if max_tokens else ROWS_PER_PROCESS * processes, rows))
    wanted = min(max_tokens - tokens, CHUNK_TOKENS) if max_tokens else CHUNK_TOKENS
    return min(left, max(FIRST_ROWS, math.ceil(wanted * rows / tokens * 1.1)))


def document_bos(tokenizer) -> list[int]:
    """What starts each document in a stream: [BOS] where the tokenizer adds one, else nothing (every document
    then ends with EOS). The one rule the store, resolve.tokenise (its reference) and generate's prompts
    (stage_teacher/generators.py) follow."""
    return [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None and getattr(tokenizer, "add_bos_token", False) else []


def encode_rows(batch: dict, tokenizer, column: str, bos: list[int]) -> dict:
    """One batch of rows as token ids: BOS (where the tokenizer adds one), the text's ids, EOS; rows that are
    not text or only whitespace give no tokens (as `resolve.tokenise` skips them)."""
    texts = batch[column]
    keep = [i for i, t in enumerate(texts) if isinstance(t, str) and t.strip()]
    encoded = tokenizer([texts[i] for i in keep], add_special_tokens=False)["input_ids"] if keep else []
    ids: list[list[int]] = [[] for _ in texts]
    for i, doc in zip(keep, encoded):
        ids[i] = bos + doc + [tokenizer.eos_token_id]
    return {"ids": ids}


def append_chunk(tokenizer, rows_ds, column: str, arrow_file: Path, out, processes: int) -> int:
    """Tokenise rows into Arrow files (`Dataset.map` with up to `processes` processes, at least ROWS_PER_PROCESS
    rows each; a pool even of one, so the text's pages are read there, not in the job), append their ids to
    `out` and delete the files. Returns the number of tokens appended."""
    from datasets import Features, Sequence, Value

    bos = document_bos(tokenizer)
    num_proc = min(processes, len(rows_ds) // ROWS_PER_PROCESS) or None  # None: in this process
    mapped = rows_ds.map(
        encode_rows, batched=True, batch_size=256, num_proc=num_proc, remove_columns=[column],
        fn_kwargs={"tokenizer": tokenizer, "column": column, "bos": bos},
        features=Features({"ids": Sequence(Value("int32"))}), cache_file_name=str(arrow_file),
        new_fingerprint=hashlib.sha256(str(arrow_file).encode()).hexdigest()[:32], desc="tokenise",
    )
    files = [f["filename"] for f in mapped.cache_files]
    del mapped
    appended = sum(append_arrow_ids(f, out) for f in files)
    for f in files:
        os.unlink(f)
    return appended


def append_arrow_ids(path: str, out) -> int:
    """Append the flattened `ids` column of a `datasets` Arrow file to `out`, one record batch at a time, read
    with plain reads (not memory-mapped, so the pages do not stay in the job's RSS)."""
    import pyarrow as pa

    appended = 0
    with pa.OSFile(path) as src:
        for batch in pa.ipc.open_stream(src):
            flat = batch.column("ids").flatten().to_numpy().astype(TOKEN_DTYPE, copy=False)
            out.write(memoryview(flat).cast("B"))
            appended += len(flat)
    return appended


def write_header(out, tokens: int) -> int:
    """Write a 1-D int32 .npy header for `tokens` at the file position; returns where the data starts. numpy
    pads the header so its size does not depend on the length, so it can be rewritten once the length is known."""
    np.lib.format.write_array_header_1_0(out, {"descr": TOKEN_DTYPE.str, "fortran_order": False, "shape": (tokens,)})
    return out.tell()


def copy_stream(path: Path, out, tokens: int) -> None:
    """Append the first `tokens` tokens of a stored stream to `out`, in plain-read blocks."""
    offset = np.load(path, mmap_mode="r").offset
    left = tokens * TOKEN_DTYPE.itemsize
    with open(path, "rb") as src:
        src.seek(offset)
        while left:
            block = src.read(min(left, BLOCK))
            if not block:
                raise CacheError(f"{path} is shorter than its description says; delete it and rerun")
            out.write(block)
            left -= len(block)


def publish(tmp: Path, store: Path, key: str, meta: dict) -> dict:
    """Rename the new stream into place, then its description (both atomic). When another job has meanwhile
    stored a stream that covers as much, keep that one: the streams agree on every token they share."""
    from .manifest import atomic_write_json, fsync_dir

    current = read_meta(store, key)
    if current and (current["complete"] or current["tokens"] >= meta["tokens"]):
        return current
    os.replace(tmp, store / f"{key}.npy")
    fsync_dir(store)
    atomic_write_json(store / f"{key}.json", meta)
    return meta


def remove_stale_work(store: Path) -> None:
    """Work dirs of jobs killed mid-tokenisation, once they are a day old (live jobs write to theirs)."""
    for stale in store.glob(".work.*.tmp"):
        try:
            if time.time() - stale.stat().st_mtime > STALE_WORK_S:
                shutil.rmtree(stale, ignore_errors=True)
        except OSError:
            pass
