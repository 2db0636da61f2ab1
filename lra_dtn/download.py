"""Fetch the archives the real LRA data comes from and unpack the folders the task readers expect.

Three archives hold every file the tasks read (README, Data): the LRA release (ListOps, Retrieval,
Pathfinder, Path-X; its folders sit under ``lra_release/lra_release/``, spec §1), the Stanford IMDB
release (Text) and the CIFAR-10 python release (Image). Each task names what it takes from them in its
own file (``Task.sources``) as :class:`Source` entries, one folder under ``--data-dir`` per archive
member; ``run_lra.py download`` hands the chosen tasks' sources to :func:`download`.

What a user can rely on, and why it is built this way:

* **Resumable.** An archive is fetched into ``<data-dir>/.downloads/<file>.part`` and renamed only once
  complete and verified; the next call continues a cut download with an HTTP ``Range`` request (a server
  that ignores it answers 200, and the download starts again from 0). A completed archive is never
  fetched again. The LRA release is 8.23 GB: losing it to a dropped connection is what this prevents.
* **Verified.** Size and SHA-256 are checked against the catalogue below where a reliable source gives
  them. Where none does (the LRA release), the first download's values are printed and recorded in
  ``<data-dir>/.downloads/<file>.json``, and every later download or extraction is checked against them,
  so a changed or damaged file is noticed.
* **Never half-written.** Members are streamed out of the archive into a temporary folder inside
  ``--data-dir`` (the same file system), hashing the archive on the way; only when the whole archive has
  been read and matches are the folders renamed to their final names. A corrupt or truncated archive
  leaves nothing but the error naming what to delete. Member paths are checked: nothing is written
  outside the temporary folder, links and special files are not created.
* **Honest about space.** Before anything is fetched the command says how much it will download and
  how much disk the folders take where known, and refuses when the disk cannot hold it; extraction
  checks the free space again before every file, since unpacked sizes are partly unknown.
* **Any source.** ``url_base`` (a mirror or a local folder) and per-archive URLs (``http(s)://``,
  ``file://`` or a plain path) replace the originals; local files are read in place, not copied.
  Proxies come from the environment (``http_proxy``/``https_proxy``/``no_proxy``), as urllib reads them.

Standard library only (plus tqdm for the bar): importing this never loads torch.
"""
from __future__ import annotations

import errno
import gzip
import hashlib
import http.client
import json
import os
import shutil
import socket
import tarfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Callable, Mapping, Sequence

from tqdm import tqdm

from lra_dtn.workdirs import make_work_folder, remove_abandoned, write_atomic

CHUNK = 1 << 20
TIMEOUT = 60  # seconds without a byte before a connection counts as stopped
DOWNLOADS = ".downloads"  # under --data-dir: archives, partial downloads and the recorded checksums
MANUAL = "the README's Data section lists each archive to fetch by hand"


class DownloadError(RuntimeError):
    """A download or extraction that cannot go on; the message says what is kept and what to do."""


@dataclass(frozen=True)
class Archive:
    """One file to fetch. ``size``/``sha256``: exact values from a cited source, else ``None`` (then
    the first download's are recorded beside the data). ``approx_size`` and ``unpacked_size`` are
    reported sizes, only for the up-front estimate."""

    name: str  # the key of a per-archive URL (``--url NAME=URL``)
    filename: str
    url: str
    size: int | None = None
    sha256: str | None = None
    approx_size: int | None = None
    unpacked_size: int | None = None

    @property
    def expected_size(self) -> int | None:
        return self.size if self.size is not None else self.approx_size


@dataclass(frozen=True)
class Source:
    """Folder ``folder`` under ``--data-dir`` is the archive member ``member`` (a folder path inside the
    archive), restricted to the sub-paths ``only`` when given. ``approx_size``: its unpacked size where a
    source gives it (``None``: unknown), for the up-front estimate only."""

    archive: Archive
    member: str
    folder: str
    only: tuple[str, ...] = ()
    approx_size: int | None = None

    def relative(self, parts: tuple[str, ...]) -> tuple[str, ...] | None:
        """The part of an archive path below :attr:`member`, or ``None`` when the path is not wanted.
        Folders above an ``only`` entry are wanted (they hold it); their other contents are not."""
        root = PurePosixPath(self.member).parts
        if parts[: len(root)] != root:
            return None
        rest = parts[len(root):]
        if not self.only or not rest:
            return rest
        for keep in self.only:
            keep_parts = PurePosixPath(keep).parts
            if rest[: len(keep_parts)] == keep_parts or keep_parts[: len(rest)] == rest:
                return rest
        return None


# ---------------------------------------------------------------------------------------------
# The catalogue

# LRA README: the release's URL. Neither its size nor a checksum is published; LRA issue #12 reports 8.23 GB
# gzipped and 18.6 GB unpacked (spec §1), used here only for the estimate.
LRA_RELEASE = Archive("lra_release", "lra_release.gz", "https://storage.googleapis.com/long-range-arena/lra_release.gz",
                      approx_size=8_230_000_000, unpacked_size=18_600_000_000)
# TFDS tensorflow_datasets/url_checksums/imdb_reviews.txt: URL, size and SHA-256 of the Stanford release.
IMDB = Archive("imdb", "aclImdb_v1.tar.gz", "http://ai.stanford.edu/~amaas/data/sentiment/aclImdb_v1.tar.gz",
               size=84_125_825, sha256="c40f74a18d3b61f90feba1e17730e0d38e8b97c05fde7008942e91923d1658fe")
# Keras keras/datasets/cifar10.py (get_file's file_hash) for the SHA-256; the size is the one get_file and
# TF's CIFAR tutorial print ("Successfully downloaded cifar-10-python.tar.gz 170498071 bytes").
CIFAR10 = Archive("cifar10", "cifar-10-python.tar.gz", "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
                  size=170_498_071, sha256="6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce")
ARCHIVES = {archive.name: archive for archive in (LRA_RELEASE, IMDB, CIFAR10)}

RELEASE_ROOT = "lra_release/lra_release"  # where the release's folders sit inside its tar (spec §1)


def release_folder(folder: str) -> Source:
    """The LRA release's ``lra_release/lra_release/<folder>`` as ``<data-dir>/<folder>``; its unpacked size
    is unknown (the whole release is 18.6 GB)."""
    return Source(LRA_RELEASE, f"{RELEASE_ROOT}/{folder}", folder)


# ---------------------------------------------------------------------------------------------
# Small helpers


def human(n: float) -> str:
    """Bytes in decimal units, as the sizes are reported (8.23 GB)."""
    power = 0
    while abs(n) >= 1000 and power < 3:
        n, power = n / 1000, power + 1
    return f"{n:.0f} B" if power == 0 else f"{n:.2f} {('kB', 'MB', 'GB')[power - 1]}"


def free_bytes(path: Path) -> int:
    """Free space of the file system that holds ``path`` (or would: its nearest existing parent)."""
    path = Path(path).absolute()
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def local_path(location: str) -> Path | None:
    """The file a location names when it is local (``file://`` or a plain path), else ``None`` (http(s),
    ftp). Other schemes (``gs://``) are refused: urllib cannot read them."""
    parsed = urllib.parse.urlparse(location)
    if parsed.scheme == "file":
        return Path(urllib.request.url2pathname(parsed.path))
    if parsed.scheme in ("http", "https", "ftp"):
        return None
    if parsed.scheme and len(parsed.scheme) > 1:  # one letter: a Windows drive
        raise DownloadError(f"cannot read {location}: only http(s)://, ftp://, file:// and local paths are "
                            f"supported; copy the file and pass its path")
    return Path(location)


def locate(archive: Archive, url_base: str | None, urls: Mapping[str, str]) -> str:
    """Where ``archive`` is read from: its own URL override, else ``url_base`` + its file name, else the
    catalogue's URL."""
    if archive.name in urls:
        return urls[archive.name]
    if url_base:
        return url_base.rstrip("/") + "/" + archive.filename
    return archive.url


def progress_bar(total: int | None, initial: int, desc: str, enabled: bool) -> tqdm:
    """Bytes, rate and time left (tqdm's byte units)."""
    return tqdm(total=total, initial=initial, desc=desc, unit="B", unit_scale=True, disable=not enabled,
                dynamic_ncols=True, miniters=1)


class HashingReader:
    """A binary file read once: every byte is hashed, counted and shown on the bar on its way through,
    so extraction and verification are one pass over the archive."""

    def __init__(self, f: IO[bytes], bar: tqdm, digest: "hashlib._Hash | None" = None) -> None:
        self.f, self.bar = f, bar
        self.sha256 = digest or hashlib.sha256()
        self.count = 0

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.sha256.update(data)
        self.count += len(data)
        self.bar.update(len(data))
        return data

    def drain(self) -> None:
        while self.read(CHUNK):
            pass


# ---------------------------------------------------------------------------------------------
# Checksums: the catalogue's, else the ones recorded at the first download


def record_path(downloads: Path, archive: Archive) -> Path:
    return downloads / f"{archive.filename}.json"


def expected(archive: Archive, downloads: Path) -> tuple[int | None, str | None, str]:
    """(size, SHA-256, where they come from) that the archive must match; (size or None, None, "") when
    neither the catalogue nor an earlier run gives a checksum."""
    if archive.sha256 is not None:
        return archive.size, archive.sha256, "the catalogue (lra_dtn/download.py)"
    record = record_path(downloads, archive)
    if record.exists():
        try:
            values = json.loads(record.read_text())
            return int(values["size"]), str(values["sha256"]), f"{record} (recorded {values.get('recorded', '?')})"
        except (ValueError, KeyError, TypeError) as err:
            raise DownloadError(f"{record} is damaged ({err}): delete it (the next run records the archive again)")
    return archive.size, None, ""


def verify(archive: Archive, downloads: Path, size: int, sha256: str, what: str, remedy: str,
           say: Callable[[str], None], record: bool) -> None:
    """Check ``size``/``sha256`` of ``what`` against :func:`expected`. With nothing to check against and
    ``record`` (the archive has just been read whole without error, so it is not a damaged download),
    print them and record them so a later run notices a change. ``remedy`` ends an error message."""
    want_size, want_sha, origin = expected(archive, downloads)
    if want_size is not None and size != want_size:
        raise DownloadError(f"{what} has {size:,} bytes, {origin or 'the catalogue'} says {want_size:,}: {remedy}")
    if want_sha is not None:
        if sha256 != want_sha:
            raise DownloadError(f"{what} has SHA-256 {sha256}, {origin} says {want_sha}: {remedy}")
        return
    if not record:
        return
    path = record_path(downloads, archive)
    downloads.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps({"archive": archive.filename, "size": size, "sha256": sha256,
                                   "recorded": time.strftime("%Y-%m-%d %H:%M:%S %Z")}, indent=1) + "\n")
    say(f"{archive.filename}: no published checksum; size {size:,} bytes, SHA-256 {sha256}, recorded in "
        f"{path} (later runs check against it)")


# ---------------------------------------------------------------------------------------------
# Fetching


def open_url(url: str, offset: int) -> tuple[http.client.HTTPResponse | None, int | None]:
    """``(response, None)``, or ``(None, total)`` when a resumed download is already complete (416 with
    ``Content-Range: bytes */total``). Sends ``Range`` when ``offset`` > 0. Failures raise
    :class:`urllib.error.URLError` (HTTP errors included) or :class:`OSError`."""
    headers = {"User-Agent": "lra-dtn-download"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        # A fresh opener reads the proxy variables now (urlopen's shared one keeps the first call's).
        opener = urllib.request.build_opener()
        return opener.open(urllib.request.Request(url, headers=headers), timeout=TIMEOUT), None
    except urllib.error.HTTPError as err:
        total = content_range_total(err.headers.get("Content-Range", "")) if err.code == 416 else None
        if total is None:
            raise
        err.close()
        return None, total


def content_range_total(value: str) -> int | None:
    """The total of ``bytes a-b/total`` or ``bytes */total``; ``None`` when absent or ``*``."""
    total = value.rpartition("/")[2].strip()
    return int(total) if total.isdigit() else None


def response_start(response: http.client.HTTPResponse, offset: int) -> int:
    """Where the body starts: ``offset`` for a 206 whose ``Content-Range`` starts there, else 0 (a 200
    from a server that ignores ``Range``, or an unexpected range: both restart from 0)."""
    if response.status != 206:
        return 0
    first = response.headers.get("Content-Range", "").removeprefix("bytes ").partition("-")[0].strip()
    return offset if first == str(offset) else 0


def fetch(archive: Archive, url: str, downloads: Path, progress: bool, disk_free: Callable[[Path], int],
          say: Callable[[str], None]) -> Path:
    """``downloads/<filename>``, downloaded (or resumed) from ``url`` and verified; an archive already
    there is returned as is (it is verified while being extracted)."""
    final = downloads / archive.filename
    if final.exists():
        say(f"{archive.filename}: already downloaded ({final})")
        return final
    part = final.with_name(final.name + ".part")
    offset = part.stat().st_size if part.exists() else 0
    if archive.size is not None and offset > archive.size:
        part.unlink()  # longer than the archive: it cannot be a prefix of it
        offset = 0
    stopped = offline_message(archive, url, final, part)
    digest = hashlib.sha256()
    for _ in range(2):  # a second round only after a resume the server cannot serve
        try:
            if archive.size is not None and offset == archive.size:
                response, total = None, offset  # complete but not verified yet (a run stopped in between)
            else:
                response, total = open_url(url, offset)
        except (urllib.error.URLError, OSError, http.client.HTTPException) as err:
            raise DownloadError(stopped(reason(err))) from None
        if response is not None:
            with response:
                received = receive(archive, response, offset, part, digest, progress, disk_free, say, stopped)
            break
        if offset and total == offset:
            hash_file(part, digest, progress, f"checking {part.name}")
            received = offset
            break
        say(f"{archive.filename}: {part} does not fit the file on the server ({human(total or 0)}): starting again")
        part.unlink(missing_ok=True)
        offset = 0
    else:
        raise DownloadError(stopped("the server answered 416 (range not satisfiable) to a plain request"))
    remedy = (f"moved to {final}.rejected for inspection; delete it (and {record_path(downloads, archive)} if the "
              f"source has changed) and run again to download it anew")
    try:
        verify(archive, downloads, received, digest.hexdigest(), f"{url} (downloaded)", remedy, say, record=False)
    except DownloadError:
        os.replace(part, final.with_name(final.name + ".rejected"))
        raise
    os.replace(part, final)
    return final


def receive(archive: Archive, response: http.client.HTTPResponse, offset: int, part: Path, digest: "hashlib._Hash",
            progress: bool, disk_free: Callable[[Path], int], say: Callable[[str], None],
            stopped: Callable[[str, int | None, int | None], str]) -> int:
    """Write the body of ``response`` into ``part`` (appending when the server resumed at ``offset``);
    returns the archive's size so far. A short body raises, keeping ``part`` for the next call."""
    start = response_start(response, offset)
    if offset and start == 0:
        say(f"{archive.filename}: the server does not resume downloads (answered {response.status} to a Range "
            f"request): starting again from 0")
    length = response.headers.get("Content-Length")
    total = start + int(length) if length and length.isdigit() else None
    if total is not None and total - start > disk_free(part.parent):
        raise DownloadError(f"not enough space for {archive.filename}: {human(total - start)} to download, "
                            f"{human(disk_free(part.parent))} free in {part.parent}")
    part.parent.mkdir(parents=True, exist_ok=True)
    if start:
        hash_file(part, digest, progress, f"checking {part.name}")
    received, began = start, time.monotonic()
    with open(part, "ab" if start else "wb") as out, \
            progress_bar(total, start, archive.filename, progress) as bar:
        while True:
            try:
                chunk = response.read(CHUNK)
            except (OSError, http.client.HTTPException) as err:
                raise DownloadError(stopped(reason(err), received, total)) from None
            if not chunk:
                break
            out.write(chunk)
            digest.update(chunk)
            received += len(chunk)
            bar.update(len(chunk))
    if total is not None and received < total:
        raise DownloadError(stopped("the connection closed early", received, total))
    resumed = f" (resumed at {human(start)})" if start else ""
    say(f"{archive.filename}: {human(received - start)} downloaded in {time.monotonic() - began:.0f} s{resumed}")
    return received


def hash_file(path: Path, digest: "hashlib._Hash", progress: bool, desc: str) -> None:
    with open(path, "rb") as f, progress_bar(path.stat().st_size, 0, desc, progress) as bar:
        HashingReader(f, bar, digest).drain()


def reason(err: BaseException) -> str:
    """The short cause of a network error (``HTTP Error 403: Forbidden``, ``Connection refused``)."""
    if isinstance(err, urllib.error.HTTPError):
        return f"HTTP {err.code} {err.reason}"
    if isinstance(err, urllib.error.URLError):
        err = err.reason if isinstance(err.reason, BaseException) else err
        if not isinstance(err, BaseException):
            return str(err)
    if isinstance(err, socket.timeout):
        return f"no data for {TIMEOUT} s"
    return getattr(err, "strerror", None) or str(err) or type(err).__name__


def offline_message(archive: Archive, url: str, final: Path, part: Path) -> Callable[..., str]:
    """The one-line error of a download that failed or stopped: the URL, the manual way, and what is kept."""
    def message(cause: str, received: int | None = None, total: int | None = None) -> str:
        if received:
            of = f" of {human(total)}" if total else ""
            return (f"download of {url} stopped at {human(received)}{of} ({cause}); {part} is kept: "
                    f"run the same command again to resume")
        kept = f"; the partial download {part} is kept for a later resume" if part.exists() else ""
        return (f"cannot download {url} ({cause}); {MANUAL}: fetch {archive.filename} by hand and pass "
                f"--url {archive.name}=PATH, or put it at {final}{kept}")
    return message


# ---------------------------------------------------------------------------------------------
# Extracting


def archive_parts(name: str, sources: Sequence[Source]) -> tuple[tuple[str, ...], Source] | None:
    """``(path parts, source)`` of a wanted archive member, ``None`` for the rest. A wanted member whose
    path climbs (``..``) is refused: it could write outside the folder it is extracted into."""
    parts = tuple(p for p in PurePosixPath(name).parts if p != ".")
    if PurePosixPath(name).is_absolute():
        return None  # never under a member root
    for source in sources:
        root = PurePosixPath(source.member).parts
        if parts[: len(root)] == root and ".." in parts:
            raise DownloadError(f"unsafe path {name!r} in {source.archive.filename}: refused, nothing extracted")
        if source.relative(parts) is not None:
            return parts, source
    return None


def unpack(stream: IO[bytes], gzipped: bool, sources: Sequence[Source], tmp: Path,
           disk_free: Callable[[Path], int]) -> int:
    """Stream the wanted members of a tar into ``tmp`` (under their archive paths) and read the stream to
    its end, so that a gzip CRC error or a truncation anywhere is seen. Only folders and regular files
    are created (a hard link to an extracted file is copied); other members are skipped and counted."""
    skipped = 0
    data = gzip.GzipFile(fileobj=stream, mode="rb") if gzipped else stream
    with tarfile.open(fileobj=data, mode="r|" if gzipped else "r|*") as tar:
        for member in tar:
            wanted = archive_parts(member.name, sources)
            if wanted is None:
                continue
            dest = tmp.joinpath(*wanted[0])
            if member.isdir():
                dest.mkdir(parents=True, exist_ok=True)
            elif member.isfile():
                free = disk_free(tmp)
                if member.size > free:
                    raise DownloadError(f"the disk is full: {member.name} needs {human(member.size)}, "
                                        f"{human(free)} free in {tmp.parent}; nothing was extracted")
                dest.parent.mkdir(parents=True, exist_ok=True)
                with tar.extractfile(member) as src, open(dest, "wb") as out:
                    shutil.copyfileobj(src, out, CHUNK)
            elif member.islnk() and (target := archive_parts(member.linkname, sources)) is not None \
                    and tmp.joinpath(*target[0]).is_file():
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(tmp.joinpath(*target[0]), dest)
            else:
                skipped += 1
    if gzipped:
        while data.read(CHUNK):  # past tar's end blocks to the gzip trailer: its CRC and length are checked
            pass
    return skipped


def extract(path: Path, archive: Archive, sources: Sequence[Source], data_dir: Path, downloads: Path,
            progress: bool, disk_free: Callable[[Path], int], say: Callable[[str], None], remedy: str) -> None:
    """Unpack ``sources`` from the archive file ``path`` into ``data_dir``: all of them appear, each under
    its final name, only once the whole archive has been read and verified; on any failure none does."""
    data_dir.mkdir(parents=True, exist_ok=True)
    remove_abandoned(data_dir, EXTRACTING)
    tmp = make_work_folder(data_dir, EXTRACTING)
    try:
        with open(path, "rb") as f:
            gzipped = f.read(2) == b"\x1f\x8b"
            f.seek(0)
            with progress_bar(path.stat().st_size, 0, f"extracting {archive.filename}", progress) as bar:
                reader = HashingReader(f, bar)
                try:
                    skipped = unpack(reader, gzipped, sources, tmp, disk_free)
                    reader.drain()
                except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as err:
                    raise DownloadError(f"{path} is corrupt or truncated ({type(err).__name__}: {err}); nothing "
                                        f"was extracted: {remedy}") from None
                except OSError as err:
                    if err.errno != errno.ENOSPC:
                        raise
                    raise DownloadError(f"the disk holding {data_dir} is full; nothing was extracted") from None
        verify(archive, downloads, reader.count, reader.sha256.hexdigest(), str(path), f"nothing was extracted; "
               f"{remedy}", say, record=True)
        missing = [s.member for s in sources if not tmp.joinpath(*PurePosixPath(s.member).parts).is_dir()]
        if missing:
            raise DownloadError(f"{path} has no folder {', '.join(missing)}: it is not the expected "
                                f"{archive.filename} ({archive.url}); nothing was extracted")
        if skipped:
            say(f"{archive.filename}: skipped {skipped} link(s) or special file(s) (only files are extracted)")
        for source in sources:
            install(tmp.joinpath(*PurePosixPath(source.member).parts), data_dir / source.folder, tmp)
            say(f"{data_dir / source.folder}: ready (from {archive.filename})")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def install(new: Path, target: Path, tmp: Path) -> None:
    """Rename ``new`` to ``target``; an existing ``target`` (``--force``) is moved into ``tmp`` first, to be
    deleted with it, so the folder under its final name is always whole."""
    if target.exists():
        os.replace(target, tmp / f"replaced-{target.name}")
    os.replace(new, target)


EXTRACTING = ".extracting-"  # prefix of the temporary folders in --data-dir: <prefix><host>-<pid>-<random>


# ---------------------------------------------------------------------------------------------
# The command


@dataclass(frozen=True)
class Step:
    """One archive to read and the sources to unpack from it."""

    archive: Archive
    location: str
    local: Path | None  # the file itself when the location is local
    sources: tuple[Source, ...]


def plan(tasks: Mapping[str, Sequence[Source]], data_dir: Path, force: bool, url_base: str | None,
         urls: Mapping[str, str], say: Callable[[str], None]) -> list[Step]:
    """The archives to read for the sources whose folder is missing (or all, with ``force``); says which
    folders are left alone. Archives come in the order the tasks name them; each is read once."""
    names = {source.archive.name for sources in tasks.values() for source in sources}
    unknown = sorted(set(urls) - names)
    if unknown:
        raise DownloadError(f"--url {unknown[0]}=...: no such archive among the chosen tasks' "
                            f"({', '.join(sorted(names)) or 'none'})")
    todo: dict[Archive, list[Source]] = {}
    for task, sources in tasks.items():
        for source in sources:
            target = data_dir / source.folder
            if target.exists() and not force:
                say(f"{task}: {target} exists: left alone (--force replaces it)")
            elif source not in todo.get(source.archive, []):
                todo.setdefault(source.archive, []).append(source)
    steps = []
    for archive, sources in todo.items():
        location = locate(archive, url_base, urls)
        steps.append(Step(archive, location, local_path(location), tuple(sources)))
    return steps


def space_needed(steps: Sequence[Step], downloads: Path, say: Callable[[str], None]) -> int:
    """Say what will be downloaded and what the folders take; return the bytes known to be needed."""
    need = 0
    for step in steps:
        archive, final = step.archive, downloads / step.archive.filename
        folders = ", ".join(s.folder for s in step.sources)
        if step.local is not None:
            fetch_text = f"read in place from {step.local}"
        elif final.exists():
            fetch_text = f"already in {final}"
        else:
            part = final.with_name(final.name + ".part")
            have = part.stat().st_size if part.exists() else 0
            size = archive.expected_size
            left = None if size is None else max(size - have, 0)
            exact = "" if archive.size is not None else "about "
            fetch_text = (f"{exact}{human(size)} to download from {step.location}" if size is not None
                          else f"size unknown, from {step.location}")
            if have:
                fetch_text += f" ({human(have)} already in {part}: resuming)"
            need += left or 0
        known = [s.approx_size for s in step.sources if s.approx_size is not None]
        if len(known) == len(step.sources):
            disk = f"about {human(sum(known))} unpacked"
        else:
            bound = f", at most {human(archive.unpacked_size)} (the whole archive)" if archive.unpacked_size else ""
            disk = f"unpacked size unknown{bound}"
        need += sum(known)
        say(f"{archive.filename}: {fetch_text}; {folders}: {disk}")
    return need


def download(tasks: Mapping[str, Sequence[Source]], data_dir: Path, *, force: bool = False, progress: bool = True,
             url_base: str | None = None, urls: Mapping[str, str] | None = None,
             disk_free: Callable[[Path], int] = free_bytes, say: Callable[[str], None] = print) -> list[Path]:
    """Fetch and unpack what ``tasks`` (name -> its sources) need into ``data_dir``; returns the folders
    written. Folders that exist are left alone unless ``force``. Raises :class:`DownloadError` with a
    one-line message (what failed, what is kept, what to do)."""
    data_dir, urls = Path(data_dir), dict(urls or {})
    downloads = data_dir / DOWNLOADS
    steps = plan(tasks, data_dir, force, url_base, urls, say)
    if not steps:
        say("nothing to download")
        return []
    need, free = space_needed(steps, downloads, say), disk_free(data_dir)
    if need > free:
        raise DownloadError(f"not enough space in {data_dir}: about {human(need)} needed, {human(free)} free; "
                            f"free some space or choose another --data-dir")
    say(f"{human(free)} free in {data_dir}; archives are kept in {downloads} (delete them once the folders are "
        f"in place to free the space)")
    written = []
    for step in steps:
        if step.local is not None:
            if not step.local.is_file():
                raise DownloadError(f"no such file {step.local} (the source given for {step.archive.name})")
            path, remedy = step.local, f"check the file given for {step.archive.name}"
        else:
            path = fetch(step.archive, step.location, downloads, progress, disk_free, say)
            remedy = f"delete {path} and run again to download it anew"
        extract(path, step.archive, step.sources, data_dir, downloads, progress, disk_free, say, remedy)
        written += [data_dir / s.folder for s in step.sources]
    return written
