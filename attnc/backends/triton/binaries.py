"""Triton's compiled kernels kept in attnc's cache, so that a new process launches a kernel compiled before without
Triton's JIT. The JIT's first compile in a process hashes Triton's own library to key Triton's cache (0.35 s of
the 0.6 s warm start on the H100, benchmarks/NOTES.md session 8) before it finds the kernel there.

`launch(fn, grid, args, keywords)` stands for `fn[grid](*args, **keywords)`. Its cache key is the generated
module's text, the kernel's name, the keywords (constexprs and options), Triton's version, the GPU's compute
capability, the TRITON_* environment, and per argument what Triton's JIT specializes on, never coarser: a
tensor's dtype and 16-byte alignment, an integer's width (i32, i64, u64), whether it is 1 and whether 16 divides
it, a float, a bool's value, None. Equal keys thus mean the binary Triton's JIT would make. On a miss,
`fn.warmup` compiles without launching and the cubin, Triton's metadata and the compiled signature go into a
cache entry; every launch, the first included, runs the binary rebuilt from that entry (a CompiledKernel, as
attnc.load does for AOT builds). The cache verifies the entry (ownership, MAC) before anything in it is loaded.

Arguments it cannot key (a host-side tensor descriptor), keywords that are not plain values, the interpreter and
kernels that are not JIT functions (the AOT stand-ins) take Triton's own launch.

A launcher with a kernel of its own to run meanwhile (the Gluon prefill's: the template; the Gluon MLA decode's: the
Triton decode kernel) asks `compiling(...)` first. A binary neither loaded nor in the cache then compiles in one
background thread, and the launcher runs the other kernel until it is built: a new variant's first call waits for
the template's compile (~0.35 s on the H100's host) instead of the Gluon kernel's (~2 s; benchmarks/NOTES.md,
session 18). Triton compiles in threads itself (triton.AsyncCompileMode). `finish_compiles()` waits for the
background compiles; ATTNC_BACKGROUND_COMPILE=0, torch.use_deterministic_algorithms(True) and a deterministic Kernel
(backends.compiles_first: a run must give the bits of the next, cold cache or warm) compile before the launch. A
CUDA graph captured while a compile runs replays the fallback for good (loading the new kernel's module inside the
capture could fail it): warm up, then `finish_compiles()`, then capture. At exit the interpreter waits for a compile
in flight, whose binary the cache then holds for the next process.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path
from typing import Mapping, Sequence

import torch

from .. import cache, launches_compile_first
from ...errors import CacheError
from .saved import compiled_kernel, source_class

BINARY, METADATA, RECORD = "kernel.cubin", "kernel.json", "record.json"
_I32, _I64, _U64 = 2**31, 2**63, 2**64
# TRITON_* variables that do not change what Triton compiles (the rest are key parts)
_NOT_COMPILE_ENV = {"TRITON_CACHE_DIR", "TRITON_HOME", "TRITON_DUMP_DIR", "TRITON_OVERRIDE_DIR", "TRITON_INTERPRET",
                    "TRITON_PRINT_AUTOTUNING", "TRITON_CACHE_MANAGER"}
_PLAIN = (bool, int, float, str, type(None))
_loaded: dict[tuple, object] = {}  # (fn, keywords, specialization, device) -> CompiledKernel
_sources: dict[str, str] = {}  # generated module file -> SHA-256 of its text
BACKGROUND_ENV = "ATTNC_BACKGROUND_COMPILE"
_background: dict[tuple, Future] = {}  # launch memo (as _loaded's) -> its compile in the background thread


def launch(fn, grid: Sequence[int], args: Sequence, keywords: Mapping):
    """`fn[grid](*args, **keywords)` through the cached binary where there is one (see the module's doc); returns
    the CompiledKernel (None in the interpreter)."""
    compiled = binary(fn, grid, args, keywords)
    if compiled is None:
        return fn[grid](*args, **keywords)
    # A CompiledKernel takes a 3-D grid and every argument, constexprs included (its launcher skips those).
    compiled[(*grid, 1, 1)[:3]](*args, *(keywords[name] for name in fn.arg_names[len(args):]))
    return compiled


def binary(fn, grid: Sequence[int], args: Sequence, keywords: Mapping):
    """The cached CompiledKernel for this launch, compiled (not launched) and stored on a miss; None where the
    launch is not one this cache keys."""
    memo = _memo(fn, args, keywords)
    if memo is None:
        return None
    compiled = _loaded.get(memo)
    if compiled is None:
        compiled = _loaded[memo] = _from_cache(fn, grid, args, keywords, memo[1], memo[2])
    return compiled


def _memo(fn, args: Sequence, keywords: Mapping) -> tuple | None:
    """The launch's key in this process (fn, keywords, specialization, device), or None where this cache does not
    key it: the interpreter's InterpretedFunctions, arguments or keywords Triton specializes on otherwise."""
    from triton.runtime.jit import JITFunction

    if not isinstance(fn, JITFunction):
        return None
    arguments = specialization(args)
    launch_keywords = tuple(keywords.items())
    if arguments is None or not all(isinstance(v, _PLAIN) for _, v in launch_keywords):
        return None
    return fn, launch_keywords, arguments, torch.cuda.current_device()


def compiles_in_background() -> bool:
    """Whether launchers that can run another kernel meanwhile leave a compile to the background thread."""
    return os.environ.get(BACKGROUND_ENV, "1") not in ("", "0") and not torch.are_deterministic_algorithms_enabled() \
        and not launches_compile_first()


def compiling(fn, grid: Sequence[int], args: Sequence, keywords: Mapping) -> bool:
    """True while the launch's binary compiles in the background thread (started here where it is neither loaded
    nor in the cache), or where that compile failed (warned once): the caller runs another kernel instead. False
    where `launch` runs it without compiling, or compiles it itself: background compiles are off
    (compiles_in_background), or the launch is one this cache does not key."""
    memo = _memo(fn, args, keywords) if compiles_in_background() else None
    if memo is None or memo in _loaded:
        return False
    future = _background.get(memo)
    if future is None:
        entry = cache.get(cache_key(fn, memo[1], memo[2]))
        if entry is not None:
            _loaded[memo] = _load(fn, entry)
            return False
        _background[memo] = _compile_thread().submit(_compile_on, memo[3], fn, grid, args, keywords, memo[1], memo[2])
        return True
    if not future.done():
        return True
    error = future.exception()
    if error is None:
        _loaded[memo] = future.result()
        del _background[memo]
        return False
    if not getattr(future, "warned", False):
        future.warned = True
        warnings.warn(f"attnc: kernel {fn.__name__} failed to compile in the background ({type(error).__name__}: "
                      f"{str(error).strip()[:300]}); its fallback runs instead", RuntimeWarning, stacklevel=3)
    return True


@lru_cache(maxsize=None)
def _compile_thread() -> ThreadPoolExecutor:
    """The one background thread, made on first use."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="attnc-compile")


def _compile_on(device: int, fn, grid, args, keywords, launch_keywords, arguments):
    with torch.cuda.device(device):  # the JIT compiles for the current device, which is per thread
        return _from_cache(fn, grid, args, keywords, launch_keywords, arguments)


def finish_compiles() -> bool:
    """Wait until every kernel compiling in the background is built (or failed: warned at its launcher's next call);
    True where one was built, so that a later call launches a kernel an earlier one did not. For timing a kernel,
    or for the results of the kernel that runs from then on."""
    built = False
    for future in list(_background.values()):
        built |= future.exception() is None  # waits
    return built


def specialization(args: Sequence) -> tuple | None:
    """Per argument, what Triton's JIT specializes on or finer; None where an argument is not one of these."""
    out = []
    for a in args:
        if isinstance(a, torch.Tensor):
            out.append(("t", str(a.dtype), a.data_ptr() % 16 == 0))
        elif isinstance(a, bool):  # before int: a bool is an int
            out.append(("b", a))
        elif isinstance(a, int):
            width = "i32" if -_I32 <= a < _I32 else "i64" if -_I64 <= a < _I64 else "u64" if 0 <= a < _U64 else None
            if width is None:
                return None
            out.append(("i", width, a == 1, a % 16 == 0))
        elif isinstance(a, float):
            out.append(("f",))
        elif a is None:
            out.append(("n",))
        else:
            return None
    return tuple(out)


def cache_key(fn, launch_keywords: tuple, arguments: tuple) -> cache.CacheKey:
    import triton

    major, minor = torch.cuda.get_device_capability()
    environment = {k: v for k, v in sorted(os.environ.items()) if k.startswith("TRITON_") and k not in _NOT_COMPILE_ENV}
    return cache.CacheKey({
        "backend": "triton-binary", "backend_version": triton.__version__, "device": f"cuda:sm_{major}{minor}",
        "source": _source_digest(fn.fn.__code__.co_filename), "kernel": fn.__name__,
        "launch": json.dumps(launch_keywords), "arguments": json.dumps(arguments),
        "environment": json.dumps(environment),
    }, name=fn.__name__)


def _source_digest(path: str) -> str:
    digest = _sources.get(path)
    if digest is None:
        digest = _sources[path] = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    return digest


def _from_cache(fn, grid, args, keywords, launch_keywords, arguments):
    def build(out_dir: Path) -> None:
        compiled = fn.warmup(*args, grid=grid, **keywords)
        src = compiled.src
        (out_dir / BINARY).write_bytes(compiled.asm["cubin"])
        shutil.copyfile(compiled.metadata_group[f"{compiled.name}.json"], out_dir / METADATA)
        record = {"source": type(src).__name__, "signature": dict(src.signature), "hash": compiled.hash,
                  "name": compiled.name, "constants": [[list(k), v] for k, v in src.constants.items()],
                  "attrs": [[list(k), v] for k, v in src.attrs.items()]}
        (out_dir / RECORD).write_text(json.dumps(record), encoding="utf-8")

    # an entry, not a loaded object, from the cache: a CompiledKernel loads its module on one device
    return _load(fn, cache.get_or_build(cache_key(fn, launch_keywords, arguments), build))


def _load(fn, entry: cache.Entry):
    record = json.loads(entry.read_text(RECORD))
    if record["source"] not in ("ASTSource", "GluonASTSource"):
        raise CacheError(f"a cached Triton binary names an unknown source kind {record['source']!r}; clear it "
                         f"with `attnc cache clear`")
    src = source_class(record["source"] == "GluonASTSource")(
        fn, record["signature"], {tuple(k): v for k, v in record["constants"]},
        {tuple(k): v for k, v in record["attrs"]})
    return compiled_kernel(src, record["name"], entry.file(METADATA), entry.file(BINARY), record["hash"])
