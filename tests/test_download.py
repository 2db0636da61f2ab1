"""Downloading: small archives with the real internal layout (built with the other tests' fixture
writers) served by a local HTTP server on 127.0.0.1, fetched, verified and unpacked, then read by the
task readers; cut connections resumed, servers without Range, corrupt archives, wrong checksums, a
full disk, existing folders, unsafe members, local files and proxies."""
from __future__ import annotations

import gzip
import hashlib
import http.server
import io
import json
import shutil
import socket
import tarfile
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pytest

from lra_dtn.config import Preset
from lra_dtn.data import DataError
from lra_dtn.app.cli import main
from lra_dtn.download import DownloadError, download, human
from tasks import TASKS
from tasks.listops import ListOpsData, generate
from test_image import write_cifar
from test_pathfinder import constant_images, write_release
from test_retrieval import write_aan
from test_text import write_imdb

LRA, IMDB, CIFAR = "lra_release.gz", "aclImdb_v1.tar.gz", "cifar-10-python.tar.gz"
PROXY_VARS = ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "no_proxy", "NO_PROXY", "all_proxy",
              "ALL_PROXY")


# ---------------------------------------------------------------------------------------------
# Archives with the real layout


def tar_gz(entries: dict[str, Path]) -> bytes:
    """A gzipped tar holding each folder under its archive name."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for arcname, folder in entries.items():
            tar.add(folder, arcname=arcname)
    return buffer.getvalue()


def build_release(root: Path) -> Path:
    """The LRA release's folders under ``root/lra_release/lra_release``: ListOps, AAN, Pathfinder-32 (two
    difficulties), Pathfinder-128, and a Pathfinder-64 that no task asks for."""
    release = root / "lra_release" / "lra_release"
    release.mkdir(parents=True)
    generate(release / "listops-1000", ListOpsData(num_train=8, num_val=4, num_test=4, min_length=10,
                                                   max_length=40, max_depth=4))
    write_aan(release)
    labels = [k % 2 for k in range(20)]
    write_release(release, constant_images(20), labels)
    (release / "pathfinder32" / "curv_baseline" / "metadata").mkdir(parents=True)
    (release / "pathfinder32" / "curv_baseline" / "metadata" / "0.npy").write_text("imgs/0 sample_0.png 0 1\n")
    big = write_release(root / "px", [np.full((128, 128), k, dtype=np.uint8) for k in range(20)], labels)
    shutil.move(str(big.parent), release / "pathfinder128")
    (release / "pathfinder64").mkdir()
    (release / "pathfinder64" / "unwanted.txt").write_text("not asked for")
    return root / "lra_release"


@pytest.fixture(scope="module")
def archives(tmp_path_factory) -> dict[str, bytes]:
    stage = tmp_path_factory.mktemp("archives")
    imdb = write_imdb(stage / "imdb") / "aclImdb"
    (imdb / "train" / "unsup").mkdir()
    (imdb / "train" / "unsup" / "0_0.txt").write_text("an unlabelled review: never read")
    (imdb / "imdb.vocab").write_text("the\n")
    return {LRA: tar_gz({"lra_release": build_release(stage / "lra")}),
            IMDB: tar_gz({"aclImdb": imdb}),
            CIFAR: tar_gz({"cifar-10-batches-py": write_cifar(stage / "cifar")[0] / "cifar-10-batches-py"})}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sources(tasks: str = "all", checksums: dict[str, bytes] | None = None, **changes):
    """The real task sources with the test archives' checksums: those of ``checksums`` (file name ->
    bytes) are catalogued, the others unknown, as the LRA release's are."""
    names = TASKS.names() if tasks == "all" else tasks.split(",")
    checksums = checksums or {}

    def archive(a):
        data = checksums.get(a.filename)
        known = dict(size=len(data), sha256=sha256(data)) if data is not None else dict(size=None, sha256=None)
        return replace(a, **{**known, "approx_size": None, "unpacked_size": None, **changes})

    return {t: tuple(replace(s, archive=archive(s.archive)) for s in TASKS.get(t).sources) for t in names}


# ---------------------------------------------------------------------------------------------
# The server


@dataclass
class Server:
    """What the local server serves and how: ``mode`` 'range' (resumes), 'norange' (always 200, the whole
    file) or 'drop' (sends half of what it promised, then closes). ``log``: (path, Range header, status)."""

    files: dict[str, bytes]
    url: str = ""
    mode: str = "range"
    log: list[tuple[str, str | None, int]] = field(default_factory=list)


def handler_for(server: Server) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def do_GET(self) -> None:
            body = server.files.get(self.path.rsplit("/", 1)[-1])
            wanted = self.headers.get("Range")
            start = int(wanted.removeprefix("bytes=").rstrip("-")) if wanted and server.mode != "norange" else 0
            status = 404 if body is None else 416 if body and start >= len(body) else 206 if start else 200
            server.log.append((self.path, wanted, status))
            self.send_response(status)
            if status == 404:
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            if status == 416:
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
            payload = body[start:]
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if server.mode == "drop":
                self.wfile.write(payload[: len(payload) // 2])
                self.wfile.flush()
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            self.wfile.write(payload)

    return Handler


@pytest.fixture
def server(archives, monkeypatch):
    for name in PROXY_VARS:  # the test's traffic goes to 127.0.0.1 only, never through a proxy
        monkeypatch.delenv(name, raising=False)
    state = Server(files=dict(archives))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler_for(state))
    state.url = f"http://127.0.0.1:{httpd.server_address[1]}/data"
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield state
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=5)


def quiet(srcs, data: Path, **kwargs) -> list[Path]:
    """:func:`download` without bar or messages (unless ``say``), on a disk that is never full unless
    ``disk_free`` says so: the estimates must not depend on this machine's disk."""
    kwargs = {"progress": False, "say": lambda line: None, "disk_free": lambda path: 10**12, **kwargs}
    return download(srcs, data, **kwargs)


def run(server: Server, data: Path, tasks: str = "all", checksums=None, **kwargs) -> list[Path]:
    return quiet(sources(tasks, checksums), data, url_base=server.url, **kwargs)


def leftovers(data: Path) -> list[str]:
    """Temporary extraction folders left in the data dir."""
    return sorted(p.name for p in data.glob(".extracting-*"))


# ---------------------------------------------------------------------------------------------
# Tests

SPLITS = {"listops": (8, 4, 4), "text": (20, 13, 13), "retrieval": (20, 6, 5), "image": (18, 2, 6),
          "pathfinder": (16, 2, 2), "pathx": (16, 2, 2)}


def test_full_download_is_read_by_every_task(server, archives, tmp_path, capsys):
    data = tmp_path / "data"
    lines: list[str] = []
    written = run(server, data, checksums={IMDB: archives[IMDB], CIFAR: archives[CIFAR]}, say=lines.append,
                  progress=True)
    assert sorted(p.name for p in written) == sorted(s.folder for t in TASKS.names() for s in TASKS.get(t).sources)
    assert [(path.rsplit("/", 1)[-1], status) for path, _, status in server.log] == [(LRA, 200), (IMDB, 200),
                                                                                    (CIFAR, 200)]
    for task, sizes in SPLITS.items():
        t = TASKS.get(task)()
        splits = t.load(data, t.spec(Preset.official, "transformer")[2], tmp_path / "cache")
        assert (len(splits["train"]), len(splits["val"]), len(splits["test"])) == sizes, task
    # Only what the tasks read: no Pathfinder-64, no unlabelled reviews; whole difficulty folders.
    assert sorted(p.name for p in data.iterdir()) == [".downloads", "aclImdb", "cifar-10-batches-py", "listops-1000",
                                                      "pathfinder128", "pathfinder32", "tsv_data"]
    assert not (data / "aclImdb" / "train" / "unsup").exists() and not (data / "aclImdb" / "imdb.vocab").exists()
    assert (data / "pathfinder32" / "curv_baseline" / "metadata" / "0.npy").exists()
    # The release has no published checksum: its values are printed and recorded; the others are catalogued.
    record = json.loads((data / ".downloads" / f"{LRA}.json").read_text())
    assert (record["size"], record["sha256"]) == (len(archives[LRA]), sha256(archives[LRA]))
    assert sorted(p.name for p in (data / ".downloads").iterdir()) == sorted([LRA, f"{LRA}.json", IMDB, CIFAR])
    assert any(sha256(archives[LRA]) in line and "recorded" in line for line in lines)
    # Said up front: what is downloaded, what the folders take, the free space.
    assert any(line.startswith(f"{IMDB}: {len(archives[IMDB]) / 1e3:.2f} kB to download from {server.url}/")
               for line in lines)
    assert any("unpacked size unknown" in line and line.startswith(LRA) for line in lines)
    err = capsys.readouterr().err
    assert f"extracting {LRA}" in err and "B/s" in err  # the bar: bytes and rate
    assert leftovers(data) == []
    # A second run finds every folder and fetches nothing.
    lines.clear()
    assert run(server, data, say=lines.append) == [] and len(server.log) == 3
    assert lines[-1] == "nothing to download" and sum("left alone" in line for line in lines) == 6


def test_cut_download_resumes_where_it_stopped(server, archives, tmp_path):
    data, blob = tmp_path / "data", archives[LRA]
    server.mode = "drop"
    with pytest.raises(DownloadError, match=r"stopped at .* \(the connection closed early\); .*lra_release\.gz\.part "
                                            r"is kept: run the same command again to resume") as err:
        run(server, data, "listops")
    assert "\n" not in str(err.value)
    part = data / ".downloads" / f"{LRA}.part"
    assert part.read_bytes() == blob[: len(blob) // 2]
    assert not (data / "listops-1000").exists() and leftovers(data) == []
    server.mode = "range"
    lines: list[str] = []
    run(server, data, "listops", say=lines.append)
    assert server.log[-1] == (f"/data/{LRA}", f"bytes={len(blob) // 2}-", 206)
    assert any("already in" in line and "resuming" in line for line in lines)
    assert (data / ".downloads" / LRA).read_bytes() == blob and not part.exists()
    assert sorted(p.name for p in (data / "listops-1000").iterdir()) == [f"basic_{s}.tsv" for s in ("test", "train", "val")]


def test_server_without_range_starts_again(server, archives, tmp_path):
    data, blob = tmp_path / "data", archives[LRA]
    server.mode = "drop"
    with pytest.raises(DownloadError):
        run(server, data, "retrieval")
    server.mode = "norange"
    lines: list[str] = []
    run(server, data, "retrieval", say=lines.append)
    assert server.log[-1] == (f"/data/{LRA}", f"bytes={len(blob) // 2}-", 200)
    assert any("does not resume downloads (answered 200" in line and "starting again from 0" in line for line in lines)
    assert (data / ".downloads" / LRA).read_bytes() == blob
    assert (data / "tsv_data" / "new_aan_pairs.eval.tsv").exists()


def test_complete_part_is_not_fetched_again(server, archives, tmp_path):
    """A run killed between the last byte and the rename: the server says 416 and nothing is re-sent."""
    data, blob = tmp_path / "data", archives[LRA]
    (data / ".downloads").mkdir(parents=True)
    (data / ".downloads" / f"{LRA}.part").write_bytes(blob)
    run(server, data, "pathx")
    assert server.log == [(f"/data/{LRA}", f"bytes={len(blob)}-", 416)]
    assert (data / "pathfinder128" / "curv_contour_length_14" / "metadata" / "0.npy").exists()


@pytest.mark.parametrize("damage", ["flipped", "truncated"])
def test_corrupt_archive_is_never_extracted(server, archives, tmp_path, damage):
    data, blob = tmp_path / "data", archives[IMDB]
    middle = len(blob) // 2
    server.files[IMDB] = (blob[:middle] + bytes(b ^ 0xFF for b in blob[middle : middle + 64]) + blob[middle + 64 :]
                          if damage == "flipped" else blob[:middle])
    with pytest.raises(DownloadError, match=rf"{IMDB} is corrupt or truncated .*nothing was extracted: delete "
                                            rf".*\.downloads/{IMDB} and run again") as err:
        run(server, data, "text")
    assert "\n" not in str(err.value)
    assert sorted(p.name for p in data.iterdir()) == [".downloads"] and leftovers(data) == []
    assert not (data / ".downloads" / f"{IMDB}.json").exists()  # a damaged file's checksum is never recorded


def test_wrong_checksum_is_refused(server, archives, tmp_path):
    data = tmp_path / "data"
    with pytest.raises(DownloadError, match=rf"has SHA-256 {sha256(archives[CIFAR])}, the catalogue .* says 0{{64}}: "
                                            rf"moved to .*{CIFAR}\.rejected"):
        quiet(sources("image", sha256="0" * 64), data, url_base=server.url)
    assert sorted(p.name for p in (data / ".downloads").iterdir()) == [f"{CIFAR}.rejected"]
    assert not (data / "cifar-10-batches-py").exists()


def test_changed_file_is_caught_by_the_recorded_checksum(server, archives, tmp_path):
    data = tmp_path / "data"
    run(server, data, "text")
    recorded = json.loads((data / ".downloads" / f"{IMDB}.json").read_text())["sha256"]
    # same tar, another gzip header: mtime 0, where the fixture wrote the current time (a plain recompression
    # within the same second would give the very same bytes)
    server.files[IMDB] = gzip.compress(gzip.decompress(archives[IMDB]), mtime=0)
    (data / ".downloads" / IMDB).unlink()
    with pytest.raises(DownloadError, match=rf"says {recorded}: .*delete it \(and .*{IMDB}\.json if the source has "
                                            r"changed\)"):
        run(server, data, "text", force=True)
    assert (data / "aclImdb" / "train" / "pos").is_dir()  # the earlier folder is untouched


def test_no_space_refused_up_front(server, archives, tmp_path):
    data = tmp_path / "data"
    need = len(archives[IMDB]) + len(archives[CIFAR]) + TASKS.get("image").sources[0].approx_size  # IMDB's unpacked: unknown
    with pytest.raises(DownloadError, match=rf"not enough space in .*data: about {human(need)} needed, 10\.00 kB free"):
        run(server, data, "image,text", checksums=dict(archives), disk_free=lambda path: 10_000)
    assert server.log == [] and not data.exists()


def test_full_disk_during_extraction_keeps_the_archive(server, archives, tmp_path):
    data = tmp_path / "data"
    lots = 10**12
    with pytest.raises(DownloadError, match=r"the disk is full: cifar-10-batches-py/data_batch_1 needs .*nothing "
                                            r"was extracted"):
        run(server, data, "image", disk_free=lambda path: 100 if ".extracting-" in str(path) else lots)
    assert not (data / "cifar-10-batches-py").exists() and leftovers(data) == []
    run(server, data, "image")  # the archive is kept: the next run only extracts
    assert len(server.log) == 1 and (data / "cifar-10-batches-py" / "test_batch").exists()


def test_existing_folder_left_alone_unless_forced(server, archives, tmp_path):
    data = tmp_path / "data"
    (data / "aclImdb").mkdir(parents=True)
    (data / "aclImdb" / "mine.txt").write_text("keep me")
    lines: list[str] = []
    run(server, data, "text,image", say=lines.append)
    assert f"text: {data / 'aclImdb'} exists: left alone (--force replaces it)" in lines
    assert [p.name for p in (data / "aclImdb").iterdir()] == ["mine.txt"]
    assert [path.rsplit("/", 1)[-1] for path, _, _ in server.log] == [CIFAR]
    run(server, data, "text", force=True)
    assert sorted(p.name for p in (data / "aclImdb").iterdir()) == ["test", "train"]  # the fixture has no README
    assert leftovers(data) == []


def test_unsafe_members_are_refused_or_skipped(server, tmp_path):
    evil = io.BytesIO()
    with tarfile.open(fileobj=evil, mode="w:gz") as tar:
        def add(name: str, data: bytes = b"x", kind: bytes = tarfile.REGTYPE, link: str = "") -> None:
            info = tarfile.TarInfo(name)
            info.type, info.linkname, info.size = kind, link, len(data) if kind == tarfile.REGTYPE else 0
            tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)
        add("cifar-10-batches-py/test_batch")
        add("cifar-10-batches-py/passwd", kind=tarfile.SYMTYPE, link="/etc/passwd")
        add("/tmp/absolute.txt")  # never under the wanted folder: skipped
    server.files[CIFAR] = evil.getvalue()
    data, lines = tmp_path / "data", []
    run(server, data, "image", say=lines.append)
    assert [p.name for p in (data / "cifar-10-batches-py").iterdir()] == ["test_batch"]
    assert any("skipped 1 link(s)" in line for line in lines)
    climbing = io.BytesIO()
    with tarfile.open(fileobj=climbing, mode="w:gz") as tar:
        info = tarfile.TarInfo("cifar-10-batches-py/../../escaped.txt")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    server.files[CIFAR] = climbing.getvalue()
    with pytest.raises(DownloadError, match=r"unsafe path 'cifar-10-batches-py/\.\./\.\./escaped\.txt'"):
        run(server, tmp_path / "other", "image")
    assert not (tmp_path / "escaped.txt").exists() and not (tmp_path / "other" / "cifar-10-batches-py").exists()


def test_offline_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    for name in PROXY_VARS:
        monkeypatch.delenv(name, raising=False)
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data = tmp_path / "data"
    with pytest.raises(DownloadError) as err:
        quiet(sources("listops"), data, url_base=f"http://127.0.0.1:{port}")
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"cannot download http://127.0.0.1:{port}/{LRA} (")
    assert "README's Data section" in message and "--url lra_release=PATH" in message
    assert not data.exists()


def test_http_error_names_the_status(server, tmp_path):
    del server.files[CIFAR]
    with pytest.raises(DownloadError, match=rf"cannot download {server.url}/{CIFAR} \(HTTP 404 Not Found\)"):
        run(server, tmp_path / "data", "image")


def test_local_files_are_read_in_place(archives, tmp_path):
    local = tmp_path / "mirror"
    local.mkdir()
    for name, blob in archives.items():
        (local / name).write_bytes(blob)
    data = tmp_path / "data"
    quiet(sources("text,image"), data, urls={"imdb": (local / IMDB).as_uri(), "cifar10": str(local / CIFAR)})
    quiet(sources("listops"), data, url_base=str(local))
    assert {"aclImdb", "cifar-10-batches-py", "listops-1000"} <= {p.name for p in data.iterdir()}
    assert sorted(p.name for p in (data / ".downloads").iterdir()) == sorted(f"{n}.json" for n in archives)
    with pytest.raises(DownloadError, match=r"--url imdb=\.\.\.: no such archive among the chosen tasks' \(cifar10\)"):
        quiet(sources("image"), data, urls={"imdb": "x"})
    with pytest.raises(DownloadError, match=r"cannot read gs://bucket/lra_release\.gz: only http"):
        quiet(sources("retrieval"), data, url_base="gs://bucket")


def test_proxy_from_the_environment(server, tmp_path, monkeypatch):
    monkeypatch.setenv("http_proxy", server.url.removesuffix("/data"))
    quiet(sources("image"), tmp_path / "data", url_base="http://cifar.invalid/files")
    assert server.log == [(f"http://cifar.invalid/files/{CIFAR}", None, 200)]  # the proxy got the absolute URL
    assert (tmp_path / "data" / "cifar-10-batches-py" / "data_batch_5").exists()


# ---------------------------------------------------------------------------------------------
# The command and the tasks' own sources


def test_download_command(server, archives, tmp_path, capsys):
    """`run_lra.py download` with the tasks' own sources; the LRA release has no catalogued checksum,
    so the real catalogue serves here unchanged."""
    data = tmp_path / "data"
    main(["download", "--tasks", "listops,retrieval", "--data-dir", str(data), "--url-base", server.url,
          "--no-progress"])
    out = capsys.readouterr()
    assert out.err == ""  # --no-progress: no bars
    lines = out.out.splitlines()
    assert lines[0] == (f"{LRA}: about 8.23 GB to download from {server.url}/{LRA}; listops-1000, tsv_data: "
                        "unpacked size unknown, at most 18.60 GB (the whole archive)")
    assert f"SHA-256 {sha256(archives[LRA])}, recorded in {data / '.downloads' / (LRA + '.json')}" in out.out
    assert lines[-1] == f"done: listops-1000, tsv_data in {data}"
    main(["download", "--tasks", "listops", "--data-dir", str(data), "--url-base", server.url, "--no-progress"])
    assert capsys.readouterr().out.splitlines() == [
        f"listops: {data / 'listops-1000'} exists: left alone (--force replaces it)", "nothing to download"]
    assert len(server.log) == 1


def test_download_command_errors(tmp_path, capsys, monkeypatch):
    for name in PROXY_VARS:
        monkeypatch.delenv(name, raising=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data = tmp_path / "data"
    with pytest.raises(SystemExit) as exit_:
        main(["download", "--tasks", "pathx", "--data-dir", str(data), "--url", f"lra_release=http://127.0.0.1:{port}/x.gz"])
    assert exit_.value.code.startswith(f"error: cannot download http://127.0.0.1:{port}/x.gz (")
    assert not data.exists()
    with pytest.raises(SystemExit) as exit_:
        main(["download", "--url", "lra=file.gz"])
    assert exit_.value.code == 2 and "expected ARCHIVE=URL with ARCHIVE one of lra_release, imdb, cifar10" in (
        capsys.readouterr().err)
    with pytest.raises(SystemExit, match=r"error: --tasks: unknown task 'imdb'"):
        main(["download", "--tasks", "imdb"])


def test_tasks_name_their_sources_and_prepare_says_how_to_fetch(tmp_path):
    folders = {name: [s.folder for s in TASKS.get(name).sources] for name in TASKS.names()}
    assert folders == {"listops": ["listops-1000"], "text": ["aclImdb"], "retrieval": ["tsv_data"],
                       "image": ["cifar-10-batches-py"], "pathfinder": ["pathfinder32"], "pathx": ["pathfinder128"]}
    for name in ("text", "retrieval", "image"):  # the tasks that cannot generate their data
        task = TASKS.get(name)()
        with pytest.raises(DataError, match=rf"`python run_lra\.py download --tasks {name}` fetches it \("):
            task.prepare(tmp_path, task.spec(Preset.smoke, "transformer")[2])
    with pytest.raises(DataError, match=r"fetches it \(aclImdb_v1\.tar\.gz, 84\.13 MB\)$"):
        TASKS.get("text")().prepare(tmp_path, TASKS.get("text")().spec(Preset.smoke, "transformer")[2])
    with pytest.raises(DataError, match=r"fetches it \(lra_release\.gz, about 8\.23 GB\)$"):
        TASKS.get("retrieval")().prepare(tmp_path, TASKS.get("retrieval")().spec(Preset.smoke, "transformer")[2])
