"""The kernel cache: memory first, then disk; generic over backends (Triton modules, TVM libraries, AOT).

How a backend uses it
---------------------
    from attnc.backends import cache

    key = cache.CacheKey({
        "ir": spec.canonical,                 # canonical IR text
        "plan": repr(plan),                   # the KernelPlan
        "backend": "triton",                  # required; also the entry's folder, so [A-Za-z0-9][A-Za-z0-9_.+-]*
        "backend_version": triton.__version__,
        "device": "cuda:sm_90",               # or "cpu:x86_64-avx512"
        "attnc": attnc.__version__,
        "name": spec.name,                    # optional; shown by `attnc cache ls`
    })

    def build(out_dir: Path) -> None:        # write the artifact's files into out_dir (a fresh empty folder)
        (out_dir / "kernel.py").write_text(source)

    def load(entry: cache.Entry) -> ModuleType:   # turn a verified entry into the object you launch
        return import_from_path(entry.file("kernel.py"))

    module = cache.get_or_load(key, build, load)  # the second call is one dict look-up

API (module functions act on the cache at `cache_root()`; `KernelCache(root)` has the same methods)
---------------------------------------------------------------------------------------------------
- `CacheKey(parts: Mapping[str, str])`: `.digest` (hex SHA-256 over the sorted, length-prefixed name/value
  pairs), `.backend`, `.as_dict()`, `.updated(**parts)`. Every value must already be a string.
- `get_or_build(key, build: Callable[[Path], None]) -> Entry`: the verified entry, built on a miss.
- `get_or_load(key, build, load: Callable[[Entry], T]) -> T`: build on a miss, `load` once per key and process,
  memoized; exceptions from `build` and `load` (e.g. CompileError) reach the caller unchanged.
- `Entry`: `.key`, `.path` (the entry folder), `.files` (FileRecord name/sha256/size), `.created`,
  `.file(name) -> Path`, `.read_bytes(name)`, `.read_text(name)`. Treat the folder as read-only.
- `explain_miss(key) -> str`: why `key` is not (validly) cached, naming the parts that differ from the closest
  stored entry of the same backend with the same "ir" part (else the most recent entry of that backend; with
  none of that backend, the same search over the other backends).
- `list_entries() -> list[EntryInfo]` (digest, backend, name, size, created, path; newest first),
  `entries_table(entries) -> rich.table.Table` (what `attnc cache ls` prints),
  `clear() -> int` (entries removed), `clear_memory()` (forget this process's memory layer),
  `cache_root() -> Path`, `default_cache() -> KernelCache`.

Disk layout and guarantees
--------------------------
`<root>/v1/<backend>/<digest[:2]>/<digest>/` holds the files `build` wrote plus `manifest.json` (the parts,
each file's SHA-256 and size, the creation time). `<root>` is `ATTNC_CACHE_DIR`, default
`platformdirs.user_cache_dir("attnc")`; `v1` is the on-disk format version. A build runs in a fresh folder
under `<root>/v1/.tmp/`, the manifest is written last and the folder is renamed into place with `os.replace`,
so an entry appears whole or not at all. Compile-or-load of one key holds a file lock
(`<root>/v1/.locks/<digest>.lock`), so racing processes build once and all use the one entry. An entry is
valid only when its manifest parses, records the key's parts and every file has the recorded size and hash;
anything else (truncated or deleted file, garbled manifest) is removed and rebuilt, never reported to the
user. Hashes are checked once per process per entry, then the entry stays in memory. An unwritable cache
directory falls back to a private temporary one for this process, with a `CacheWarning`.

Debugging: `ATTNC_CACHE_DEBUG=1` logs (logger "attnc.cache") hits, misses and rebuilds to stderr; each miss
says which named parts changed, as `explain_miss` does. The records are DEBUG-level, so an application's
own logging configuration can show them too (without the miss explanation, which scans the cache).
"""
from __future__ import annotations

import atexit
import difflib
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Mapping, TypeVar

import platformdirs

if TYPE_CHECKING:  # importing filelock takes 50-125 ms (asyncio, in some versions): the functions that lock do
    from filelock import FileLock

FORMAT = "v1"  # bump when the layout or manifest changes; old trees are then simply ignored
MANIFEST = "manifest.json"
META = "meta.json"  # optional file a backend may write; its "name" is shown by list_entries
DEBUG_ENV = "ATTNC_CACHE_DEBUG"
DIR_ENV = "ATTNC_CACHE_DIR"

_LOG = logging.getLogger("attnc.cache")
_BACKEND_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*\Z")
_DIGEST = re.compile(r"[0-9a-f]{64}\Z")
_CHUNK = 1 << 20
T = TypeVar("T")


class CacheWarning(RuntimeWarning):
    """The kernel cache cannot be used as configured; attnc carries on with a fallback."""


# ---------------------------------------------------------------- keys and entries


@dataclass(frozen=True, init=False, repr=False)
class CacheKey:
    """Named string parts; equal parts give an equal key and digest, whatever the mapping's order."""

    parts: tuple[tuple[str, str], ...]

    def __init__(self, parts: Mapping[str, str]):
        mapping = dict(parts)
        for name, value in mapping.items():
            if not isinstance(name, str) or not isinstance(value, str):
                raise TypeError(f"cache key parts must map str to str, got {name!r}: {type(value).__name__}")
        backend = mapping.get("backend")
        if backend is None or not _BACKEND_NAME.match(backend):
            raise ValueError(f"cache key needs a 'backend' part naming a folder ([A-Za-z0-9_.+-]), got {backend!r}")
        object.__setattr__(self, "parts", tuple(sorted(mapping.items())))

    @cached_property
    def digest(self) -> str:
        # Each name and value is length-prefixed, so the byte stream parses back into exactly one part set.
        h = hashlib.sha256(b"attnc-cache-key\0")
        for name, value in self.parts:
            for text in (name, value):
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
        return CacheKey({**self.as_dict(), **parts})

    def __repr__(self) -> str:
        return f"CacheKey(backend={self.backend!r}, digest={self.digest[:12]!r}, parts={[n for n, _ in self.parts]})"


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


class KernelCache:
    """One cache root. The memory layers are per instance; the disk layer is shared by every process."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self._base = self.root / FORMAT
        self._staging = self._base / ".tmp"  # builds and discarded entries, on the entries' file system
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

    def _load_or_build(self, key: CacheKey, build: Callable[[Path], None]) -> Entry:
        debug = _debug_enabled()
        # Lock-free first: entries only ever appear whole, so a valid one can be used without waiting.
        entry, _ = _verify(self._entry_dir(key), key)
        if entry is None:
            with self._file_lock(key.digest):
                entry, problem = _verify(self._entry_dir(key), key)  # another process may have built it
                if entry is None:
                    return self._build(key, build, problem, explain=debug)
        _LOG.debug("hit %s (disk, verified)", _label(key))
        return entry

    def _build(self, key: CacheKey, build: Callable[[Path], None], problem: str | None, explain: bool) -> Entry:
        """Called with the key's file lock held."""
        target = self._entry_dir(key)
        if problem is not None:
            _LOG.debug("rebuild %s: corrupt entry (%s)", _label(key), problem)
            self._discard(target, key.digest)
        elif explain:
            _LOG.debug("%s", self.explain_miss(key))
        else:
            _LOG.debug("miss %s", _label(key))
        self._remove_leftovers(key.digest)
        self._staging.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f"{key.digest}.", suffix=".build", dir=self._staging))
        try:
            build(staging)
            files = _record_files(staging)
            created = time.time()
            manifest = {"format": FORMAT, "digest": key.digest, "parts": key.as_dict(), "created": created,
                        "files": {r.name: {"sha256": r.sha256, "size": r.size} for r in files}}
            (staging / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True), encoding="utf-8")
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return Entry(key, target, files, created)

    # -- diagnostics

    def explain_miss(self, key: CacheKey) -> str:
        label = _label(key)
        entry, problem = _verify(self._entry_dir(key), key)
        if entry is not None:
            return f"hit {label}: a valid entry exists at {entry.path}"
        if problem is not None:
            return f"miss {label}: the stored entry is corrupt ({problem}); it is rebuilt"
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

        Lock files stay: deleting one while another process waits on it would let two processes hold "the" lock.
        """
        from filelock import Timeout

        removed = 0
        for entry_dir in self._entry_dirs():
            with self._file_lock(entry_dir.name):
                self._discard(entry_dir, entry_dir.name)
            removed += 1
        for leftover in _subdirs(self._staging):
            try:  # a folder whose key is locked belongs to a build in progress: leave it
                with self._file_lock(leftover.name.split(".")[0], timeout=0):
                    shutil.rmtree(leftover, ignore_errors=True)
            except Timeout:
                pass
        self.clear_memory()
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
        locks.mkdir(parents=True, exist_ok=True)  # the whole cache may have been deleted under us
        return FileLock(str(locks / f"{digest}.lock"), timeout=timeout)

    def _discard(self, path: Path, digest: str) -> None:
        """Remove a folder; renamed aside first so its name is free even if deleting it fails part-way."""
        if not path.exists():
            return
        self._staging.mkdir(parents=True, exist_ok=True)
        trash = Path(tempfile.mkdtemp(prefix=f"{digest}.", suffix=".trash", dir=self._staging))
        os.replace(path, trash / "entry")
        shutil.rmtree(trash, ignore_errors=True)

    def _remove_leftovers(self, digest: str) -> None:
        """Build folders of this key from killed processes (the caller holds the key's lock, so none is live)."""
        for leftover in self._staging.glob(f"{digest}.*"):
            shutil.rmtree(leftover, ignore_errors=True)


def _subdirs(path: Path) -> list[Path]:
    try:
        return [p for p in path.iterdir() if p.is_dir() and not p.is_symlink()]
    except OSError:
        return []


def _label(key: CacheKey) -> str:
    name = key.as_dict().get("name")
    return f"{key.backend} {key.digest[:12]}{f' ({name})' if name else ''}"


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _record_files(folder: Path) -> tuple[FileRecord, ...]:
    records = []
    for path in sorted(folder.rglob("*")):
        name = path.relative_to(folder).as_posix()
        if path.is_symlink() or not (path.is_file() or path.is_dir()):
            raise ValueError(f"cache build wrote {name!r}, which is not a plain file or folder")
        if path.is_file():
            if name == MANIFEST:
                raise ValueError(f"cache build must not write {MANIFEST!r}: the cache writes it")
            records.append(FileRecord(name, _file_sha256(path), path.stat().st_size))
    if not records:
        raise ValueError("cache build wrote no files")
    return tuple(records)


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


def _verify(entry_dir: Path, key: CacheKey) -> tuple[Entry | None, str | None]:
    """(entry, None) when valid, (None, problem) when present but unusable, (None, None) when absent."""
    manifest, problem = _read_manifest(entry_dir)
    if manifest is None:
        return None, problem
    if manifest["parts"] != key.as_dict():
        return None, "its manifest records other key parts"
    try:
        records = tuple(FileRecord(name, rec["sha256"], int(rec["size"])) for name, rec in manifest["files"].items())
    except (KeyError, TypeError, ValueError) as err:
        return None, f"garbled manifest ({type(err).__name__}: {err})"
    for rec in records:
        path = entry_dir / rec.name
        try:
            size = path.stat().st_size
            if size != rec.size:
                return None, f"{rec.name!r} has {size} bytes, the manifest says {rec.size}"
            if _file_sha256(path) != rec.sha256:
                return None, f"{rec.name!r} does not match its SHA-256"
        except OSError as err:  # deleted, or removed by a concurrent rebuild while we read
            return None, f"{rec.name!r} cannot be read ({type(err).__name__})"
    return Entry(key, entry_dir, records, float(manifest["created"])), None


def _read_info(entry_dir: Path) -> EntryInfo | None:
    manifest, _ = _read_manifest(entry_dir)
    if manifest is None:
        return None
    parts = {str(k): str(v) for k, v in manifest["parts"].items()}
    name = parts.get("name")
    if name is None and META in manifest["files"]:
        try:
            meta = json.loads((entry_dir / META).read_text(encoding="utf-8"))
            name = meta.get("name") if isinstance(meta, dict) else None
        except (OSError, ValueError):
            name = None
    try:
        size = (entry_dir / MANIFEST).stat().st_size
    except OSError:  # removed since we read it
        return None
    size += sum(int(rec.get("size", 0)) for rec in manifest["files"].values() if isinstance(rec, dict))
    return EntryInfo(entry_dir.name, entry_dir.parent.parent.name, name, size, float(manifest["created"]),
                     entry_dir, tuple(sorted(parts.items())))


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

_resolved_roots: dict[str, Path] = {}
_caches: dict[Path, KernelCache] = {}
_caches_guard = threading.Lock()


def cache_root() -> Path:
    """The folder in use: `ATTNC_CACHE_DIR` (default the user cache dir), or this process's fallback."""
    configured = os.environ.get(DIR_ENV) or platformdirs.user_cache_dir("attnc")
    root = _resolved_roots.get(configured)
    if root is None:
        with _caches_guard:
            root = _resolved_roots.get(configured) or _usable_root(Path(configured).expanduser())
            _resolved_roots[configured] = root
    return root


def _usable_root(root: Path) -> Path:
    try:
        _prepare(root)
        return root
    except OSError as err:
        fallback = Path(tempfile.mkdtemp(prefix="attnc-cache-"))
        atexit.register(shutil.rmtree, fallback, True)
        _prepare(fallback)
        message = (f"attnc kernel cache {root} is not writable ({type(err).__name__}: {err}); kernels are cached "
                   f"in {fallback} for this process only. Set {DIR_ENV} to a writable folder to keep them.")
        warnings.warn(message, CacheWarning, stacklevel=2)
        return fallback


def _prepare(root: Path) -> None:
    """Create the layout and prove it writable (raises OSError otherwise)."""
    for sub in (".tmp", ".locks"):
        folder = root / FORMAT / sub
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass


def default_cache() -> KernelCache:
    root = cache_root()
    cache = _caches.get(root)
    if cache is None:
        with _caches_guard:
            cache = _caches.setdefault(root, KernelCache(root))
    return cache


def get_or_load(key: CacheKey, build: Callable[[Path], None], load: Callable[[Entry], T]) -> T:
    return default_cache().get_or_load(key, build, load)


def get_or_build(key: CacheKey, build: Callable[[Path], None]) -> Entry:
    return default_cache().get_or_build(key, build)


def explain_miss(key: CacheKey) -> str:
    return default_cache().explain_miss(key)


def list_entries() -> list[EntryInfo]:
    return default_cache().list_entries()


def clear() -> int:
    return default_cache().clear()


def clear_memory() -> None:
    default_cache().clear_memory()
