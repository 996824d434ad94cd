"""One behaviour across the public API and the CLI: call mistakes are CallErrors that name the argument, unknown
names in specs get suggestions, `attnc compile` leaves no half-written folder, and the package ships its type
information. (attnc.load's mapping and name=: test_aot.py, test_tvm_cuda.py.)"""
import json
import tomllib
from importlib import resources
from pathlib import Path

import pytest
import torch

import attnc
from attnc import cli
from attnc.errors import checks_arguments

pytestmark = pytest.mark.shared_cache

ROOT = Path(__file__).resolve().parent.parent
SPEC = """
attention windowed {
    q: f32[B, H, M, D]  k: f32[B, H, N, D]  v: f32[B, H, N, D]
    param window: i32 = 16
    input slopes: f32[H]
    score = qk * rsqrt(D) + slopes[h] * (j - i)
    mask causal
    mask i - j < window
    return softmax(score) @ v
}
"""


@pytest.fixture(scope="module")
def spec():
    return attnc.parse(SPEC)[0]


@pytest.fixture(scope="module")
def qkv():
    gen = torch.Generator().manual_seed(0)
    return tuple(torch.randn(1, 2, 8, 16, generator=gen) for _ in range(3))


USAGE = r"call it as windowed\(q, k, v, \*, slopes: f32\[H\], window: i32 = 16\)"


@pytest.mark.parametrize("make_call, message", [
    (lambda kern, q, k, v, s: kern(q, k, slopes=s), r"^v: missing argument; " + USAGE),
    (lambda kern, q, k, v, s: kern(q, k, v, 8, slopes=s),
     r"^argument 4 \(8\): takes 3 positional arguments \(q, k, v\), got 4; pass the others by name; " + USAGE),
    (lambda kern, q, k, v, s: kern(q, k, v=v, slopes=s), r"^v: passed by name, but it is taken by position only"),
    (lambda kern, q, k, v, s: kern(), r"^q: missing argument"),
    (lambda kern, q, k, v, s: kern(q, k, v, slopes=s, windw=3), r"^windw: unknown argument .*did you mean 'window'"),
    (lambda kern, q, k, v, s: kern(q, k, v), r"^slopes: missing input tensor f32\[H\]"),
    (lambda kern, q, k, v, s: kern(q, k, v, slopes=s, window=2.5), r"^window: param i32 wants an int"),
    (lambda kern, q, k, v, s: kern(q.numpy(), k, v, slopes=s), r"^q: expected a torch.Tensor f32\[B, H, M, D\]"),
])
def test_kernel_call_mistakes_are_call_errors_naming_the_argument(spec, qkv, make_call, message):
    kern = attnc.compile(spec)  # nothing is built before a call binds
    with pytest.raises(attnc.CallError, match=message):
        make_call(kern, *qkv, torch.ones(2))


@attnc.attention
def decorated(q, k, v, *, cap: float = 20.0):
    return attnc.softmax(cap * attnc.tanh((q @ k) / cap)) @ v


@pytest.mark.parametrize("make_call, message", [
    (lambda q, k, v: decorated(q, k), r"^v: missing argument; call it as decorated\(q, k, v, \*, cap: float = 20.0\)"),
    (lambda q, k, v: decorated(q, k, v, 30.0), r"^argument 4 \(30.0\): takes 3 positional arguments"),
    (lambda q, k, v: decorated.trace(q, k, v, cap=1.0, bias=2), r"^bias: unknown argument"),
    (lambda q, k, v: attnc.flex_attention(q, k), r"^value: missing argument; call it as flex_attention\(query, key"),
    (lambda q, k, v: attnc.flex_attention(q, k, v, scroe_mod=None), r"^scroe_mod: unknown argument; did you mean "
                                                                     r"'score_mod'\?"),
    (lambda q, k, v: attnc.flex_attention(q, k, v, score_mod=3), r"^score_mod: expected a function, got int"),
    (lambda q, k, v: attnc.create_block_mask(lambda b, h, i, j: i >= j, 1, 2, 8), r"^KV_LEN: missing argument"),
    (lambda q, k, v: attnc.create_block_mask("causal", 1, 2, 8, 8), r"^mask_mod: expected a function, got str"),
    (lambda q, k, v: attnc.merge_states(q, q[..., 0]), r"^out_b: missing argument; call it as merge_states\(out_a"),
    (lambda q, k, v: attnc.reference(attnc.parse(SPEC)[0], q, k), r"^v: missing argument"),
    (lambda q, k, v: attnc.reference("windowed", q, k, v), r"^spec: expected an attnc.Attention"),
    (lambda q, k, v: attnc.compile(), r"^spec: missing argument"),
    (lambda q, k, v: attnc.load(), r"^path: missing argument"),
])
def test_front_end_call_mistakes_are_call_errors(qkv, make_call, message):
    with pytest.raises(attnc.CallError, match=message):
        make_call(*qkv)


def test_a_type_error_raised_inside_is_not_called_a_call_mistake():
    @checks_arguments
    def divide(a, b):
        return a / b

    with pytest.raises(TypeError, match="unsupported operand"):  # the arguments fit: fn's own TypeError
        divide("x", 2)
    with pytest.raises(attnc.CallError, match=r"^b: missing argument; call it as divide\(a, b\)"):
        divide(1)
    assert divide(6, b=3) == 2


@pytest.mark.parametrize("line, message", [
    ("mask casual", "unknown name 'casual'; did you mean 'causal'?"),
    ("mask i - j < windo", "unknown name 'windo'; did you mean 'window'?"),
    ("score = tanhh(qk)", "unknown function 'tanhh'; did you mean 'tanh'?"),
    ("score = qk + slope[h]", "unknown tensor 'slope'; did you mean 'slopes'?"),
    ("mask i + (N - MM) >= j", "unknown name 'MM'; did you mean 'M'?"),
    ("maks causal", "'maks' is not a statement keyword: did you mean 'mask'?"),
    ("paramm cap: f32 = 1.0", "'paramm' is not a statement keyword: did you mean 'param'?"),
    ("scroe = qk", "'scroe' is not a statement keyword: did you mean 'score'?"),
])
def test_unknown_names_in_specs_get_suggestions(line, message):
    text = SPEC.replace("    mask causal\n", f"    {line}\n")
    with pytest.raises(attnc.SpecError) as info:
        attnc.parse(text, filename="w.attn")
    assert message in str(info.value) and str(info.value).startswith("w.attn:")


def test_a_misspelt_block_keyword_gets_a_suggestion():
    with pytest.raises(attnc.SpecError, match="unexpected name 'atention'.*did you mean 'attention'"):
        attnc.parse(SPEC.replace("attention windowed", "atention windowed"))


def test_head_dims_error_names_the_real_flag(spec):
    from attnc.runtime.api import head_dims

    with pytest.raises(attnc.CompileError, match=r"\(CLI: --dims D=128\)"):
        head_dims(spec)


def _compile_tvm(spec_file: Path, out: Path, *extra: str) -> int:
    return cli.main(["compile", str(spec_file), "--backend", "tvm", "--target", "llvm", "-o", str(out), *extra])


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_a_failed_tvm_build_leaves_no_folder(tmp_path, capsys, monkeypatch):
    from attnc.backends.tvm import aot

    spec_file = tmp_path / "two.attn"
    spec_file.write_text(SPEC + SPEC.replace("windowed", "second"))
    out = tmp_path / "out"
    assert _compile_tvm(spec_file, out) == 2  # no --dims and no `dims D`: refused before any work
    assert "--dims D=128" in capsys.readouterr().err and not out.exists() and not _leftovers(tmp_path)

    built = []

    def build_then_fail(spec, folder, *args):
        folder.mkdir()
        (folder / "kernel.so").write_bytes(b"half written")
        built.append(spec.name)
        if len(built) == 2:
            raise attnc.CompileError("the second build fails")
        return folder

    monkeypatch.setattr(aot, "build", build_then_fail)
    assert _compile_tvm(spec_file, out, "--dims", "D=16") == 2
    assert "the second build fails" in capsys.readouterr().err
    assert built == ["windowed", "second"] and not out.exists() and not _leftovers(tmp_path)

    out.mkdir()  # an earlier artifact stays whole when a rebuild fails
    (out / "manifest.json").write_text(json.dumps({"format": aot.SET_FORMAT, "attentions": []}))
    built.clear()
    assert _compile_tvm(spec_file, out, "--dims", "D=16") == 2
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json"] and not _leftovers(tmp_path)


def test_the_package_ships_its_types():
    assert resources.files("attnc").joinpath("py.typed").is_file()
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert "py.typed" in package_data["attnc"]
