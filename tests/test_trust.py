"""What attnc runs: a planted kernel.py or kernel.so in the kernel cache, with its manifest rewritten to match,
is never executed (the entry is rebuilt); AOT folders carry no pickle, and their spec text must give the key they
record before anything is loaded; no module of attnc imports pickle."""
import ast
import hashlib
import json
import math
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import attnc
from attnc.backends import cache
from attnc.backends.triton import launch

ROOT = Path(__file__).resolve().parent.parent
SPEC = """
attention planted {
    q: f32[B, H, M, D]  k: f32[B, H, N, D]  v: f32[B, H, N, D]
    mask causal
    return softmax(score) @ v, lse
}
"""
MARKER_PY = "open({marker!r}, 'w').write('executed')\n"
MARKER_C = """
#include <stdio.h>
__attribute__((constructor)) static void planted(void) {{
    FILE *f = fopen("{marker}", "w");
    if (f) {{ fputs("executed", f); fclose(f); }}
}}
"""


def _inputs(m=9, n=13, d=16):
    torch.manual_seed(0)
    return torch.randn(1, 2, m, d), torch.randn(1, 2, n, d), torch.randn(1, 2, n, d)


def _check(spec, result, q, k, v):
    (out, lse), (want, want_lse) = result, attnc.reference(spec, q, k, v)
    assert not out.isnan().any() and (out.double() - want).abs().max() < 1e-5
    assert (lse.double() - want_lse).abs().max() < 1e-5


def _rewrite_manifest(entry_dir: Path) -> None:
    """What an attacker who can write the entry does after planting: every size and SHA-256 made to match."""
    manifest = json.loads((entry_dir / cache.MANIFEST).read_text())
    for name in manifest["files"]:
        data = (entry_dir / name).read_bytes()
        manifest["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    (entry_dir / cache.MANIFEST).write_text(json.dumps(manifest))


def _planted_library(tmp_path: Path, marker: Path) -> Path:
    source = tmp_path / "planted.c"
    source.write_text(MARKER_C.format(marker=marker))
    library = tmp_path / "planted.so"
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(library), str(source)], check=True, capture_output=True)
    return library


def _load_library(path: Path) -> None:
    import ctypes

    ctypes.CDLL(str(path))


def test_a_planted_triton_kernel_is_not_executed(tmp_path):
    spec = attnc.parse(SPEC)[0]
    q, k, v = _inputs()
    with launch.poisoned_outputs():
        _check(spec, attnc.compile(spec, backend="triton")(q, k, v), q, k, v)
    marker = tmp_path / "marker"
    planted = tmp_path / "planted.py"
    planted.write_text(MARKER_PY.format(marker=str(marker)))
    launch.import_source(planted, "attnc_test_planted")  # the control: this file runs when imported
    assert marker.read_text() == "executed"
    marker.unlink()
    entries = cache.list_entries()  # the prefill kernel, and the decode kernel this M takes
    for entry in entries:
        (source,) = entry.path.glob("*.py")
        shutil.copyfile(planted, source)
        _rewrite_manifest(entry.path)
    cache.clear_memory()  # a new process
    with launch.poisoned_outputs():
        _check(spec, attnc.compile(spec, backend="triton")(q, k, v), q, k, v)
    assert not marker.exists()
    assert all("def attn_" in next(e.path.glob("*.py")).read_text() for e in entries)  # rebuilt in place


@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc to build the planted library")
def test_a_planted_tvm_library_is_not_loaded(tmp_path):
    pytest.importorskip("tvm")
    from attnc.backends.tvm import backend as tvm_backend, launch as tvm_launch

    spec = attnc.parse(SPEC)[0]
    q, k, v = _inputs()
    nan = lambda shape, dtype, device: torch.full(shape, math.nan, dtype=dtype, device=device)  # noqa: E731
    tvm_launch.empty, plain = nan, tvm_launch.empty
    try:
        _check(spec, attnc.compile(spec, backend="tvm")(q, k, v), q, k, v)
        (entry,) = cache.list_entries()
        marker = tmp_path / "marker"
        library = _planted_library(tmp_path, marker)
        _load_library(library)  # the control: this library runs code when loaded
        assert marker.read_text() == "executed"
        marker.unlink()
        (entry.path / tvm_backend.LIBRARY_FILE).unlink()  # a new file: this process still maps the old one
        shutil.copyfile(library, entry.path / tvm_backend.LIBRARY_FILE)
        _rewrite_manifest(entry.path)
        cache.clear_memory()
        _check(spec, attnc.compile(spec, backend="tvm")(q, k, v), q, k, v)
    finally:
        tvm_launch.empty = plain
    assert not marker.exists()


# ---------------------------------------------------------------- TVM AOT folders


@pytest.fixture(scope="module")
def built_artifact(tmp_path_factory):
    pytest.importorskip("tvm")
    from attnc.backends.tvm import aot

    return aot.build(attnc.parse(SPEC)[0], tmp_path_factory.mktemp("aot") / "art", target="llvm", head_dim=16)


@pytest.fixture
def tvm_artifact(built_artifact, tmp_path):
    """A copy of the built artifact, for a test to change."""
    return Path(shutil.copytree(built_artifact, tmp_path / "art"))


def test_a_tvm_artifact_holds_spec_text_and_plan_and_round_trips(tvm_artifact):
    from attnc.backends.tvm import aot

    manifest = json.loads((tvm_artifact / aot.MANIFEST).read_text())
    assert sorted(p.name for p in tvm_artifact.iterdir()) == [aot.LIBRARY, aot.MANIFEST]  # no pickled spec
    spec = attnc.parse(manifest["canonical"])[0]
    assert spec.key == manifest["key"] and manifest["plan"].startswith("KernelPlan(")
    kernel = attnc.load(tvm_artifact, name="planted")
    for m, n in ((1, 20), (30, 30)):  # the decode and prefill functions
        q, k, v = _inputs(m, n)
        _check(kernel.spec, kernel(q, k, v), q, k, v)


def _other_math(manifest: dict) -> None:
    assert "f32[" in manifest["canonical"]
    manifest["canonical"] = manifest["canonical"].replace("f32[", "f16[")


def _other_plan(manifest: dict) -> None:
    manifest["plan"] = manifest["plan"].replace("KernelPlan(", "KernelPlan( ")


def _file_outside(manifest: dict) -> None:
    manifest["files"] = {"../art/kernel.so": manifest["files"]["kernel.so"]}


REFUSED = {
    "spec text of other math": (_other_math, "its spec text does not give the key it records"),
    "a plan this attnc does not make": (_other_plan, "plans attention 'planted' differently"),
    "a file outside the folder": (_file_outside, "a file outside the artifact"),
}


@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc to build the planted library")
@pytest.mark.parametrize("change", REFUSED, ids=list(REFUSED))
def test_a_tvm_artifact_is_checked_before_its_library_loads(change, tvm_artifact, tmp_path):
    from attnc.backends.tvm import aot

    marker = tmp_path / "marker"
    shutil.copyfile(_planted_library(tmp_path, marker), tvm_artifact / aot.LIBRARY)
    manifest = json.loads((tvm_artifact / aot.MANIFEST).read_text())
    data = (tvm_artifact / aot.LIBRARY).read_bytes()
    manifest["files"][aot.LIBRARY] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    edit, message = REFUSED[change]
    edit(manifest)
    (tvm_artifact / aot.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(attnc.CacheError, match=message):
        attnc.load(tvm_artifact)
    assert not marker.exists()


@pytest.mark.parametrize("loose", ["library", "folder", "manifest"])
def test_a_tvm_artifact_others_can_change_is_refused(loose, tvm_artifact):
    from attnc.backends.tvm import aot

    path = {"library": tvm_artifact / aot.LIBRARY, "folder": tvm_artifact,
            "manifest": tvm_artifact / aot.MANIFEST}[loose]
    path.chmod(path.stat().st_mode | 0o020)
    with pytest.raises(attnc.CacheError, match=f"{path} is writable by group"):
        attnc.load(tvm_artifact)
    path.chmod(path.stat().st_mode & ~0o020)
    assert attnc.load(tvm_artifact, name="planted").spec.name == "planted"


# ---------------------------------------------------------------- no pickle


UNSAFE_MODULES = {"pickle", "_pickle", "cPickle", "cloudpickle", "dill", "marshal", "shelve", "joblib"}


def test_no_module_of_attnc_unpickles():
    """pickle (and its kin, and torch.load, which unpickles) runs code from the data it reads."""
    found = []
    for path in sorted((ROOT / "attnc").rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            found += [f"{path.relative_to(ROOT)}:{node.lineno} imports {n}" for n in names
                      if n.split(".")[0] in UNSAFE_MODULES]
            if isinstance(node, ast.Attribute) and node.attr == "load" and isinstance(node.value, ast.Name) \
                    and node.value.id in ("torch", *UNSAFE_MODULES):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} calls {node.value.id}.load")
    assert found == []
    assert not any(p.suffix in (".pkl", ".pickle") for p in (ROOT / "attnc").rglob("*"))
