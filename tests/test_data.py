"""The Arrow cache: its key follows every source file, errors name the split and the files, killed
builds are cleaned up, and two-document examples record their longest document."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from lra_dtn import data
from lra_dtn.data import DataError, cached_splits, file_fingerprint


def files(folder: Path, count: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"f{i}.txt" for i in range(count)]
    for p in paths:
        p.write_text("x")
    return paths


def test_fingerprint_lists_few_files_and_digests_many(tmp_path):
    few = files(tmp_path / "few", 3)
    assert [entry[0] for entry in file_fingerprint(few)] == sorted(map(str, few))
    many = files(tmp_path / "many", data.FINGERPRINT_LIST + 1)
    digest = file_fingerprint(many)
    assert digest["files"] == len(many) and set(digest) == {"files", "first", "last", "sha256"}
    stat = os.stat(many[57])
    os.utime(many[57], ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))  # one file touched: another key
    assert file_fingerprint(many)["sha256"] != digest["sha256"]


def build(splits):
    return lambda: {name: iter(examples) for name, examples in splits.items()}


def broken(after: int, error: Exception):
    for i in range(after):
        yield {"input_ids": [1, 2], "label": 0}
    raise error


@pytest.mark.parametrize("after", [0, 3])
def test_any_reader_error_names_the_split_and_its_files(tmp_path, after):
    params = {"task": "t", "sources": file_fingerprint(files(tmp_path / "src", 2))}
    with pytest.raises(DataError, match=r"t/train: reading .*f0\.txt, .*f1\.txt failed \(UnicodeDecodeError"):
        cached_splits(tmp_path / "cache", "t", params,
                      build({"train": broken(after, UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid"))}))
    with pytest.raises(DataError, match=r"t/val: no examples in .*f0\.txt"):
        cached_splits(tmp_path / "cache", "t", params, build({"val": []}))
    assert not [p for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")]  # no cache


def test_a_killed_build_is_cleaned_up_by_the_next_one(tmp_path):
    cache = tmp_path / "cache"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = socket.gethostname()
    abandoned = cache / f".t-building-{host}-{int(dead.stdout)}-abc"
    running = cache / f".t-building-{host}-{os.getpid()}-def"  # a live process: left alone
    other_host = cache / f".t-building-otherhost-{int(dead.stdout)}-ghi"
    for folder in (abandoned, running, other_host):
        (folder / "arrow").mkdir(parents=True)
    splits = cached_splits(cache, "t", {"task": "t"}, build({"train": [{"input_ids": [1, 2, 3], "label": 1}]}))
    assert int(splits["train"]["length"][0]) == 3
    assert not abandoned.exists() and running.exists() and other_host.exists()


def test_two_documents_record_the_longer_length(tmp_path):
    pair = {"input_ids": [1, 2], "input_ids2": [1, 2, 3, 4, 5], "label": 1}
    splits = cached_splits(tmp_path / "cache", "t", {"task": "t"}, build({"train": [pair]}))
    assert int(splits["train"]["length"][0]) == 5
