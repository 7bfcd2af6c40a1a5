"""A cache in a shared directory: files and dirs follow the umask like any tool's, and another user reads them."""
from __future__ import annotations

import os
import shutil
import stat
import tempfile
from pathlib import Path

import pytest
from conftest import capture_cfg

from stage_teacher.capture import run


def modes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): stat.S_IMODE(p.stat().st_mode) for p in [root, *root.rglob("*")]}


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_cache_files_follow_the_umask_and_another_user_reads_them(umask, tiny_teacher, text_file):
    base = Path(tempfile.mkdtemp(prefix="distily-shared-"))
    os.chmod(base, 0o755)  # pytest's tmp dirs are 0700: a second user could not even reach the cache
    out = base / "cache"
    old = os.umask(umask)
    try:
        run(capture_cfg(tiny_teacher, text_file, out, hidden_layers=[1]))
    finally:
        os.umask(old)
    try:
        found = modes(out)
        files = {k: v for k, v in found.items() if (out / k).is_file()}
        dirs = {k: v for k, v in found.items() if (out / k).is_dir()}
        assert any(k.endswith(".parquet") for k in files) and "tokenizer" in dirs and "manifest.json" in files
        assert set(files.values()) == {0o666 & ~umask}, files
        assert set(dirs.values()) == {0o777 & ~umask}, dirs
        if os.geteuid() != 0:
            pytest.skip("reading as a second user needs root to switch users")
        pid = os.fork()
        if pid == 0:  # a second user (nobody), in a child: reads and verifies every shard, exit 0 when it can
            code = 1
            try:
                os.setgid(65534)
                os.setuid(65534)
                from pipeline.cache import CacheReader

                reader = CacheReader(out)
                rows = sum(len(reader.read_shard(s)["input_ids"]) for s in reader.shards)
                code = 0 if rows > 0 and not reader.verify() and os.path.isdir(reader.tokenizer_dir()) else 1
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, "another user could not read the cache"
    finally:
        shutil.rmtree(base, ignore_errors=True)
