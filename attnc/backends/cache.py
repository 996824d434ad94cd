"""The kernel cache: memory first, then disk; generic over backends (Triton modules, TVM libraries, autotune).

How a backend uses it
---------------------
    from attnc.backends import cache

    key = cache.CacheKey({
        **cache.plan_parts(plan),             # the math without the spec's name, the plan, attnc and torch
        "backend": "triton",                  # required; also the entry's folder, so [A-Za-z0-9][A-Za-z0-9_.+-]*
        "backend_version": triton.__version__,
        "device": "cuda:sm_90",               # or "cpu:x86_64-avx512"
        "codegen": codegen_fingerprint(),     # the code generator's own sources
    }, name=spec.name)                        # a label only: shown by `attnc cache ls`, never hashed

    def build(out_dir: Path) -> None:        # write the artifact's files into out_dir (a fresh empty folder)
        (out_dir / "kernel.py").write_text(source)

    def load(entry: cache.Entry) -> ModuleType:   # turn a verified entry into the object you launch
        return import_from_path(entry.file("kernel.py"))

    module = cache.get_or_load(key, build, load)  # the second call is one dict look-up

The spec's name is no key part, so the same math under two names shares one entry and one build; generated
source must not embed the name either (the entry is shared).

API (module functions act on the cache at `cache_root()`; `KernelCache(root)` has the same methods)
---------------------------------------------------------------------------------------------------
- `CacheKey(parts: Mapping[str, str], name=None)`: `.digest` (hex SHA-256 over the sorted, length-prefixed
  name/value pairs), `.backend`, `.name` (the label), `.as_dict()`, `.updated(**parts)`. Every value must already
  be a string. `spec_parts(spec)` / `plan_parts(plan)`: the parts every kernel key of a spec / plan starts from.
- `get_or_build(key, build: Callable[[Path], None]) -> Entry`: the verified entry, built on a miss.
- `get(key) -> Entry | None`: the verified entry where one is stored, else None (nothing is built).
- `get_or_load(key, build, load: Callable[[Entry], T]) -> T`: build on a miss, `load` once per key and process,
  memoized; exceptions from `build` and `load` (e.g. CompileError) reach the caller unchanged.
- `Entry`: `.key`, `.path` (the entry folder), `.files` (FileRecord name/sha256/size), `.created`,
  `.file(name) -> Path`, `.read_bytes(name)`, `.read_text(name)`. Treat the folder as read-only.
- `explain_miss(key) -> str`: why `key` is not (validly) cached, naming the parts that differ from the closest
  stored entry of the same backend with the same "ir" part (else the most recent entry of that backend; with
  none of that backend, the same search over the other backends).
- `list_entries() -> list[EntryInfo]` (digest, backend, name, size, created, path; newest first),
  `entries_table(entries) -> rich.table.Table` (what `attnc cache ls` prints),
  `clear() -> int` (entries removed; a CacheError lists those it could not remove), `clear_memory()` (forget
  this process's memory layer), `cache_root() -> Path`, `default_cache() -> KernelCache`.
- `check_private(path)`: the ownership and permission rule below, as a CacheError (AOT loading uses it too).

Disk layout and guarantees
--------------------------
`<root>/v2/<backend>/<digest[:2]>/<digest>/` holds the files `build` wrote plus `manifest.json` (the parts, the
name, each file's SHA-256 and size, the creation time, and a MAC). `<root>` is `ATTNC_CACHE_DIR`, default
`platformdirs.user_cache_dir("attnc")`; `v2` is the on-disk format version. A build runs in a fresh folder
under `<root>/v2/.tmp/`, the manifest is written last and the folder is renamed into place with `os.replace`,
so an entry appears whole or not at all. Compile-or-load of one key holds a file lock
(`<root>/v2/.locks/<digest>.lock`), so racing processes build once and all use the one entry. Hashes are checked
once per process per entry, then the entry stays in memory.

What the cache trusts: folders and files it creates are private (0700 folders, files without group or other
bits), whatever the umask. The root, the `v2` layout and every entry must be plain folders and files (no
symbolic links) owned by this user and writable by nobody else (the rule of ssh and pip): a root that breaks it
is refused with a CacheError, and attnc falls back to a private temporary cache for the process with a
`CacheWarning`; an entry that breaks it is not loaded, but rebuilt, with a CacheWarning. An entry is used only
when its manifest's MAC -- HMAC-SHA256 under this user's secret over the key's digest and every file's name,
SHA-256 and size -- verifies and every file matches, with no file unlisted. The secret is 32 random bytes in a
0600 file outside the cache (`ATTNC_CACHE_SECRET`, default `<platformdirs.user_data_dir("attnc")>/cache-secret`,
made on first use); so rewriting a file *and* the manifest beside it, or moving another key's valid entry into
place, gives an entry that is never loaded. Anything invalid (truncated or deleted file, garbled manifest, a MAC
that does not verify) is removed and rebuilt. A secret that others can read or that cannot be made is refused
like an unsafe root.

Debugging: `ATTNC_CACHE_DEBUG=1` logs (logger "attnc.cache") hits, misses and rebuilds to stderr; each miss
says which named parts changed, as `explain_miss` does, and each rebuild why the stored entry was not used.
The records are DEBUG-level, so an application's own logging configuration can show them too (without the
miss explanation, which scans the cache).
"""
from __future__ import annotations

import atexit
import difflib
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import shutil
import stat
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Mapping, TypeVar

import platformdirs

from ..version import __version__
from ..errors import CacheError

if TYPE_CHECKING:  # importing filelock takes 50-125 ms (asyncio, in some versions): the functions that lock do
    from filelock import FileLock

    from ..ir import Attention
    from ..passes import KernelPlan

FORMAT = "v2"  # bump when the layout or manifest changes; old trees are then simply ignored
MANIFEST = "manifest.json"
DEBUG_ENV = "ATTNC_CACHE_DEBUG"
DIR_ENV = "ATTNC_CACHE_DIR"
SECRET_ENV = "ATTNC_CACHE_SECRET"  # the file holding this user's cache secret

_LOG = logging.getLogger("attnc.cache")
_BACKEND_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*\Z")
_DIGEST = re.compile(r"[0-9a-f]{64}\Z")
_CHUNK = 1 << 20
_SECRET_BYTES = 32
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
T = TypeVar("T")


class CacheWarning(RuntimeWarning):
    """The kernel cache cannot be used as configured; attnc carries on with a fallback."""


# ---------------------------------------------------------------- keys and entries


@dataclass(frozen=True, init=False, repr=False)
class CacheKey:
    """Named string parts; equal parts give an equal key and digest, whatever the mapping's order. `name` labels
    the entry (`attnc cache ls`, debug logs) and takes no part in the digest or in equality."""

    parts: tuple[tuple[str, str], ...]
    name: str | None = field(default=None, compare=False)

    def __init__(self, parts: Mapping[str, str], name: str | None = None):
        mapping = dict(parts)
        for part, value in mapping.items():
            if not isinstance(part, str) or not isinstance(value, str):
                raise TypeError(f"cache key parts must map str to str, got {part!r}: {type(value).__name__}")
        backend = mapping.get("backend")
        if backend is None or not _BACKEND_NAME.match(backend):
            raise ValueError(f"cache key needs a 'backend' part naming a folder ([A-Za-z0-9_.+-]), got {backend!r}")
        object.__setattr__(self, "parts", tuple(sorted(mapping.items())))
        object.__setattr__(self, "name", name)

    @cached_property
    def digest(self) -> str:
        # Each name and value is length-prefixed, so the byte stream parses back into exactly one part set.
        h = hashlib.sha256(b"attnc-cache-key\0")
        for part, value in self.parts:
            for text in (part, value):
                data = text.encode("utf-8")
                h.update(len(data).to_bytes(8, "big"))
                h.update(data)
        return h.hexdigest()

    @property
    def backend(self) -> str:
        return self.as_dict()["backend"]

    def as_dict(self) -> dict[str, str]:
        return dict(self.parts)

    def updated(self, **parts: str) -> CacheKey:
        return CacheKey({**self.as_dict(), **parts}, self.name)

    def __repr__(self) -> str:
        return f"CacheKey(backend={self.backend!r}, digest={self.digest[:12]!r}, parts={[n for n, _ in self.parts]})"


def spec_parts(spec: Attention) -> dict[str, str]:
    """The key parts of a spec's math: its key (the hash of its canonical form without the name, which only labels an
    entry), and the
    attnc and torch versions that every build depends on."""
    import torch

    return {"ir": spec.key, "attnc": __version__, "torch": torch.__version__}


def plan_parts(plan: KernelPlan) -> dict[str, str]:
    """spec_parts of the plan's spec, and the plan itself, again without the spec's name."""
    anonymous = replace(plan, spec=replace(plan.spec, name="_"))
    return {**spec_parts(plan.spec), "plan": repr(anonymous)}


@dataclass(frozen=True)
class FileRecord:
    name: str  # path relative to the entry folder, '/'-separated
    sha256: str
    size: int


@dataclass(frozen=True)
class Entry:
    """A verified artifact on disk."""

    key: CacheKey
    path: Path
    files: tuple[FileRecord, ...]
    created: float  # seconds since the epoch

    def file(self, name: str) -> Path:
        if not any(r.name == name for r in self.files):
            raise KeyError(f"cache entry {self.key.digest[:12]} has no file {name!r}; it has "
                           f"{[r.name for r in self.files]}")
        return self.path / name

    def read_bytes(self, name: str) -> bytes:
        return self.file(name).read_bytes()

    def read_text(self, name: str) -> str:
        return self.file(name).read_text(encoding="utf-8")


@dataclass(frozen=True)
class EntryInfo:
    """One stored entry as `attnc cache ls` shows it (read from its manifest, not re-hashed)."""

    digest: str
    backend: str
    name: str | None
    size: int  # bytes: the files plus the manifest
    created: float
    path: Path
    parts: tuple[tuple[str, str], ...] = field(repr=False)


# ---------------------------------------------------------------- the cache


@dataclass(frozen=True)
class _Rejected:
    """Why a stored entry is not used; `unsafe`: its owner or permissions break the trust rule (warned about)."""

    reason: str
    unsafe: bool = False


class KernelCache:
    """One cache root. The memory layers are per instance; the disk layer is shared by every process. `secret`
    signs and verifies entries (default: this user's, from `secret_path()`)."""

    def __init__(self, root: Path, secret: bytes | None = None):
        self.root = Path(root)
        self._base = self.root / FORMAT
        self._staging = self._base / ".tmp"  # builds and discarded entries, on the entries' file system
        self._secret = load_secret(secret_path()) if secret is None else secret
        self._entries: dict[str, Entry] = {}
        self._loaded: dict[str, object] = {}
        self._thread_locks: dict[str, threading.RLock] = {}
        self._guard = threading.Lock()

    # -- lookups

    def get_or_load(self, key: CacheKey, build: Callable[[Path], None], load: Callable[[Entry], T]) -> T:
        try:
            return self._loaded[key.digest]  # type: ignore[return-value]
        except KeyError:
            pass
        with self._thread_lock(key.digest):
            if key.digest not in self._loaded:
                self._loaded[key.digest] = load(self.get_or_build(key, build))
            return self._loaded[key.digest]  # type: ignore[return-value]

    def get_or_build(self, key: CacheKey, build: Callable[[Path], None]) -> Entry:
        entry = self._entries.get(key.digest)
        if entry is not None:
            return entry
        with self._thread_lock(key.digest):
            entry = self._entries.get(key.digest)
            if entry is None:
                entry = self._load_or_build(key, build)
                self._entries[key.digest] = entry
            return entry

    def get(self, key: CacheKey) -> Entry | None:
        entry = self._entries.get(key.digest)
        if entry is None:
            entry, _ = self._verify(key)  # one that does not verify is replaced by the next build
            if entry is not None:
                self._entries[key.digest] = entry
        return entry

    def _load_or_build(self, key: CacheKey, build: Callable[[Path], None]) -> Entry:
        debug = _debug_enabled()
        # Lock-free first: entries only ever appear whole, so a valid one can be used without waiting.
        entry, _ = self._verify(key)
        if entry is None:
            with self._file_lock(key.digest):
                entry, rejected = self._verify(key)  # another process may have built it
                if entry is None:
                    return self._build(key, build, rejected, explain=debug)
        _LOG.debug("hit %s (disk, verified)", _label(key))
        return entry

    def _build(self, key: CacheKey, build: Callable[[Path], None], rejected: _Rejected | None,
               explain: bool) -> Entry:
        """Called with the key's file lock held."""
        target = self._entry_dir(key)
        if rejected is not None:
            _LOG.debug("rebuild %s: %s entry (%s)", _label(key), "unsafe" if rejected.unsafe else "corrupt",
                       rejected.reason)
            if rejected.unsafe:
                warnings.warn(f"attnc kernel cache: refused to load {target}: {rejected.reason}; it is rebuilt",
                              CacheWarning, stacklevel=5)
            try:
                self._discard(target, key.digest)
            except OSError as err:
                raise CacheError(f"attnc kernel cache: {target} cannot be used ({rejected.reason}) and cannot be "
                                 f"removed ({type(err).__name__}: {err.strerror or err}); remove it by hand, or set "
                                 f"{DIR_ENV} to another folder") from None
        elif explain:
            _LOG.debug("%s", self.explain_miss(key))
        else:
            _LOG.debug("miss %s", _label(key))
        self._remove_leftovers(key.digest)
        _make_private_dirs(self._staging)
        staging = Path(tempfile.mkdtemp(prefix=f"{key.digest}.", suffix=".build", dir=self._staging))
        try:
            build(staging)
            files = _seal(staging)
            created = time.time()
            manifest = {"format": FORMAT, "digest": key.digest, "parts": key.as_dict(), "name": key.name,
                        "created": created, "files": {r.name: {"sha256": r.sha256, "size": r.size} for r in files},
                        "mac": _mac(self._secret, key.digest, files)}
            _write_private(staging / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True))
            _make_private_dirs(target.parent)
            os.replace(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return Entry(key, target, files, created)

    def _verify(self, key: CacheKey) -> tuple[Entry | None, _Rejected | None]:
        """(entry, None) when valid, (None, why) when present but not usable, (None, None) when absent."""
        entry_dir = self._entry_dir(key)
        try:
            check_private(entry_dir)
            present = _entry_files(entry_dir)
        except FileNotFoundError:
            return None, None
        except CacheError as err:
            return None, _Rejected(str(err), unsafe=True)
        except OSError as err:  # removed by a concurrent rebuild while we looked, or unreadable
            return None, _Rejected(f"unreadable ({type(err).__name__}: {err.strerror or err})")
        manifest, problem = _read_manifest(entry_dir)
        if manifest is None:
            return None, _Rejected(problem or "the entry folder has no manifest")
        if manifest["parts"] != key.as_dict() or manifest.get("digest") != key.digest:
            return None, _Rejected("its manifest records other key parts")
        try:
            records = tuple(FileRecord(name, rec["sha256"], int(rec["size"]))
                            for name, rec in manifest["files"].items())
            mac = str(manifest["mac"])
        except (KeyError, TypeError, ValueError) as err:
            return None, _Rejected(f"garbled manifest ({type(err).__name__}: {err})")
        # The MAC binds the files to this key under a secret kept outside the cache: a rewritten manifest, or
        # another key's valid entry moved here, does not verify.
        if not hmac.compare_digest(mac, _mac(self._secret, key.digest, records)):
            return None, _Rejected("its manifest is not signed with this user's cache secret (changed after attnc "
                                   "wrote it, or written under another secret)")
        unlisted = sorted(set(present) - {r.name for r in records} - {MANIFEST})
        if unlisted:
            return None, _Rejected(f"it holds files its manifest does not list: {unlisted}")
        for rec in records:
            path = entry_dir / rec.name
            try:
                size = path.stat().st_size
                if size != rec.size:
                    return None, _Rejected(f"{rec.name!r} has {size} bytes, the manifest says {rec.size}")
                if _file_sha256(path) != rec.sha256:
                    return None, _Rejected(f"{rec.name!r} does not match its SHA-256")
            except OSError as err:  # deleted, or removed by a concurrent rebuild while we read
                return None, _Rejected(f"{rec.name!r} cannot be read ({type(err).__name__})")
        return Entry(key, entry_dir, records, float(manifest["created"])), None

    # -- diagnostics

    def explain_miss(self, key: CacheKey) -> str:
        label = _label(key)
        entry, rejected = self._verify(key)
        if entry is not None:
            return f"hit {label}: a valid entry exists at {entry.path}"
        if rejected is not None:
            kind = "unsafe" if rejected.unsafe else "corrupt"
            return f"miss {label}: the stored entry is {kind} ({rejected.reason}); it is rebuilt"
        others = [e for e in self._scan() if e.digest != key.digest]
        if not others:
            return f"miss {label}: the cache {self._base} holds no entries yet"
        wanted = key.as_dict()

        def rank(e: EntryInfo) -> tuple:
            # Same backend first, then same 'ir'; among those the fewest changed parts, else the newest.
            parts = dict(e.parts)
            same_ir = parts.get("ir") == wanted.get("ir")
            changes = len(_changed_parts(parts, wanted)) if same_ir else 0
            return e.backend != key.backend, not same_ir, changes, -e.created

        other = min(others, key=rank)
        old = dict(other.parts)
        changed = _changed_parts(old, wanted)
        basis = (f"the closest {other.backend} entry with the same 'ir'" if old.get("ir") == wanted.get("ir")
                 else f"the most recent {other.backend} entry")
        lines = [f"miss {label}: compared with {basis} {other.digest[:12]}"
                 f"{f' ({other.name})' if other.name else ''}, {len(changed)} part(s) changed:"]
        lines += [f"  {name}: {_describe_change(old.get(name), wanted.get(name))}" for name in changed]
        return "\n".join(lines)

    # -- maintenance

    def list_entries(self) -> list[EntryInfo]:
        return sorted(self._scan(), key=lambda e: e.created, reverse=True)

    def clear(self) -> int:
        """Remove every entry (valid or not) and stale build folders; returns the number of entries removed.
        Raises CacheError naming what could not be removed (after removing the rest).

        Lock files stay: deleting one while another process waits on it would let two processes hold "the" lock.
        """
        from filelock import Timeout

        removed, failed = 0, []
        for entry_dir in self._entry_dirs():
            try:
                with self._file_lock(entry_dir.name):
                    self._discard(entry_dir, entry_dir.name)
                removed += 1
            except OSError as err:
                failed.append(f"{entry_dir} ({type(err).__name__}: {err.strerror or err})")
        for leftover in _subdirs(self._staging):
            try:  # a folder whose key is locked belongs to a build in progress: leave it
                with self._file_lock(leftover.name.split(".")[0], timeout=0):
                    shutil.rmtree(leftover, ignore_errors=True)
            except Timeout:
                continue
            except OSError:
                pass
            if leftover.exists():
                failed.append(f"{leftover} (not every file in it could be deleted)")
        self.clear_memory()
        if failed:
            raise CacheError(f"removed {removed} kernel(s) from {self.root}, but {len(failed)} folder(s) could not "
                             f"be removed (check their owner and permissions, or a build still running):\n  "
                             + "\n  ".join(failed))
        return removed

    def clear_memory(self) -> None:
        """Forget verified entries and loaded objects, as a new process would start."""
        self._entries.clear()
        self._loaded.clear()

    # -- helpers

    def _entry_dir(self, key: CacheKey) -> Path:
        return self._base / key.backend / key.digest[:2] / key.digest

    def _entry_dirs(self) -> Iterator[Path]:
        for backend_dir in _subdirs(self._base):
            if _BACKEND_NAME.match(backend_dir.name):  # skips .tmp and .locks
                for shard in _subdirs(backend_dir):
                    yield from (d for d in _subdirs(shard) if _DIGEST.match(d.name))

    def _scan(self) -> list[EntryInfo]:
        """Every entry with a readable manifest (files are not re-hashed)."""
        return [info for info in map(_read_info, self._entry_dirs()) if info is not None]

    def _thread_lock(self, digest: str) -> threading.RLock:
        with self._guard:
            return self._thread_locks.setdefault(digest, threading.RLock())

    def _file_lock(self, digest: str, timeout: float = -1) -> FileLock:
        from filelock import FileLock

        locks = self._base / ".locks"
        _make_private_dirs(locks)  # the whole cache may have been deleted under us
        return FileLock(str(locks / f"{digest}.lock"), timeout=timeout)

    def _discard(self, path: Path, digest: str) -> None:
        """Remove a folder; renamed aside first so its name is free even if deleting it fails part-way (what is
        left then stays under .tmp, where `clear` finds it)."""
        if not path.exists():
            return
        _make_private_dirs(self._staging)
        trash = Path(tempfile.mkdtemp(prefix=f"{digest}.", suffix=".trash", dir=self._staging))
        os.replace(path, trash / "entry")
        shutil.rmtree(trash, ignore_errors=True)

    def _remove_leftovers(self, digest: str) -> None:
        """Build folders of this key from killed processes (the caller holds the key's lock, so none is live)."""
        for leftover in self._staging.glob(f"{digest}.*"):
            shutil.rmtree(leftover, ignore_errors=True)


# ---------------------------------------------------------------- trust: ownership, permissions, the secret


def check_private(path: Path, follow: bool = False, owners: tuple[int, ...] | None = None) -> os.stat_result:
    """Raise CacheError unless `path` is a plain folder or file (a symbolic link only where `follow`), owned by
    this user (or by one of `owners`) and writable by nobody else; OSError where it cannot be examined."""
    st = os.stat(path) if follow else os.lstat(path)
    _check_stat(path, st, 0o022, owners)
    return st


def _check_stat(path: Path, st: os.stat_result, forbidden: int, owners: tuple[int, ...] | None = None) -> None:
    if stat.S_ISLNK(st.st_mode) or not (stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode)):
        raise CacheError(f"{path} is {'a symbolic link' if stat.S_ISLNK(st.st_mode) else 'not a plain file or folder'}"
                         f"; attnc loads compiled code only from plain files and folders")
    if not hasattr(os, "getuid"):  # no POSIX owners or mode bits (Windows)
        return
    uid = os.getuid()
    if st.st_uid not in (owners or (uid,)):
        raise CacheError(f"{path} is owned by uid {st.st_uid}, not by you (uid {uid}); attnc does not trust files "
                         f"another user controls")
    loose = stat.S_IMODE(st.st_mode) & forbidden
    if loose:
        who = " and ".join(w for w, bits in (("group", 0o070), ("others", 0o007)) if loose & bits)
        access, fix = ("writable", "go-w") if forbidden == 0o022 else ("readable or writable", "go-rwx")
        raise CacheError(f"{path} is {access} by {who} (mode {stat.S_IMODE(st.st_mode):04o}); attnc does not trust "
                         f"it: run `chmod {fix} {path}`")


def verify_files(folder: Path, files: Mapping[str, Mapping], rebuild: str) -> None:
    """For AOT artifacts, which a user points attnc at (and may have installed as root): raise CacheError unless
    `folder`, each file in `files` (its manifest's: name relative to `folder` -> {"sha256", "size"}) and the
    folders between, and the manifest itself, are plain files and folders inside `folder`, owned by this user or
    root and writable by nobody else, and each file has its listed size and SHA-256. `rebuild` ends the
    messages: how to build the artifact again."""
    trusted = (os.getuid(), 0) if hasattr(os, "getuid") else None
    check_private(folder, follow=True, owners=trusted)
    check_private(folder / MANIFEST, owners=trusted)  # the text that says what the files must be
    for name, record in files.items():
        relative = PurePosixPath(name)
        if relative.is_absolute() or not relative.parts or ".." in relative.parts or "\\" in name:
            raise CacheError(f"{folder}: its {MANIFEST} lists {name!r}, a file outside the artifact: {rebuild}")
        path = folder.joinpath(*relative.parts)
        try:
            for depth in range(1, len(relative.parts) + 1):
                check_private(folder.joinpath(*relative.parts[:depth]), owners=trusted)
            same = path.stat().st_size == int(record["size"]) and _file_sha256(path) == record["sha256"]
        except OSError as err:
            raise CacheError(f"{path}: listed in {MANIFEST} but cannot be read ({type(err).__name__}); the artifact "
                             f"is incomplete: {rebuild}") from None
        if not same:
            raise CacheError(f"{path}: does not match the SHA-256 in {MANIFEST} (changed after `attnc compile` wrote "
                             f"it): {rebuild}")


def seal(paths: Iterable[Path]) -> None:
    """Take write access from group and others on `paths` (an AOT build's), whatever the umask: verify_files
    refuses what others can change."""
    for path in paths:
        os.chmod(path, stat.S_IMODE(os.lstat(path).st_mode) & ~0o022)


def _make_private_dirs(path: Path) -> None:
    """Create `path` and its missing parents as 0700 folders, whatever the umask."""
    missing = []
    while not os.path.lexists(path):
        missing.append(path)
        path = path.parent
    for folder in reversed(missing):
        try:
            os.mkdir(folder, 0o700)
        except FileExistsError:  # made by a racing process, with this same rule
            continue
        os.chmod(folder, 0o700)  # mkdir's mode is masked by the umask


def _write_private(path: Path, text: str) -> None:
    with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW, 0o600), "w", encoding="utf-8") as f:
        f.write(text)


def secret_path() -> Path:
    """The file holding this user's cache secret: `ATTNC_CACHE_SECRET`, else under the user data dir."""
    configured = os.environ.get(SECRET_ENV)
    return Path(configured).expanduser() if configured else Path(platformdirs.user_data_dir("attnc")) / "cache-secret"


def load_secret(path: Path) -> bytes:
    """The secret in `path` (32 random bytes as hex), made on first use as a 0600 file. Raises CacheError for a
    secret another user owns or others can read, OSError where it cannot be read or made."""
    try:
        fd = os.open(path, os.O_RDONLY | _NOFOLLOW)
    except FileNotFoundError:
        _make_secret(path)
        fd = os.open(path, os.O_RDONLY | _NOFOLLOW)
    with open(fd, "rb") as f:
        _check_stat(path, os.fstat(f.fileno()), 0o077)
        text = f.read(4 * _SECRET_BYTES)
    try:
        secret = bytes.fromhex(text.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        secret = b""
    if len(secret) != _SECRET_BYTES:
        raise CacheError(f"{path} does not hold a cache secret ({_SECRET_BYTES} bytes as hex); delete it and attnc "
                         f"makes a new one (every cached kernel is then rebuilt once)")
    return secret


def _make_secret(path: Path) -> None:
    _make_private_dirs(path.parent)
    staged = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    _write_private(staged, secrets.token_hex(_SECRET_BYTES) + "\n")
    try:
        os.link(staged, path)  # appears whole; a racing process that linked first wins, and both use its secret
    except FileExistsError:
        pass
    finally:
        os.unlink(staged)


def _mac(secret: bytes, digest: str, records: tuple[FileRecord, ...]) -> str:
    message = json.dumps({"format": FORMAT, "digest": digest,
                          "files": sorted([r.name, r.sha256, r.size] for r in records)}, separators=(",", ":"))
    return hmac.new(secret, message.encode("utf-8"), hashlib.sha256).hexdigest()


# ---------------------------------------------------------------- files and manifests


def _subdirs(path: Path) -> list[Path]:
    try:
        return [p for p in path.iterdir() if p.is_dir() and not p.is_symlink()]
    except OSError:
        return []


def _label(key: CacheKey) -> str:
    return f"{key.backend} {key.digest[:12]}{f' ({key.name})' if key.name else ''}"


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _seal(folder: Path) -> tuple[FileRecord, ...]:
    """The records of what a build wrote into `folder`, each made private to this user (umask aside)."""
    records = []
    for path in sorted(folder.rglob("*")):
        name = path.relative_to(folder).as_posix()
        if path.is_symlink() or not (path.is_file() or path.is_dir()):
            raise ValueError(f"cache build wrote {name!r}, which is not a plain file or folder")
        os.chmod(path, stat.S_IMODE(path.stat().st_mode) & 0o700)
        if path.is_file():
            if name == MANIFEST:
                raise ValueError(f"cache build must not write {MANIFEST!r}: the cache writes it")
            records.append(FileRecord(name, _file_sha256(path), path.stat().st_size))
    if not records:
        raise ValueError("cache build wrote no files")
    return tuple(records)


def _entry_files(entry_dir: Path) -> list[str]:
    """The names of the files under an entry, each checked by check_private (CacheError for the first that fails)."""
    names = []
    for path in sorted(entry_dir.rglob("*")):
        if stat.S_ISREG(check_private(path).st_mode):
            names.append(path.relative_to(entry_dir).as_posix())
    return names


def _read_manifest(entry_dir: Path) -> tuple[dict | None, str | None]:
    """(manifest, None) or (None, problem); (None, None) when there is no entry at all."""
    try:
        text = (entry_dir / MANIFEST).read_text(encoding="utf-8")
    except FileNotFoundError:
        return None, ("the entry folder has no manifest" if entry_dir.exists() else None)
    except (OSError, UnicodeDecodeError) as err:
        return None, f"unreadable manifest ({err})"
    try:
        manifest = json.loads(text)
        if not (isinstance(manifest, dict) and isinstance(manifest["parts"], dict)
                and isinstance(manifest["files"], dict)):
            raise ValueError("not a manifest object")
        float(manifest["created"])
    except (ValueError, KeyError, TypeError) as err:
        return None, f"garbled manifest ({type(err).__name__}: {err})"
    return manifest, None


def _read_info(entry_dir: Path) -> EntryInfo | None:
    manifest, _ = _read_manifest(entry_dir)
    if manifest is None:
        return None
    parts = {str(k): str(v) for k, v in manifest["parts"].items()}
    name = manifest.get("name")
    try:
        size = (entry_dir / MANIFEST).stat().st_size
    except OSError:  # removed since we read it
        return None
    size += sum(int(rec.get("size", 0)) for rec in manifest["files"].values() if isinstance(rec, dict))
    return EntryInfo(entry_dir.name, entry_dir.parent.parent.name, name if isinstance(name, str) else None, size,
                     float(manifest["created"]), entry_dir, tuple(sorted(parts.items())))


def entries_table(entries: list[EntryInfo]):
    """A rich Table of `entries` for `attnc cache ls`."""
    from rich.table import Table

    table = Table(title=f"attnc kernel cache {cache_root()}", title_justify="left")
    for column, justify in (("digest", "left"), ("backend", "left"), ("name", "left"), ("size", "right"),
                            ("created", "left")):
        table.add_column(column, justify=justify)
    for e in entries:
        table.add_row(e.digest[:12], e.backend, e.name or "-", _human_size(e.size),
                      time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e.created)))
    return table


def _human_size(size: int) -> str:
    for unit in ("B", "KiB", "MiB"):
        if size < 1024:
            return f"{size} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"


def _changed_parts(old: Mapping[str, str], new: Mapping[str, str]) -> list[str]:
    return sorted(name for name in set(old) | set(new) if old.get(name) != new.get(name))


def _describe_change(old: str | None, new: str | None, max_lines: int = 8) -> str:
    if old is None:
        return f"new part {_short(new)} (absent in that entry)"
    if new is None:
        return f"part removed (was {_short(old)})"
    if "\n" not in old + new and len(old) + len(new) <= 160:
        return f"{old!r} -> {new!r}"
    diff = [line for line in difflib.unified_diff(old.splitlines(), new.splitlines(), lineterm="", n=0)
            if not line.startswith(("---", "+++", "@@"))]
    shown = [f"      {line}" for line in diff[:max_lines]]
    more = [f"      ... {len(diff) - max_lines} more changed line(s)"] if len(diff) > max_lines else []
    return "\n".join(["changed (- stored, + wanted):", *shown, *more])


def _short(value: str | None, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---------------------------------------------------------------- debug logging


class _StderrHandler(logging.Handler):
    """Writes to whatever sys.stderr is at emit time (pytest and notebooks swap it)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(self.format(record) + "\n")
        except Exception:  # logging must never break a kernel call
            self.handleError(record)


_DEBUG_HANDLER = _StderrHandler()
_DEBUG_HANDLER.setFormatter(logging.Formatter("attnc.cache: %(message)s"))


def _debug_enabled() -> bool:
    if os.environ.get(DEBUG_ENV, "") in ("", "0"):
        return False
    if _DEBUG_HANDLER not in _LOG.handlers:
        _LOG.addHandler(_DEBUG_HANDLER)
        _LOG.setLevel(logging.DEBUG)
    return True


# ---------------------------------------------------------------- the process-wide default cache

_caches: dict[tuple[str, Path], KernelCache] = {}
_caches_guard = threading.Lock()


def default_cache() -> KernelCache:
    """The cache at `ATTNC_CACHE_DIR` (default the user cache dir) under this user's secret, or, where either is
    unusable or unsafe, this process's private fallback (with a CacheWarning)."""
    configured = (os.environ.get(DIR_ENV) or platformdirs.user_cache_dir("attnc"), secret_path())
    cache = _caches.get(configured)
    if cache is None:
        with _caches_guard:
            cache = _caches.get(configured)
            if cache is None:
                cache = _caches[configured] = _open(Path(configured[0]).expanduser(), configured[1])
    return cache


def cache_root() -> Path:
    """The folder in use: `ATTNC_CACHE_DIR` (default the user cache dir), or this process's fallback."""
    return default_cache().root


def _open(root: Path, secret_file: Path) -> KernelCache:
    try:
        secret = load_secret(secret_file)
        _prepare(root)
        return KernelCache(root, secret)
    except (OSError, CacheError) as err:
        fallback = Path(tempfile.mkdtemp(prefix="attnc-cache-"))
        atexit.register(shutil.rmtree, fallback, True)
        _prepare(fallback)
        reason = str(err) if isinstance(err, CacheError) else f"{type(err).__name__}: {err}"
        warnings.warn(f"attnc kernel cache {root} cannot be used ({reason}); kernels are cached in {fallback} for "
                      f"this process only. Fix that, or set {DIR_ENV} to a folder of yours (and {SECRET_ENV} to a "
                      f"file of yours), to keep them.", CacheWarning, stacklevel=4)
        return KernelCache(fallback, secrets.token_bytes(_SECRET_BYTES))


def _prepare(root: Path) -> None:
    """Create the layout as private folders and prove it usable: CacheError where it breaks the trust rule,
    OSError where it cannot be written."""
    staging, locks = root / FORMAT / ".tmp", root / FORMAT / ".locks"
    for folder in (staging, locks):
        _make_private_dirs(folder)
    check_private(root, follow=True)  # the root may be a link to a folder of this user's
    for folder in (root / FORMAT, staging, locks):
        check_private(folder)
    with tempfile.TemporaryFile(dir=staging):
        pass


def get_or_load(key: CacheKey, build: Callable[[Path], None], load: Callable[[Entry], T]) -> T:
    return default_cache().get_or_load(key, build, load)


def get_or_build(key: CacheKey, build: Callable[[Path], None]) -> Entry:
    return default_cache().get_or_build(key, build)


def get(key: CacheKey) -> Entry | None:
    return default_cache().get(key)


def explain_miss(key: CacheKey) -> str:
    return default_cache().explain_miss(key)


def list_entries() -> list[EntryInfo]:
    return default_cache().list_entries()


def clear() -> int:
    return default_cache().clear()


def clear_memory() -> None:
    default_cache().clear_memory()
