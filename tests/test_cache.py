"""The kernel cache: memory and disk layers, corruption recovery, races between processes, diagnostics."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from attnc.backends import cache

REPO = Path(__file__).resolve().parents[1]
IR = "attention x {\n    q: f16[B, H, M, D]\n    k: f16[B, H, N, D]\n    v: f16[B, H, N, D]\n    mask causal\n}\n"
BASE_PARTS = {
    "ir": IR,
    "plan": "KernelPlan(BLOCK_M=64, BLOCK_N=32, num_warps=4)",
    "backend": "triton",
    "backend_version": "3.9.0",
    "device": "cpu:x86_64",
    "attnc": "0.1.0",
}


def _key(name: str = "x", **changes: str) -> cache.CacheKey:
    return cache.CacheKey({**BASE_PARTS, **changes}, name=name)


def _builder(side: Path, payload: str, delay: float = 0.0):
    """A build that leaves one marker file per run in `side`, so tests count builds even across processes."""
    side.mkdir(exist_ok=True)

    def build(out: Path) -> None:
        (side / f"build-{os.getpid()}-{time.monotonic_ns()}").touch()
        time.sleep(delay)
        (out / "kernel.py").write_text(payload)
        (out / "sub").mkdir()
        (out / "sub" / "meta.json").write_text(json.dumps({"payload_len": len(payload)}))

    return build


def _builds(side: Path) -> int:
    return len(list(side.glob("build-*")))


def _entry_dirs() -> list[Path]:
    return sorted(cache.cache_root().glob(f"{cache.FORMAT}/*/*/*"))


# A separate interpreter: `python -c SCRIPT side payload go parts_json` prints the entry's kernel.py.
CHILD = """
import json, os, sys, time
from pathlib import Path
from attnc.backends import cache
side, payload, go, parts = Path(sys.argv[1]), sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
while go != "-" and not os.path.exists(go):
    time.sleep(0.005)
def build(out):
    (side / f"build-{os.getpid()}").touch()
    time.sleep(0.4)  # long enough that the other process arrives while this one builds
    (out / "kernel.py").write_text(payload)
sys.stdout.write(cache.get_or_build(cache.CacheKey(parts), build).read_text("kernel.py"))
"""


def _child(side: Path, payload: str, go: str = "-") -> subprocess.Popen:  # the child's key has no name
    return subprocess.Popen([sys.executable, "-c", CHILD, str(side), payload, go, json.dumps(BASE_PARTS)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen) -> str:
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    return out


# ---------------------------------------------------------------- keys


def test_key_is_order_independent_and_length_prefixed():
    assert _key().digest == cache.CacheKey(dict(reversed(list(BASE_PARTS.items())))).digest
    assert _key() == cache.CacheKey(dict(reversed(list(BASE_PARTS.items()))))
    # Without length prefixes these pairs would feed the same bytes to the hash.
    a = cache.CacheKey({"backend": "t", "a": "b=c"})
    b = cache.CacheKey({"backend": "t", "a=b": "c"})
    c = cache.CacheKey({"backend": "t", "ab": ""})
    d = cache.CacheKey({"backend": "t", "a": "b"})
    assert len({a.digest, b.digest, c.digest, d.digest}) == 4


def test_key_rejects_non_strings_and_bad_backend():
    with pytest.raises(TypeError, match="str to str"):
        cache.CacheKey({"backend": "triton", "plan": 3})
    with pytest.raises(ValueError, match="'backend' part"):
        cache.CacheKey({"ir": IR})
    with pytest.raises(ValueError, match="'backend' part"):
        cache.CacheKey({"backend": "../evil"})
    with pytest.raises(TypeError, match="str to str"):
        cache.CacheKey({"backend": "triton", 1: "x"})


@pytest.mark.parametrize("part", sorted(BASE_PARTS))
def test_changing_one_part_changes_digest_and_explain_names_it(part, tmp_path):
    cache.get_or_build(_key(), _builder(tmp_path / "side", "base"))
    changed = _key(**{part: BASE_PARTS[part] + "-changed"})
    assert changed.digest != _key().digest
    text = cache.explain_miss(changed)
    assert text.startswith("miss ") and "1 part(s) changed" in text
    assert f"\n  {part}: " in text, text
    # Every other part is unchanged, so it must not be named.
    assert all(f"\n  {other}: " not in text for other in BASE_PARTS if other != part)


def test_explain_miss_long_part_shows_changed_lines_and_added_parts(tmp_path):
    cache.get_or_build(_key(), _builder(tmp_path / "side", "base"))
    text = cache.explain_miss(_key(ir=IR.replace("mask causal", "mask i - j < 128")))
    assert "most recent triton entry" in text
    assert "\n      -    mask causal\n      +    mask i - j < 128" in text
    text = cache.explain_miss(_key(autotune="on"))
    assert "  autotune: new part 'on'" in text
    assert cache.explain_miss(_key()).startswith("hit ")


def test_explain_miss_prefers_closest_entry_with_same_ir(tmp_path):
    side = tmp_path / "side"
    cache.get_or_build(_key(plan="P1", device="cuda:sm_90"), _builder(side, "a"))
    cache.get_or_build(_key(plan="P2"), _builder(side, "b"))
    cache.get_or_build(_key(ir="other", plan="P3"), _builder(side, "c"))  # newest, but another IR
    text = cache.explain_miss(_key(plan="P3"))
    assert "closest triton entry with the same 'ir'" in text and "1 part(s) changed" in text
    assert "  plan: 'P2' -> 'P3'" in text


# ---------------------------------------------------------------- memory and disk layers


def test_memory_then_disk_hit(tmp_path):
    side = tmp_path / "side"
    first = cache.get_or_build(_key(), _builder(side, "kernel A"))
    assert cache.get_or_build(_key(), _builder(side, "never")) is first  # memory hit
    assert _builds(side) == 1
    cache.clear_memory()  # what a new process sees: only the disk
    again = cache.get_or_build(_key(), _builder(side, "never"))
    assert _builds(side) == 1 and again is not first
    assert again.read_text("kernel.py") == "kernel A"
    assert json.loads(again.read_text("sub/meta.json")) == {"payload_len": 8}
    assert again.path == first.path and again.path.is_relative_to(Path(os.environ["ATTNC_CACHE_DIR"]))
    assert [r.name for r in again.files] == ["kernel.py", "sub/meta.json"]
    with pytest.raises(KeyError, match="no file 'kernel.so'"):
        again.file("kernel.so")


def test_get_or_load_loads_once_per_process(tmp_path):
    side = tmp_path / "side"
    loads = []

    def load(entry: cache.Entry) -> str:
        loads.append(entry.path)
        return entry.read_text("kernel.py").upper()

    assert cache.get_or_load(_key(), _builder(side, "kernel b"), load) == "KERNEL B"
    assert cache.get_or_load(_key(), _builder(side, "never"), load) == "KERNEL B"
    assert len(loads) == 1 and _builds(side) == 1
    cache.clear_memory()
    assert cache.get_or_load(_key(), _builder(side, "never"), load) == "KERNEL B"
    assert len(loads) == 2 and _builds(side) == 1


def test_threads_racing_in_one_process_build_and_load_once(tmp_path):
    side = tmp_path / "side"
    loads, results = [], []

    def load(entry):
        loads.append(1)
        return entry.read_text("kernel.py")

    def worker():
        results.append(cache.get_or_load(_key(), _builder(side, "threaded", delay=0.1), load))

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == ["threaded"] * 4 and len(loads) == 1 and _builds(side) == 1


def test_new_process_hits_disk(tmp_path):
    side = tmp_path / "side"
    side.mkdir()
    assert _finish(_child(side, "from process one")) == "from process one"
    assert _finish(_child(side, "from process two")) == "from process one"
    assert _builds(side) == 1
    # And this process finds the same entry without building.
    entry = cache.get_or_build(_key(), _builder(side, "never"))
    assert entry.read_text("kernel.py") == "from process one" and _builds(side) == 1


def test_two_processes_racing_build_once(tmp_path):
    side = tmp_path / "side"
    side.mkdir()
    go = tmp_path / "go"
    procs = [_child(side, f"payload {n}", str(go)) for n in range(2)]
    time.sleep(0.3)  # let both interpreters start and wait at the barrier
    go.touch()
    outputs = [_finish(p) for p in procs]
    assert _builds(side) == 1
    winner = next(side.glob("build-*")).name.removeprefix("build-")
    expected = f"payload {[str(p.pid) for p in procs].index(winner)}"
    assert outputs == [expected, expected]
    assert len(_entry_dirs()) == 1
    assert not list(cache.cache_root().glob(f"{cache.FORMAT}/.tmp/*"))  # no staging folders left behind


def test_build_failure_propagates_and_leaves_nothing(tmp_path):
    def failing(out: Path) -> None:
        (out / "kernel.py").write_text("half")
        raise RuntimeError("backend exploded")

    with pytest.raises(RuntimeError, match="backend exploded"):
        cache.get_or_build(_key(), failing)
    assert _entry_dirs() == [] and not list(cache.cache_root().glob(f"{cache.FORMAT}/.tmp/*"))
    side = tmp_path / "side"
    assert cache.get_or_build(_key(), _builder(side, "ok")).read_text("kernel.py") == "ok"


def test_build_must_write_files_and_not_the_manifest():
    with pytest.raises(ValueError, match="no files"):
        cache.get_or_build(_key(), lambda out: None)
    with pytest.raises(ValueError, match="must not write 'manifest.json'"):
        cache.get_or_build(_key(), lambda out: (out / "manifest.json").write_text("{}"))
    assert _entry_dirs() == []


# ---------------------------------------------------------------- corruption


def _truncate(entry):
    path = entry.file("kernel.py")
    path.write_bytes(path.read_bytes()[:5])


def _flip_same_size(entry):
    path = entry.file("kernel.py")
    data = path.read_bytes()
    path.write_bytes(bytes([data[0] ^ 1]) + data[1:])


CORRUPTIONS = {
    "truncated file": _truncate,
    "same size, other bytes": _flip_same_size,
    "deleted file": lambda e: e.file("sub/meta.json").unlink(),
    "garbled manifest": lambda e: (e.path / cache.MANIFEST).write_text('{"parts": {"ir": '),
    "manifest of wrong shape": lambda e: (e.path / cache.MANIFEST).write_text('[1, 2]'),
    "manifest missing": lambda e: (e.path / cache.MANIFEST).unlink(),
    "manifest for other parts": lambda e: (e.path / cache.MANIFEST).write_text(
        (e.path / cache.MANIFEST).read_text().replace("KernelPlan", "OtherPlan")),
}


@pytest.mark.parametrize("corrupt", CORRUPTIONS, ids=list(CORRUPTIONS))
def test_corrupt_entry_is_rebuilt(corrupt, tmp_path):
    side = tmp_path / "side"
    payload = "def kernel():\n    return 42\n"
    entry = cache.get_or_build(_key(), _builder(side, payload))
    neighbour = cache.get_or_build(_key(plan="other"), _builder(side, "neighbour"))
    CORRUPTIONS[corrupt](entry)
    cache.clear_memory()
    assert cache.explain_miss(_key()).startswith("miss ") and "corrupt" in cache.explain_miss(_key())
    rebuilt = cache.get_or_build(_key(), _builder(side, payload))
    assert _builds(side) == 3
    assert rebuilt.read_text("kernel.py") == payload and rebuilt.path == entry.path
    assert json.loads(rebuilt.read_text("sub/meta.json")) == {"payload_len": len(payload)}
    cache.clear_memory()  # the rebuilt entry verifies from disk, and the neighbour was untouched
    assert cache.get_or_build(_key(), _builder(side, "never")).read_text("kernel.py") == payload
    assert cache.get_or_build(_key(plan="other"), _builder(side, "never")).read_text("kernel.py") == "neighbour"
    assert _builds(side) == 3 and neighbour.path.is_dir() and len(_entry_dirs()) == 2


def test_leftover_staging_folder_of_a_killed_build_is_removed(tmp_path):
    stale = cache.cache_root() / cache.FORMAT / ".tmp" / f"{_key().digest}.dead.build"
    stale.mkdir(parents=True)
    (stale / "kernel.py").write_text("half")
    cache.get_or_build(_key(), _builder(tmp_path / "side", "fresh"))
    assert not stale.exists()


# ---------------------------------------------------------------- maintenance


def test_list_entries_and_clear(tmp_path):
    side = tmp_path / "side"
    cache.get_or_build(_key(), _builder(side, "one"))
    time.sleep(0.01)
    cache.get_or_build(_key(plan="p2", name="second"), _builder(side, "two two"))
    time.sleep(0.01)
    tvm_key = cache.CacheKey({"ir": IR, "backend": "tvm"})  # no name: shown as None

    def tvm_build(out: Path) -> None:
        (out / "kernel.so").write_bytes(os.urandom(300))

    cache.get_or_build(tvm_key, tvm_build)
    entries = cache.list_entries()
    assert [(e.backend, e.name) for e in entries] == [("tvm", None), ("triton", "second"), ("triton", "x")]
    assert entries[0].digest == tvm_key.digest and entries[0].created >= entries[1].created >= entries[2].created
    for e in entries:
        on_disk = sum(p.stat().st_size for p in e.path.rglob("*") if p.is_file())
        assert e.size == on_disk

    stale = cache.cache_root() / cache.FORMAT / ".tmp" / f"{_key().digest}.dead.build"
    stale.mkdir()
    assert cache.clear() == 3
    assert cache.list_entries() == [] and _entry_dirs() == [] and not stale.exists()
    before = _builds(side)
    assert cache.get_or_build(_key(), _builder(side, "again")).read_text("kernel.py") == "again"
    assert _builds(side) == before + 1


def test_entries_table_shows_every_entry(tmp_path):
    from rich.console import Console

    cache.get_or_build(_key(name="gemma2_local"), _builder(tmp_path / "side", "x" * 3000))
    console = Console(record=True, width=120)
    console.print(cache.entries_table(cache.list_entries()))
    text = console.export_text()
    (row,) = [line for line in text.splitlines() if _key(name="gemma2_local").digest[:12] in line]
    assert "triton" in row and "gemma2_local" in row
    assert f"{cache.list_entries()[0].size / 1024:.1f} KiB" in row
    assert str(cache.cache_root()) in text.replace("\n", "")


def test_cli_cache_ls_and_clear(tmp_path, capsys):
    from attnc.cli import main

    assert main(["cache", "ls"]) == 0
    assert f"no compiled kernels in {cache.cache_root()}" in capsys.readouterr().out
    cache.get_or_build(_key(), _builder(tmp_path / "side", "k"))
    cache.get_or_build(_key(plan="p2", name="other"), _builder(tmp_path / "side", "k"))
    assert main(["cache", "ls"]) == 0
    listing = capsys.readouterr().out
    assert _key().digest[:12] in listing and _key(plan="p2", name="other").digest[:12] in listing
    assert " other " in listing and " x " in listing
    assert main(["cache", "clear"]) == 0
    assert f"removed 2 kernel(s) from {cache.cache_root()}" in capsys.readouterr().out
    assert cache.list_entries() == []
    assert main(["cache", "frobnicate"]) == 2


def test_cache_root_follows_env(tmp_path, monkeypatch):
    assert cache.cache_root() == Path(os.environ["ATTNC_CACHE_DIR"])
    monkeypatch.setenv("ATTNC_CACHE_DIR", str(tmp_path / "elsewhere"))
    assert cache.cache_root() == tmp_path / "elsewhere"
    entry = cache.get_or_build(_key(), _builder(tmp_path / "side", "k"))
    assert entry.path == tmp_path / "elsewhere" / cache.FORMAT / "triton" / _key().digest[:2] / _key().digest


def _under_a_file(tmp_path: Path) -> Path:
    (tmp_path / "a-file").write_text("not a folder")
    return tmp_path / "a-file" / "cache"


def _read_only(tmp_path: Path) -> Path:
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o500)
    return folder


@pytest.mark.parametrize("make_dir", [
    _under_a_file,
    pytest.param(_read_only, marks=pytest.mark.skipif(
        hasattr(os, "geteuid") and os.geteuid() == 0, reason="root can write into a read-only folder")),
])
def test_unwritable_cache_dir_falls_back_with_warning(make_dir, tmp_path, monkeypatch):
    configured = make_dir(tmp_path)
    monkeypatch.setenv("ATTNC_CACHE_DIR", str(configured))
    side = tmp_path / "side"
    with pytest.warns(cache.CacheWarning, match="cannot be used"):
        entry = cache.get_or_build(_key(), _builder(side, "fallback"))
    assert entry.read_text("kernel.py") == "fallback"
    assert not entry.path.is_relative_to(configured) and entry.path.is_relative_to(cache.cache_root())
    cache.clear_memory()
    assert cache.get_or_build(_key(), _builder(side, "never")).read_text("kernel.py") == "fallback"
    assert _builds(side) == 1


# ---------------------------------------------------------------- debug logging


@pytest.fixture
def cache_debug(monkeypatch, caplog):
    monkeypatch.setenv(cache.DEBUG_ENV, "1")
    caplog.set_level(logging.DEBUG, logger="attnc.cache")
    yield caplog
    logger = logging.getLogger("attnc.cache")
    logger.removeHandler(cache._DEBUG_HANDLER)
    logger.setLevel(logging.NOTSET)


def test_debug_logs_hits_misses_rebuilds_with_changed_part(cache_debug, tmp_path, capsys):
    side = tmp_path / "side"
    cache.get_or_build(_key(), _builder(side, "kernel one"))
    cache.get_or_build(_key(plan="KernelPlan(BLOCK_M=128)"), _builder(side, "kernel two"))
    miss = [r.getMessage() for r in cache_debug.records if r.getMessage().startswith("miss ")]
    assert len(miss) == 2
    assert "no entries yet" in miss[0]
    assert "1 part(s) changed" in miss[1] and "\n  plan: " in miss[1] and "BLOCK_M=128" in miss[1]

    cache.clear_memory()
    cache_debug.clear()
    cache.get_or_build(_key(), _builder(side, "never"))
    assert [r.getMessage() for r in cache_debug.records] == [f"hit triton {_key().digest[:12]} (x) (disk, verified)"]

    cache.clear_memory()
    cache_debug.clear()
    _truncate(cache.get_or_build(_key(), _builder(side, "never")))
    cache.clear_memory()
    assert cache.get_or_build(_key(), _builder(side, "kernel one")).read_text("kernel.py") == "kernel one"
    (message,) = [r.getMessage() for r in cache_debug.records if r.getMessage().startswith("rebuild ")]
    assert "'kernel.py' has 5 bytes, the manifest says 10" in message
    assert "attnc.cache: rebuild triton" in capsys.readouterr().err  # ATTNC_CACHE_DEBUG prints to stderr


# ---------------------------------------------------------------- trust: permissions, owners, the secret


def _modes(folder: Path) -> dict[str, int]:
    return {p.relative_to(folder).as_posix(): p.stat().st_mode & 0o777 for p in [folder, *folder.rglob("*")]}


def test_made_private_whatever_the_umask(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNC_CACHE_DIR", str(tmp_path / "made" / "cache"))
    monkeypatch.setenv(cache.SECRET_ENV, str(tmp_path / "keys" / "secret"))
    old = os.umask(0)
    try:
        cache.get_or_build(_key(), _builder(tmp_path / "side", "kernel"))
    finally:
        os.umask(old)
    modes = _modes(tmp_path / "made")
    folders = {name for name in modes if (tmp_path / "made" / name).is_dir()}
    assert {"cache", f"cache/{cache.FORMAT}/.locks", f"cache/{cache.FORMAT}/.tmp"} <= folders
    assert {name: modes[name] for name in folders} == {name: 0o700 for name in folders}
    files = {name: mode for name, mode in modes.items() if name not in folders}
    assert any(name.endswith("/kernel.py") for name in files) and any(name.endswith("/sub/meta.json") for name in files)
    assert all(name.endswith(".lock") or mode & 0o077 == 0 for name, mode in files.items()), files
    assert _modes(tmp_path / "keys") == {".": 0o700, "secret": 0o600}


PLANTED = "open({marker!r}, 'w').write('executed')\n"


def _run_entry(entry: cache.Entry) -> dict:
    """What a backend's load does with a kernel.py: execute it."""
    scope: dict = {}
    exec(compile(entry.read_text("kernel.py"), str(entry.file("kernel.py")), "exec"), scope)
    return scope


def _rewrite_manifest(entry: cache.Entry, **changes) -> None:
    """The manifest an attacker writes for planted files: right sizes and hashes, and `changes`."""
    manifest = json.loads((entry.path / cache.MANIFEST).read_text())
    for name in manifest["files"]:
        data = (entry.path / name).read_bytes()
        manifest["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    manifest.update(changes)
    (entry.path / cache.MANIFEST).write_text(json.dumps(manifest))


def _forged_mac(entry: cache.Entry) -> str:
    records = tuple(cache.FileRecord(r.name, hashlib.sha256((entry.path / r.name).read_bytes()).hexdigest(),
                                     (entry.path / r.name).stat().st_size) for r in entry.files)
    return cache._mac(b"a guess at the secret".ljust(32, b"!"), entry.key.digest, records)


def _plant_with_manifest(entry: cache.Entry, marker: Path) -> None:
    entry.file("kernel.py").write_text(PLANTED.format(marker=str(marker)))
    _rewrite_manifest(entry)


def _plant_with_forged_mac(entry: cache.Entry, marker: Path) -> None:
    entry.file("kernel.py").write_text(PLANTED.format(marker=str(marker)))
    _rewrite_manifest(entry, mac=_forged_mac(entry))


def _plant_other_key_entry(entry: cache.Entry, marker: Path) -> None:
    """A valid entry of another key (built by attnc, with its own manifest) moved into this key's place."""
    other = cache.get_or_build(_key(plan="another plan"), lambda out: (out / "kernel.py").write_text(
        PLANTED.format(marker=str(marker))))
    shutil.rmtree(entry.path)
    shutil.copytree(other.path, entry.path)


def _plant_other_key_files(entry: cache.Entry, marker: Path) -> None:
    """Another key's valid kernel swapped in, with this entry's manifest rewritten to its hashes."""
    other = cache.get_or_build(_key(plan="another plan"), lambda out: (out / "kernel.py").write_text(
        PLANTED.format(marker=str(marker))))
    shutil.copyfile(other.file("kernel.py"), entry.file("kernel.py"))
    _rewrite_manifest(entry, mac=json.loads((other.path / cache.MANIFEST).read_text())["mac"])


def _plant_extra_file(entry: cache.Entry, marker: Path) -> None:
    (entry.path / "sitecustomize.py").write_text(PLANTED.format(marker=str(marker)))


PLANTS = {"rewritten manifest": _plant_with_manifest, "forged MAC": _plant_with_forged_mac,
          "another key's entry": _plant_other_key_entry, "another key's kernel": _plant_other_key_files,
          "unlisted file": _plant_extra_file}


@pytest.mark.parametrize("plant", PLANTS, ids=list(PLANTS))
def test_a_planted_kernel_is_never_executed(plant, tmp_path):
    side, marker = tmp_path / "side", tmp_path / "marker"
    payload = "ANSWER = 42\n"
    entry = cache.get_or_load(_key(), _builder(side, payload), _run_entry)
    assert entry["ANSWER"] == 42
    PLANTS[plant](cache.get_or_build(_key(), _builder(side, "never")), marker)
    cache.clear_memory()  # a new process
    assert "corrupt" in cache.explain_miss(_key())
    scope = cache.get_or_load(_key(), _builder(side, payload), _run_entry)
    assert scope["ANSWER"] == 42 and not marker.exists()
    assert _builds(side) == 2  # rebuilt, and the rebuilt entry verifies from disk
    cache.clear_memory()
    assert cache.get_or_load(_key(), _builder(side, "never"), _run_entry)["ANSWER"] == 42 and _builds(side) == 2


def _fake_owner(monkeypatch, inode: int, uid: int = 12345) -> None:
    """os.lstat / os.stat report `uid` as the owner of the file with `inode` (tests run as root: chown proves
    nothing there)."""
    for name in ("lstat", "stat"):
        real = getattr(os, name)

        def fake(path, *args, _real=real, **kwargs):
            st = _real(path, *args, **kwargs)
            if st.st_ino != inode:
                return st
            fields = list(st[:10])
            fields[4] = uid
            return os.stat_result(fields)

        monkeypatch.setattr(os, name, fake)


UNSAFE = {
    "group-writable entry": (lambda e, mp: e.path.chmod(0o770), "writable by group (mode 0770)"),
    "world-writable file": (lambda e, mp: e.file("kernel.py").chmod(0o606), "writable by others (mode 0606)"),
    "entry of another user": (lambda e, mp: _fake_owner(mp, e.path.stat().st_ino), "is owned by uid 12345"),
    "file of another user": (lambda e, mp: _fake_owner(mp, e.file("kernel.py").stat().st_ino),
                             "is owned by uid 12345"),
}


@pytest.mark.parametrize("unsafe", UNSAFE, ids=list(UNSAFE))
def test_an_unsafe_entry_is_refused_with_a_warning_and_rebuilt(unsafe, tmp_path, monkeypatch):
    side = tmp_path / "side"
    entry = cache.get_or_build(_key(), _builder(side, "ANSWER = 42\n"))
    make_unsafe, message = UNSAFE[unsafe]
    make_unsafe(entry, monkeypatch)
    cache.clear_memory()
    with pytest.raises(cache.CacheError, match=re.escape(message)):
        cache.check_private(entry.path) if "entry" in unsafe else cache.check_private(entry.file("kernel.py"))
    refused = f"refused to load {re.escape(str(entry.path))}: .*{re.escape(message)}"
    with pytest.warns(cache.CacheWarning, match=refused):
        rebuilt = cache.get_or_build(_key(), _builder(side, "ANSWER = 42\n"))
    assert _builds(side) == 2 and rebuilt.read_text("kernel.py") == "ANSWER = 42\n"
    assert _modes(rebuilt.path) == {".": 0o700, "kernel.py": 0o600, "manifest.json": 0o600, "sub": 0o700,
                                    "sub/meta.json": 0o600}


def _group_writable_root(root: Path, monkeypatch) -> str:
    root.mkdir(mode=0o700)
    root.chmod(0o775)
    return "writable by group (mode 0775)"


def _root_of_another_user(root: Path, monkeypatch) -> str:
    root.mkdir(mode=0o700)
    _fake_owner(monkeypatch, root.stat().st_ino, uid=4242)
    return "is owned by uid 4242"


def _secret_others_can_read(root: Path, monkeypatch) -> str:
    secret = root.parent / "readable-secret"
    secret.write_text("ab" * 32)
    secret.chmod(0o644)
    monkeypatch.setenv(cache.SECRET_ENV, str(secret))
    return "readable or writable by group and others (mode 0644)"


def _garbled_secret(root: Path, monkeypatch) -> str:
    secret = root.parent / "short-secret"
    secret.write_text("abcd")
    secret.chmod(0o600)
    monkeypatch.setenv(cache.SECRET_ENV, str(secret))
    return "does not hold a cache secret"


@pytest.mark.parametrize("make_unsafe", [_group_writable_root, _root_of_another_user, _secret_others_can_read,
                                         _garbled_secret])
def test_an_unsafe_root_or_secret_falls_back_to_a_private_cache(make_unsafe, tmp_path, monkeypatch):
    root = tmp_path / "shared"
    message = make_unsafe(root, monkeypatch)
    monkeypatch.setenv("ATTNC_CACHE_DIR", str(root))
    side = tmp_path / "side"
    with pytest.warns(cache.CacheWarning, match=f"attnc kernel cache {re.escape(str(root))} cannot be used "
                                                f"\\(.*{re.escape(message)}"):
        entry = cache.get_or_build(_key(), _builder(side, "fallback"))
    assert not entry.path.is_relative_to(root) and entry.read_text("kernel.py") == "fallback"
    fallback = cache.cache_root()
    assert fallback != root and fallback.stat().st_mode & 0o777 == 0o700
    assert not list(root.rglob("kernel.py")) if root.exists() else True


def test_clear_reports_what_it_cannot_remove(tmp_path, monkeypatch, capsys):
    from attnc.cli import main

    side = tmp_path / "side"
    stuck = cache.get_or_build(_key(), _builder(side, "one"))
    cache.get_or_build(_key(plan="p2"), _builder(side, "two"))
    real_replace = os.replace

    def replace(src, dst, *args, **kwargs):
        if Path(src) == stuck.path:
            raise PermissionError(13, "Permission denied", str(src))
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)
    assert main(["cache", "clear"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"removed 1 kernel(s) from {cache.cache_root()}, but 1 folder(s) could not be removed")
    assert f"{stuck.path} (PermissionError: Permission denied)" in err and "Traceback" not in err
    assert [e.path for e in cache.list_entries()] == [stuck.path]
    monkeypatch.setattr(os, "replace", real_replace)
    assert cache.clear() == 1 and cache.list_entries() == []
