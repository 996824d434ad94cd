"""Ahead-of-time kernels: `attnc compile ... --arch sm_XX -o DIR` without a GPU writes sources, cubins for that arch
and a manifest; `attnc.load(DIR)` refuses a changed file, another Triton or attnc version, a garbled manifest, and
(on the GPU, `-m gpu`) runs the saved cubins against attnc.reference without compiling anything."""
import hashlib
import json
import os
import re
import shutil
import struct
import warnings
from pathlib import Path

import pytest
import torch
import triton

import attnc
from attnc import cli
from attnc.backends.triton.decode import generate_decode
from attnc.backends.triton.generate import generate
from attnc.passes import Target, plan_kernel
from attnc.backends.triton import aot

SPECS = """\
attention small_causal {
    q: f16[B, H, M, D]
    k: f16[B, H, N, D]
    v: f16[B, H, N, D]
    mask causal
    return softmax(score) @ v, lse
}

attention small_window {
    q: f16[B, M, H, D]  k: f16[B, N, H, D]  v: f16[B, N, H, D]
    param window: i32 = 8
    mask causal
    mask i + (N - M) - j < window
    return softmax(score) @ v
}
"""


def compile_cli(*args: str) -> int:
    return cli.main(["compile", *map(str, args)])


@pytest.fixture(scope="module")
def spec_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("specs") / "small.attn"
    path.write_text(SPECS)
    return path


@pytest.fixture(scope="module")
def sm90(spec_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("aot") / "sm90"
    assert compile_cli(spec_file, "--arch", "sm_90a", "-o", out, "--dims", "D=32") == 0
    return out


@pytest.fixture(scope="module")
def sm80(spec_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("aot") / "sm80"
    assert compile_cli(spec_file, "--name", "small_causal", "--arch", "sm_80", "-o", out, "--dims", "D=32") == 0
    return out


def manifest_of(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def cubin_sm(data: bytes) -> int:
    """The SM version a CUDA ELF was built for: in e_flags, bits 0-7 in ELF ABI version 7 (sm_80 cubins of current
    ptxas), bits 8-15 in version 8 (sm_90 and newer)."""
    assert data[:4] == b"\x7fELF" and data[4] == 2  # 64-bit ELF
    flags = struct.unpack_from("<I", data, 48)[0]
    return (flags >> 8) & 0xFF if data[8] >= 8 else flags & 0xFF


@pytest.mark.parametrize("which, capability, names", [("sm90", 90, ["small_causal", "small_window"]),
                                                      ("sm80", 80, ["small_causal"])])
def test_compile_writes_sources_cubins_and_manifest(request, spec_file, which, capability, names):
    folder = request.getfixturevalue(which)
    m = manifest_of(folder)
    arch = f"sm_{capability}{'a' if capability >= 90 else ''}"
    assert (m["format"], m["attnc"], m["triton"], m["arch"], m["capability"]) == (
        aot.FORMAT, attnc.__version__, triton.__version__, arch, capability)
    assert f"--arch {'sm_90a' if capability == 90 else 'sm_80'}" in m["command"] and str(folder) in m["command"]
    # every file is listed with its hash, and nothing else is in the folder
    on_disk = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()} - {"manifest.json"}
    assert set(m["files"]) == on_disk
    for name, rec in m["files"].items():
        data = (folder / name).read_bytes()
        assert rec == {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    specs = {s.name: s for s in attnc.parse_file(spec_file)}
    assert [a["name"] for a in m["attentions"]] == names
    for a in m["attentions"]:
        spec = specs[a["name"]]
        assert a["key"] == spec.key and attnc.parse(a["canonical"])[0].key == spec.key
        (build,) = a["builds"]
        assert (build["head_dim"], build["value_dim"]) == (32, 32)
        plan = plan_kernel(spec, Target("triton", "cuda", capability), 32, 32)
        assert build["plan"] == repr(plan)
        generators = {"prefill": generate, "decode": generate_decode}
        assert build["sources"].keys() == {k.module for k in plan.kernels}
        for module, path in build["sources"].items():
            assert (folder / path).read_text() == generators[module](plan)
        built = []
        for k in build["kernels"]:
            launch = dict(k["launch"])
            built.append((k["kernel"], tuple(map(tuple, k["launch"])), k["layout"]))
            assert (k["num_warps"], k["num_stages"]) == (launch["num_warps"], launch.get("num_stages", 3))
            assert k["shared"] >= 0 and launch.get("UPCAST", False) is False
            assert all(k["signature"][n] == "constexpr" and k["constexprs"][n] == v for n, v in launch.items()
                       if n.isupper())
            dense = k["layout"] == "dense"
            if k["kernel"] in ("attn_fwd", "attn_decode"):
                assert list(k["signature"])[:5] == ["q_ptr", "k_ptr", "v_ptr", "out_ptr", "lse_ptr"]
                assert k["signature"]["q_ptr"] == "*fp16"
                assert k["signature"]["lse_ptr"] == ("*fp32" if spec.returns_lse else "*fp16")
                if a["name"] == "small_window":
                    assert k["signature"]["p_window"] == "i64"
                assert k["assumes"]["equal_to_1"] == (["s_qd", "s_kd", "s_vd", "s_od"] if dense else [])
                assert ("q_ptr" in k["assumes"]["divisible_by_16"]) == dense
                assert all(k["signature"][n] == ("constexpr" if n in k["assumes"]["equal_to_1"] else "i64")
                           for n in ("s_qd", "s_qm"))
            assert cubin_sm((folder / k["binary"]).read_bytes()) == capability
            meta = json.loads((folder / k["metadata"]).read_text())
            assert meta["name"] == k["kernel"] and meta["target"]["arch"] == capability
            assert meta["triton_version"] == triton.__version__ and meta["hash"] == k["triton_hash"]
        # exactly the plan's kernel list, each for the layouts that differ for it
        assert {(f, launch) for f, launch, _ in built} == {(k.function, k.launch) for k in plan.kernels}
        assert len(built) == len(set(built))
        # with descriptors (sm_90), each prefill launch is built for K/V that they can take (TMA=True) and that
        # they cannot; the split-KV decode kernels and their merge are built too
        tma = {dict(launch).get("TMA") for f, launch, _ in built if f == "attn_fwd"}
        assert tma == ({True, False} if plan.triton.tma else {None}) and plan.triton.tma == (capability >= 90)
        assert {"attn_decode", "attn_combine"} <= {f for f, _, _ in built}


def test_load_gives_kernels_that_check_their_calls(sm90, spec_file):
    kernels = attnc.load(sm90)
    assert sorted(kernels) == ["small_causal", "small_window"]
    specs = {s.name: s for s in attnc.parse_file(spec_file)}
    for name, kernel in kernels.items():
        assert isinstance(kernel, attnc.runtime.kernel.Kernel) and kernel.key == specs[name].key
    q = torch.randn(1, 2, 5, 32)
    with pytest.raises(attnc.CallError, match=r"^q: expected dtype f16"):
        kernels["small_causal"](q, q, q)
    with pytest.raises(attnc.CallError, match=r"^window: param i32 wants an int"):
        kernels["small_window"](q.half(), q.half(), q.half(), window=2.5)
    with pytest.raises(attnc.CallError, match=r"q: is on cpu, but the AOT kernels of .* run on CUDA GPUs \(sm_90a\)"):
        kernels["small_causal"](q.half(), q.half(), q.half())


def test_load_of_one_attention_gives_a_mapping_and_refuses_other_head_dims(sm80):
    kernels = attnc.load(sm80)
    assert list(kernels) == ["small_causal"]  # a mapping by name, however many attentions the folder holds
    kernel = attnc.load(sm80, name="small_causal")
    assert isinstance(kernel, attnc.runtime.kernel.Kernel) and kernel.spec.name == "small_causal"
    with pytest.raises(attnc.CallError, match=r"^name: .* has no attention named 'small_casual'; did you mean "
                                              r"'small_causal'\? \(it has: small_causal\)"):
        attnc.load(sm80, name="small_casual")
    artifact = aot.read_artifact(sm80)
    backend = aot.AotBackend(artifact, artifact.attentions[0], kernel.spec)
    with pytest.raises(attnc.CacheError, match=r"was built for D=32 DV=32, not D=64 DV=64: rebuild with "
                                               r"--dims D=64,DV=64 \(`attnc compile .* --arch sm_80"):
        backend.build(plan_kernel(kernel.spec, Target("triton", "cuda", 80), 64, 64))
    launcher = backend.build(plan_kernel(kernel.spec, Target("triton", "cuda", 80), 32, 32))
    assert isinstance(launcher.fwd, aot.AotKernel)  # the runtime's own launcher, over the saved cubins
    for builds in launcher.fwd._builds.values():
        assert [b.build.layout for b in builds] == ["dense", "any"]
        for b in builds:  # Triton's CompiledKernel is rebuilt from the saved files without a GPU
            compiled = b.compiled()
            assert compiled.metadata.target.arch == 80 and compiled.kernel == (sm80 / b.build.binary).read_bytes()


@pytest.fixture
def copy_of(tmp_path):
    def copy(folder: Path) -> Path:
        return Path(shutil.copytree(folder, tmp_path / folder.name))
    return copy


def test_a_changed_or_missing_file_is_refused(sm90, copy_of):
    folder = copy_of(sm90)
    m = manifest_of(folder)
    cubin = folder / m["attentions"][0]["builds"][0]["kernels"][0]["binary"]
    data = bytearray(cubin.read_bytes())
    data[len(data) // 2] ^= 0xFF
    cubin.write_bytes(bytes(data))
    with pytest.raises(attnc.CacheError) as err:
        attnc.load(folder)
    assert str(err.value) == (f"{cubin}: does not match the SHA-256 in manifest.json (changed after `attnc compile` "
                              f"wrote it): rebuild with `{m['command']}`")
    cubin.write_bytes(sm90.joinpath(cubin.relative_to(folder)).read_bytes())
    attnc.load(folder)  # restored: accepted again
    source = folder / m["attentions"][1]["builds"][0]["sources"]["prefill"]
    source.unlink()
    with pytest.raises(attnc.CacheError, match=rf"^{source}: listed in manifest.json but cannot be read"):
        attnc.load(folder)


@pytest.mark.parametrize("loose", ["cubin", "build folder", "manifest"])
def test_files_others_can_change_are_refused(sm80, copy_of, loose):
    folder = copy_of(sm80)
    cubin = folder / manifest_of(folder)["attentions"][0]["builds"][0]["kernels"][0]["binary"]
    path = {"cubin": cubin, "build folder": cubin.parent, "manifest": folder / "manifest.json"}[loose]
    path.chmod(path.stat().st_mode | 0o002)
    with pytest.raises(attnc.CacheError, match=f"^{path} is writable by others"):
        attnc.load(folder)
    path.chmod(path.stat().st_mode & ~0o002)
    attnc.load(folder)


def test_paths_outside_the_artifact_are_refused(sm80, copy_of):
    folder = copy_of(sm80)
    m = manifest_of(folder)
    kernel = m["attentions"][0]["builds"][0]["kernels"][0]
    outside = f"../{folder.name}/{kernel['binary']}"
    m["files"][outside] = m["files"][kernel["binary"]]
    (folder / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(attnc.CacheError, match=f"lists '{re.escape(outside)}', a file outside the artifact"):
        attnc.load(folder)
    del m["files"][outside]
    del m["files"][kernel["binary"]]  # still on disk, but no longer listed (so not hashed): refused too
    (folder / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(attnc.CacheError, match="garbled manifest .*files not in its file list"):
        attnc.load(folder)


def test_a_build_made_under_umask_000_is_loadable(spec_file, tmp_path):
    old = os.umask(0)
    try:
        assert compile_cli(spec_file, "--name", "small_causal", "--arch", "sm_80", "-o", tmp_path / "a", "--dims",
                           "D=32", "--jobs", "1") == 0
    finally:
        os.umask(old)
    assert all(p.stat().st_mode & 0o022 == 0 for p in [tmp_path / "a", *(tmp_path / "a").rglob("*")])
    attnc.load(tmp_path / "a")


def test_another_triton_or_attnc_version_is_refused(sm90, copy_of):
    folder = copy_of(sm90)
    m = manifest_of(folder)
    (folder / "manifest.json").write_text(json.dumps({**m, "triton": "3.5.1"}))
    with pytest.raises(attnc.CacheError) as err:
        attnc.load(folder)
    here = triton.__version__
    assert str(err.value) == (f"built by Triton 3.5.1 for sm_90a; this machine has Triton {here}: rebuild with "
                              f"`{m['command']}` using Triton {here}")
    (folder / "manifest.json").write_text(json.dumps({**m, "attnc": "0.0.1"}))
    with pytest.raises(attnc.CacheError, match=rf"built by Triton {here} for sm_90a and attnc 0.0.1; this is "
                                               rf"attnc {attnc.__version__}: rebuild with"):
        attnc.load(folder)


@pytest.mark.parametrize("content, message", [
    (None, "not an attnc AOT artifact (no manifest.json)"),
    ("{not json", "unreadable (JSONDecodeError"),
    ('{"format": "attnc-aot/0"}', "format 'attnc-aot/0', this attnc reads 'attnc-aot/2'"),
])
def test_a_folder_that_is_no_artifact_is_refused(tmp_path, content, message):
    if content is not None:
        (tmp_path / "manifest.json").write_text(content)
    with pytest.raises(attnc.CacheError, match=message.replace("(", r"\(").replace(")", r"\)")):
        attnc.load(tmp_path)
    with pytest.raises(attnc.CacheError, match="no such folder; build an artifact with `attnc compile"):
        attnc.load(tmp_path / "missing")


@pytest.mark.parametrize("change", ["plan", "source"])
def test_a_plan_or_source_this_attnc_would_not_make_is_refused(sm80, copy_of, change):
    folder = copy_of(sm80)
    m = manifest_of(folder)
    build = m["attentions"][0]["builds"][0]
    if change == "plan":
        build["plan"] += " "
    else:  # an older code generator's source, with a matching hash: the launcher would pass other arguments
        source = folder / build["sources"]["prefill"]
        source.write_text(source.read_text() + "# from another attnc\n")
        data = source.read_bytes()
        m["files"][build["sources"]["prefill"]] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    (folder / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(attnc.CacheError, match=r"plans or generates attention 'small_causal' \(D=32\) differently "
                                               r"from the attnc that built it: rebuild with `attnc compile"):
        attnc.load(folder)


def test_rebuilding_replaces_an_artifact_whole(spec_file, sm80, copy_of):
    folder = copy_of(sm80)
    before = manifest_of(folder)
    (folder / "stale.txt").write_text("from an earlier build")
    assert compile_cli(spec_file, "--name", "small_causal", "--arch", "sm_80", "-o", folder, "--dims", "D=32",
                       "--jobs", "1") == 0  # Triton's own cache makes this quick
    after = manifest_of(folder)
    assert not (folder / "stale.txt").exists()
    assert set(after["files"]) == set(before["files"]) and after["attentions"] == before["attentions"]
    assert [p.name for p in folder.parent.iterdir() if p.name.startswith(".")] == []  # no staging left behind


@pytest.mark.parametrize("args, message", [
    (["--arch", "sm_xx"], "--arch sm_xx: expected an NVIDIA arch as sm_<compute capability>, e.g. sm_90a"),
    (["--arch", "gfx90a"], "--arch gfx90a: expected an NVIDIA arch"),
    (["--arch", "sm_70"], "--arch sm_70: Triton compiles for sm_75 and newer"),
    (["--arch", "sm_90a", "--dims", "D=x"], "--dims D=x: expected D=<int>[,DV=<int>]"),
    (["--arch", "sm_90a", "--dims", "DV=64"], "--dims DV=64: D is missing"),
    (["--arch", "sm_90a"], "attention 'small_causal': the head dim D is not bound by `dims` in the spec, so the "
                           "build needs it: pass --dims D=128"),
    (["--arch", "sm_90a", "--name", "nope", "--dims", "D=32"], "has no attention named 'nope'; it has: "
                                                                "small_causal, small_window"),
])
def test_bad_arguments_exit_2_with_a_message(spec_file, tmp_path, capsys, args, message):
    assert compile_cli(spec_file, "-o", tmp_path / "out", *args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_missing_input_or_output_folder_exit_2(spec_file, tmp_path, capsys):
    assert compile_cli(tmp_path / "nope.attn", "--arch", "sm_90a", "-o", tmp_path / "out") == 2
    assert f"{tmp_path / 'nope.attn'}: no such file" in capsys.readouterr().err
    out = tmp_path / "missing" / "out"
    assert compile_cli(spec_file, "--arch", "sm_90a", "-o", out, "--dims", "D=32") == 2
    assert f"-o {out}: the folder {out.parent} does not exist; create it first" in capsys.readouterr().err
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    assert compile_cli(spec_file, "--arch", "sm_90a", "-o", tmp_path / "mine", "--dims", "D=32") == 2
    assert "exists and is not an attnc AOT artifact" in capsys.readouterr().err
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_paged_storage_builds_its_decode_kernels(tmp_path):
    """Ragged and paged specs run every launch on the decode kernels: the artifact holds those, and only those."""
    paged = Path(__file__).parents[1] / "examples" / "specs" / "paged_decode.attn"
    out = tmp_path / "out"
    assert compile_cli(paged, "--name", "paged_decode", "--arch", "sm_90a", "-o", out, "--dims", "D=64") == 0
    (attention,) = manifest_of(tmp_path / "out")["attentions"]
    (build,) = attention["builds"]
    assert list(build["sources"]) == ["decode"]
    assert {k["kernel"] for k in build["kernels"]} == {"attn_decode", "attn_combine"}


GLUON_SPEC = """\
attention long_causal {
    q: bf16[B, H, M, D]  k: bf16[B, H, N, D]  v: bf16[B, H, N, D]
    dims D = 128, M = 4096
    mask causal
    return softmax(score) @ v, lse
}
"""


@pytest.fixture(scope="module")
def gluon_artifact(tmp_path_factory):
    """A build whose sm_90 plan runs the Gluon warpgroup kernel (bf16, D = 128, M bound past its minimum length);
    binding M keeps the list to its prefill kernels."""
    folder = tmp_path_factory.mktemp("gluon")
    (folder / "g.attn").write_text(GLUON_SPEC)
    assert compile_cli(folder / "g.attn", "--arch", "sm_90a", "-o", folder / "artifact") == 0
    return folder / "artifact"


def test_the_gluon_kernel_is_built_where_this_triton_has_its_gluon(gluon_artifact):
    """Triton 3.6 (the GPU machine's): the build compiles attn_fwd_gluon from Gluon's AST source for sm_90, for each
    layout, and the loaded kernel's Gluon launcher launches the saved builds with the plan's keywords. Any other
    Triton: the manifest says why it is not built, and the loaded kernel warns once and runs the template."""
    from attnc.backends.triton import gluon
    from attnc.passes.kernels import gluon_kernel

    spec = attnc.parse(GLUON_SPEC)[0]
    plan = plan_kernel(spec, Target("triton", "cuda", 90), 128, 128)
    listed = gluon_kernel(plan)
    assert plan.warpgroups.path == "gluon" and listed in plan.kernels
    # persistent programs (a causal mask at D = 128): their tile coordinates, from the sizes, must come out i32
    # where the build's sizes are i64 (TMA takes i32 coordinates only)
    assert plan.warpgroups.layout.persistent
    (build,) = manifest_of(gluon_artifact)["attentions"][0]["builds"]
    gluon_builds = [k for k in build["kernels"] if k["kernel"] == "attn_fwd_gluon"]
    backend = aot.load_backends(gluon_artifact)["long_causal"][1]
    why = gluon.unavailable_here()
    if why:
        assert build["not_built"] == {"attn_fwd_gluon": why} and not gluon_builds
        assert build["sources"].keys() == {"prefill"}
        with pytest.warns(UserWarning, match=r"built without attn_fwd_gluon \(Triton .*\); its launches run the "
                                             r"Triton template instead"):
            launcher = backend.build(plan)
        assert not isinstance(launcher, gluon.GluonLauncher)
        return
    assert build["not_built"] == {}
    assert (gluon_artifact / build["sources"]["gluon"]).read_text() == gluon.generate_gluon(plan)
    assert [(tuple(map(tuple, k["launch"])), k["layout"]) for k in gluon_builds] == [
        (listed.launch, "dense"), (listed.launch, "any")]
    for k in gluon_builds:
        assert cubin_sm((gluon_artifact / k["binary"]).read_bytes()) == 90
        # the consumer warpgroups and the producer's warpgroup; the producer warp's budget is set in the kernel
        assert k["num_warps"] == 12 and 0 < k["shared"] <= 232448
        meta = json.loads((gluon_artifact / k["metadata"]).read_text())
        assert meta["name"] == "attn_fwd_gluon" and meta["maxnreg"] == listed.keywords["maxnreg"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        launcher = backend.build(plan)
    assert isinstance(launcher, gluon.GluonLauncher) and isinstance(launcher.kernel, aot.AotKernel)
    # the launcher's keywords pick the saved builds, which Triton reads back as Gluon kernels
    (dense, any_layout) = launcher.kernel._builds[tuple(launcher.options.items())]
    assert dense.build.layout == "dense" and any_layout.build.layout == "any"
    assert type(dense.compiled().src).__name__ == "GluonASTSource"


MLA_SPEC = """\
attention mla_paged {
    dims D = 512, DR = 64, PAGE = 64, H = 64, M = 1
    q: f16[B, M, H, D]
    k: f16[PAGES, PAGE, D]
    input qr: f16[B, M, H, DR]
    input kr: f16[PAGES, PAGE, DR]
    paged k by block_table, kv_len
    param scale: f32
    score = (q @ k + qr @ kr) * scale
    mask causal
    return softmax(score) @ k, lse
}
"""


@pytest.fixture(scope="module")
def mla_artifact(tmp_path_factory):
    """examples/specs/mla.attn's paged MLA decode (f16: the interpreter's bf16 is not the GPU's) with H and M bound,
    so that its sm_90 plan runs the Gluon MLA decode kernel and lists one heads-per-program count."""
    folder = tmp_path_factory.mktemp("mla")
    (folder / "mla.attn").write_text(MLA_SPEC)
    assert compile_cli(folder / "mla.attn", "--arch", "sm_90a", "-o", folder / "artifact") == 0
    return folder / "artifact"


def test_the_gluon_mla_decode_kernel_is_built_where_this_triton_has_its_gluon(mla_artifact):
    """The plan lists attn_decode_gluon for its split and unsplit launches. Triton 3.6: the build compiles each
    from Gluon's AST source for sm_90 in both layouts and the loaded kernel's launcher is the Gluon MLA decode
    launcher over the saved builds, its fallback the saved Triton decode kernel. Any other Triton: the manifest
    says why it is not built, and the loaded kernel warns once and runs the Triton decode kernel."""
    from attnc.backends.triton import gluon, gluon_decode, serving
    from attnc.passes.latent_decode import gluon_decode_kernel, latent_tiles

    spec = attnc.parse(MLA_SPEC)[0]
    plan = plan_kernel(spec, Target("triton", "cuda", 90), 512, 512)
    listed = [gluon_decode_kernel(plan, latent_tiles(plan, 64), split) for split in (False, True)]
    assert plan.decode.warpgroups.path == "gluon"
    assert [k for k in plan.kernels if k.module == "gluon_decode"] == listed
    (build,) = manifest_of(mla_artifact)["attentions"][0]["builds"]
    gluon_builds = [k for k in build["kernels"] if k["kernel"] == "attn_decode_gluon"]
    assert {k["kernel"] for k in build["kernels"]} - {"attn_decode_gluon"} == {"attn_decode", "attn_combine"}
    backend = aot.load_backends(mla_artifact)["mla_paged"][1]
    why = gluon.unavailable_here()
    if why:
        assert build["not_built"] == {"attn_decode_gluon": why} and not gluon_builds
        assert build["sources"].keys() == {"decode"}
        with pytest.warns(UserWarning, match=r"built without attn_decode_gluon \(Triton .*\); its launches run the "
                                             r"Triton decode kernel instead"):
            launcher = backend.build(plan)
        assert type(launcher) is serving.DecodeLauncher and isinstance(launcher.decode_fn, aot.AotKernel)
        return
    assert build["not_built"] == {}
    assert (mla_artifact / build["sources"]["gluon_decode"]).read_text() == gluon_decode.generate_gluon_decode(plan)
    assert build["sources"]["gluon_decode"].endswith("/gluon_decode_kernel.py")
    assert [(tuple(map(tuple, k["launch"])), k["layout"]) for k in gluon_builds] == [
        (kernel.launch, layout) for kernel in listed for layout in ("dense", "any")]
    for k in gluon_builds:
        assert cubin_sm((mla_artifact / k["binary"]).read_bytes()) == 90
        # the score and value warpgroups and the producer's warpgroup; the producer warp's budget is set in the kernel
        assert k["num_warps"] == 12 and 0 < k["shared"] <= 232448
        meta = json.loads((mla_artifact / k["metadata"]).read_text())
        assert meta["name"] == "attn_decode_gluon" and meta["maxnreg"] == listed[0].keywords["maxnreg"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        launcher = backend.build(plan)
    assert isinstance(launcher, gluon_decode.GluonDecodeLauncher) and isinstance(launcher.decode_fn, aot.AotKernel)
    assert type(launcher.fallback) is serving.DecodeLauncher and isinstance(launcher.fallback.decode_fn, aot.AotKernel)
    assert launcher.combine_fn is launcher.fallback.combine_fn
    (dense, any_layout) = launcher.decode_fn._builds[listed[1].launch]
    assert dense.build.layout == "dense" and any_layout.build.layout == "any"
    assert type(dense.compiled().src).__name__ == "GluonASTSource"


def test_a_loaded_mla_decode_runs_the_saved_triton_decode_kernel(mla_artifact, monkeypatch):
    """Off the GPU and off Triton 3.6, the loaded MLA kernel runs the artifact's Triton decode kernels: each launch
    the launcher makes finds a saved build by its keywords (AotKernel), here run by Triton's interpreter from the
    artifact's own decode.py in place of the cubin, against the reference with NaN-poisoned outputs and a split."""
    import attnc.backends.triton.launch as launch
    from attnc.backends.triton import gluon

    if gluon.unavailable_here() == "" or os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("runs the decode kernels in Triton's interpreter, where the Gluon kernel is not built")
    (build,) = manifest_of(mla_artifact)["attentions"][0]["builds"]
    saved = launch.import_source(mla_artifact / build["sources"]["decode"], "attnc_aot_test.mla_decode_interpreted")
    monkeypatch.setattr(launch, "empty", launch.nan_empty)
    monkeypatch.setattr(aot.AotBackend, "target", lambda self, device: Target("triton", "cuda", 90))
    monkeypatch.setattr(aot._LoadedBuild, "compiled", lambda self: getattr(saved, self.build.kernel))
    launched = []
    run = aot.AotKernel.run
    monkeypatch.setattr(aot.AotKernel, "run", lambda self, grid, args, keywords: launched.append(
        (self.fn.__name__, tuple(keywords.items()))) or run(self, grid, args, keywords))
    kernel = attnc.load(mla_artifact)["mla_paged"]
    monkeypatch.setattr(attnc.backends.triton.serving, "sm_count", lambda device: 132)  # an H100's
    torch.manual_seed(0)
    page = 64
    # two pages a sequence: one split; eight: two splits (four key tiles each) merged by attn_combine
    for pages_each, lengths, splits in ((2, [70, 1, 127], 1), (8, [300, 1, 500], 2)):
        table = torch.randperm(3 * pages_each).int().reshape(3, pages_each)  # shuffled over the pool
        q = torch.randn(3, 1, 64, 576).half()
        pages = torch.randn(3 * pages_each, page, 576).half()
        kw = dict(qr=q[..., 512:], kr=pages[..., 512:], block_table=table, kv_len=torch.tensor(lengths).int(),
                  scale=576 ** -0.5)
        launched.clear()
        with warnings.catch_warnings(record=True) as warned:
            warnings.simplefilter("always")
            out, lse = kernel(q[..., :512], pages[..., :512], **kw)  # the first call builds the launcher
        assert len(warned) == (splits == 1)  # once, when the launcher is built
        assert all("built without attn_decode_gluon" in str(w.message) for w in warned)
        ref, ref_lse = attnc.reference(kernel.spec, q[..., :512], pages[..., :512], **kw)
        assert [name for name, _ in launched] == ["attn_decode"] + ["attn_combine"] * (splits > 1)
        assert dict(launched[0][1])["SPLIT"] == (splits > 1)
        assert not out.isnan().any() and torch.isfinite(lse).all()
        assert (out.double() - ref).abs().max().item() <= 1e-2 * max(1.0, ref.abs().max().item())
        assert (lse.double() - ref_lse).abs().max().item() <= 1e-2


def test_an_mla_artifact_whose_kernel_list_differs_is_refused_with_the_rebuild_command(mla_artifact, monkeypatch):
    """An artifact built before the kernel list held attn_decode_gluon holds another plan than this attnc makes (here
    the other way round: this attnc with the kernel unlisted): load names the command that rebuilds it."""
    import attnc.passes.kernels as kernels

    monkeypatch.setattr(kernels, "latent_kernels", lambda plan, groups: [])
    with pytest.raises(attnc.CacheError, match=r"plans or generates attention 'mla_paged' \(D=512\) differently "
                                               r"from the attnc that built it: rebuild with `attnc compile .*--arch "
                                               r"sm_90a"):
        attnc.load(mla_artifact)


# ---------------------------------------------------------------- on the GPU

GPU_SPECS = """\
attention g_causal {
    q: bf16[B, H, M, D]  k: bf16[B, H, N, D]  v: bf16[B, H, N, D]
    mask causal
    return softmax(score) @ v, lse
}

attention g_local {
    dims D = 64, H = 8, HKV = 2
    q: bf16[B, H, M, D]  k: bf16[B, HKV, N, D]  v: bf16[B, HKV, N, D]
    param window: i32 = 4096
    param cap: f32 = 30.0
    score = qk * rsqrt(D)
    score = cap * tanh(score / cap)
    mask causal
    mask i + (N - M) - j < window
    return softmax(score) @ v
}

attention g_doc {
    q: bf16[B, M, H, D]  k: bf16[B, N, H, D]  v: bf16[B, N, H, D]
    input doc: i32[B, N]
    mask doc[b, i + (N - M)] == doc[b, j]
    return softmax(score) @ v
}
"""


@pytest.mark.gpu
def test_compiled_ahead_runs_without_compiling_gpu(tmp_path, monkeypatch):
    import attnc.backends.triton.launch as launch

    (tmp_path / "g.attn").write_text(GPU_SPECS)
    major, minor = torch.cuda.get_device_capability()
    out = tmp_path / "artifact"
    assert compile_cli(tmp_path / "g.attn", "--arch", f"sm_{major}{minor}", "-o", out, "--dims", "D=64") == 0
    monkeypatch.setattr(launch, "empty", lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype,
                                                                                 device=device))
    compiles = []
    monkeypatch.setattr(triton.knobs.compilation, "listener", lambda **kw: compiles.append(kw["src"].name))
    kernels = attnc.load(out)
    torch.manual_seed(0)
    for name, kernel in kernels.items():
        spec = kernel.spec
        for m, n in [(1, 300), (5, 77), (200, 517)]:
            sizes = {"B": 2, "H": 8, "HKV": 2, "M": m, "N": n, "D": 64}

            def make(decl, stretch=1):
                shape = [sizes[d] * (stretch if d == "D" else 1) for d in decl.shape]
                return torch.randn(shape, device="cuda", dtype=torch.bfloat16)

            kwargs = {}
            if spec.inputs:
                kwargs["doc"] = torch.sort(torch.randint(0, 3, (2, n), device="cuda"), dim=-1).values.int()
            if spec.params:
                kwargs["window"] = 40
            q, k, v = make(spec.q), make(spec.k), make(spec.v)
            q_strided = make(spec.q, stretch=2)[..., ::2]  # head-dim stride 2: the "any" build
            # K/V with head-dim stride 2: no tensor descriptors (the TMA=False build on sm_90)
            k_strided, v_strided = make(spec.k, stretch=2)[..., ::2], make(spec.v, stretch=2)[..., ::2]
            for qq, kk, vv in ((q, k, v), (q_strided, k, v), (q, k_strided, v_strided)):
                got = kernel(qq, kk, vv, **kwargs)
                want = attnc.reference(spec, qq, kk, vv, **kwargs)
                out_, ref = (got[0], want[0]) if spec.returns_lse else (got, want)
                assert not out_.isnan().any(), (name, m, n)
                err = (out_.double() - ref).abs().max().item()
                assert err <= 3e-2 * max(1.0, ref.abs().max().item()), (name, m, n, err)
                if spec.returns_lse:
                    finite = torch.isfinite(want[1])
                    assert torch.equal(torch.isfinite(got[1]), finite)
                    assert (got[1].double() - want[1])[finite].abs().max().item() <= 3e-2
    assert compiles == []  # every launch ran a saved cubin


@pytest.mark.gpu
def test_the_loaded_gluon_kernel_runs_its_saved_cubin_gpu(gluon_artifact, monkeypatch):
    """sm_90 with Triton 3.6: a 4096-row causal prefill of the loaded kernel runs the saved attn_fwd_gluon (nothing
    compiled) and matches the reference in every element and lse; K/V with a strided head dim (no TMA) take the
    saved template builds."""
    import attnc.backends.triton.launch as launch
    from attnc.backends.triton import gluon

    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the Gluon kernel runs on sm_90")
    if gluon.unavailable_here():
        pytest.skip(gluon.unavailable_here())
    monkeypatch.setattr(launch, "empty", lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype,
                                                                                 device=device))
    compiles, launched = [], []
    monkeypatch.setattr(triton.knobs.compilation, "listener", lambda **kw: compiles.append(kw["src"].name))
    run = aot.AotKernel.run
    monkeypatch.setattr(aot.AotKernel, "run", lambda self, grid, args, keywords: launched.append(self.fn.__name__)
                        or run(self, grid, args, keywords))
    kernel = attnc.load(gluon_artifact)["long_causal"]
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 4096, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    k_strided, v_strided = (torch.randn(1, 2, 4096, 256, device="cuda", dtype=torch.bfloat16)[..., ::2]
                            for _ in range(2))
    for kk, vv, kernel_name in ((k, v, "attn_fwd_gluon"), (k_strided, v_strided, "attn_fwd")):
        launched.clear()
        out, lse = kernel(q, kk, vv)
        ref, ref_lse = attnc.reference(kernel.spec, q, kk, vv)
        assert launched == [kernel_name]
        assert not out.isnan().any() and torch.isfinite(lse).all()
        assert (out.double() - ref).abs().max().item() <= 3e-2 * max(1.0, ref.abs().max().item())
        assert (lse.double() - ref_lse).abs().max().item() <= 3e-2
    assert compiles == []


GPU_MLA_SPEC = """\
attention mla_paged {
    dims D = 512, DR = 64, PAGE = 64, H = 64, M = 1
    q: bf16[B, M, H, D]
    k: bf16[PAGES, PAGE, D]
    input qr: bf16[B, M, H, DR]
    input kr: bf16[PAGES, PAGE, DR]
    paged k by block_table, kv_len
    param scale: f32
    score = (q @ k + qr @ kr) * scale
    mask causal
    return softmax(score) @ k, lse
}
"""


@pytest.mark.gpu
def test_the_loaded_gluon_mla_decode_kernel_runs_its_saved_cubin_gpu(tmp_path, monkeypatch):
    """sm_90 with Triton 3.6: a paged MLA decode artifact (DeepSeek's widths, bf16, pages of 64) runs the saved
    attn_decode_gluon (nothing compiled), unsplit and split (two sequences, one of 1 key and one of 3000, on an H100), against the
    reference with NaN-poisoned outputs and workspace; q with a strided head dim (no TMA) runs the saved Triton
    decode kernel, with the JIT launcher's warning. test_mla_gluon_gpu's inputs and its proof that the Gluon kernel
    took the call."""
    import attnc.backends.triton.launch as launch
    from attnc.backends.triton import gluon, gluon_decode
    from test_mla_gluon_gpu import SHAPES
    from test_mla_grid import Point, grid_call
    from test_triton_kernels import assert_matches

    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the Gluon MLA decode kernel runs on sm_90")
    if gluon.unavailable_here():
        pytest.skip(gluon.unavailable_here())
    (tmp_path / "mla.attn").write_text(GPU_MLA_SPEC)
    assert compile_cli(tmp_path / "mla.attn", "--arch", "sm_90a", "-o", tmp_path / "artifact") == 0
    monkeypatch.setattr(launch, "empty", launch.nan_empty)
    compiles, launched, took = [], [], []
    monkeypatch.setattr(triton.knobs.compilation, "listener", lambda **kw: compiles.append(kw["src"].name))
    run = aot.AotKernel.run
    monkeypatch.setattr(aot.AotKernel, "run", lambda self, grid, args, keywords: launched.append(
        (self.fn.__name__, keywords["SPLIT"] if "SPLIT" in keywords else None)) or run(self, grid, args, keywords))
    gluon_run = gluon_decode.GluonDecodeLauncher.run
    monkeypatch.setattr(gluon_decode.GluonDecodeLauncher, "run", lambda self, bound, go=None: took.append(
        self.uncovered(bound) == "") or gluon_run(self, bound, go))
    kernel = attnc.load(tmp_path / "artifact")["mla_paged"]
    for point, split in ((Point(64, 64), False), (Point(64, 2, n_max=3000), True)):
        q, k, kw = grid_call("paged", "plain", SHAPES, point)
        launched.clear(), took.clear()
        got = kernel(q, k, **kw)
        assert took == [True], "the Gluon kernel took the call"
        assert launched == [("attn_decode_gluon", split)] + [("attn_combine", None)] * split
        assert_matches(kernel.spec, got, attnc.reference(kernel.spec, q, k, **kw), tol=1e-2)
        attnc.check_errors()
    strided = torch.zeros(*q.shape[:-1], 2 * q.shape[-1], dtype=q.dtype, device=q.device)
    strided[..., ::2] = q
    launched.clear(), took.clear()
    gluon_decode._warn_once.cache_clear()
    with pytest.warns(UserWarning, match="q is not TMA-readable"):
        got = kernel(strided[..., ::2], k, **kw)
    assert took == [False] and launched[0][0] == "attn_decode"
    assert_matches(kernel.spec, got, attnc.reference(kernel.spec, q, k, **kw), tol=1e-2)
    assert compiles == []


def test_a_spec_whose_text_could_not_be_read_back_is_not_built(tmp_path):
    """The manifest holds the spec as text: a spec whose mask reuses a subexpression 2^20 times (a decorator's
    loop) has no such text of reasonable size, so the build refuses it before compiling, naming the way out."""
    from attnc.backends.tvm.aot import build

    def doubled_mask(q, k, v):
        d = k.pos - q.pos
        for _ in range(20):
            d = d + d
        return attnc.softmax(q @ k, where=d <= 0) @ v

    x = torch.randn(1, 1, 4, 8)
    spec = attnc.attention(doubled_mask).trace(x, x, x)
    with pytest.raises(attnc.CompileError, match="could not be loaded; compile it at run time"):
        build(spec, tmp_path / "out", target="llvm")
    assert not (tmp_path / "out").exists()
