"""The normalizer as an IR node (ir.Normalizer), and sigmoid attention end to end: the three front-ends, the
checker, the float64 reference against an independent formula, and every kernel against the reference with
NaN-poisoned outputs: Triton prefill, decode with forced split-KV (its merge sums sigmoid partials), paged and
varlen storage (in the interpreter on CPU, at serving sizes with -m gpu), TVM on the CPU, TVM CUDA source."""
import ast
import math
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import attnc
from attnc import ir
from attnc.dsl.check import check_attention
from attnc.dsl.flex import create_block_mask, flex_spec
from attnc.passes import PlanOptions
from test_decode_kernels import check, offsets, paged_cache
from test_triton_kernels import (  # noqa: F401  (poisoned_outputs is an autouse fixture: importing enables it)
    DEVICE, RANDOM_SHAPES, TOL, TORCH, _spec, assert_matches, poisoned_outputs, qkv, run_and_check,
)

pytestmark = pytest.mark.shared_cache

ROOT = Path(__file__).resolve().parent.parent
INF = math.inf


def sigmoid_spec(dtype="f32", masks="mask causal", extra="", lse=True, layout="B, H, M, D", kv="B, HKV, N, D",
                 score="qk * rsqrt(D) - log(N)"):
    return _spec(masks, dtype, layout, kv, extra=f"{extra}\nscore = {score}",
                 ret=f"sigmoid(score) @ v{', lse' if lse else ''}")


# ---------------------------------------------------------------- the IR node and the front-ends


def test_normalizers_are_data():
    softmax, sigmoid = ir.Softmax(), ir.Sigmoid()
    assert (softmax.weight, softmax.normalized, softmax.merge, softmax.takes_sink) == ("exp", True, "lse", True)
    assert (sigmoid.weight, sigmoid.normalized, sigmoid.merge, sigmoid.takes_sink) == ("sigmoid", False, "sum", False)
    assert ir.NORMALIZERS == {"softmax": ir.Softmax, "sigmoid": ir.Sigmoid} and softmax != sigmoid


def test_sigmoid_round_trips_and_has_its_own_key():
    spec = sigmoid_spec()
    assert isinstance(spec.normalizer, ir.Sigmoid) and "return sigmoid(score) @ v, lse" in spec.canonical
    (again,) = attnc.parse(spec.canonical)
    assert again == spec and again.key == spec.key
    twin = attnc.parse(spec.canonical.replace("return sigmoid", "return softmax"))[0]
    assert isinstance(twin.normalizer, ir.Softmax) and twin.key != spec.key


def test_decorator_and_flex_give_the_text_key():
    """`attnc.sigmoid(s, where=...) @ v`, `p = attnc.sigmoid(s); p @ v, p.lse` and flex with normalizer="sigmoid"
    trace to the spec the text language parses; attnc.sigmoid stays elementwise inside expressions."""
    text = sigmoid_spec(masks="mask i >= j", score="qk * rsqrt(D) * sigmoid(j * 1.0)", lse=False, kv="B, H, N, D")
    with_lse = sigmoid_spec(masks="", kv="B, H, N, D")

    @attnc.attention
    def weighted(q, k, v):
        s = (q @ k) * q.D ** -0.5 * attnc.sigmoid(k.pos * 1.0)
        return attnc.sigmoid(s, where=q.pos >= k.pos) @ v

    @attnc.attention
    def returns_lse(q, k, v):
        p = attnc.sigmoid((q @ k) * q.D ** -0.5 - attnc.log(k.N))
        return p @ v, p.lse

    q, k, v = torch.randn(1, 2, 5, 8), torch.randn(1, 2, 7, 8), torch.randn(1, 2, 7, 8)
    assert weighted.trace(q, k, v).key == text.key
    assert returns_lse.trace(q, k, v).key == with_lse.key
    mask = create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, 5, 7)
    flexed = flex_spec(q, k, v, lambda s, b, h, qi, ki: s * torch.sigmoid(ki * 1.0), mask, normalizer="sigmoid")
    assert flexed.key == text.key
    assert isinstance(flex_spec(q, k, v).normalizer, ir.Softmax)


def test_front_end_errors():
    q = torch.randn(1, 2, 5, 8)

    @attnc.attention
    def int_condition(q, k, v):
        return attnc.sigmoid(q @ k, where=k.pos) @ v

    with pytest.raises(attnc.TraceError, match=r"sigmoid\(where=...\) takes a condition"):
        int_condition.trace(q, q, q)
    with pytest.raises(attnc.CallError, match="^normalizer: expected one of 'softmax', 'sigmoid'"):
        attnc.flex_attention(q, q, q, normalizer="relu")
    decls = (ir.TensorDecl("q", "f32", ("B", "H", "M", "D")), ir.TensorDecl("k", "f32", ("B", "H", "N", "D")),
             ir.TensorDecl("v", "f32", ("B", "H", "N", "D")))
    here = attnc.parse("attention x { q: f32[B, H, M, D] k: f32[B, H, N, D] v: f32[B, H, N, D]\n"
                       "return softmax(score, sink=0.5) @ v }", "x.attn")[0].normalizer.sink
    spec = ir.make_attention("x", *decls, normalizer=ir.Sigmoid(here))
    with pytest.raises(attnc.SpecError, match=r"x.attn:2:28: sigmoid takes no sink") as info:
        check_attention(spec)
    assert "^^^" in str(info.value)


def test_no_module_outside_the_normalizers_names_softmax():
    """Issue 11: only the normalizer's definition (ir.py), its lowerings and the public spelling of the front-ends
    (attnc.softmax) name softmax in code: identifiers and strings other than docstrings and comments."""
    allowed = {"attnc/ir.py", "attnc/backends/triton/normalize.py", "attnc/backends/tvm/normalize.py",
               "attnc/__init__.py", "attnc/dsl/trace.py"}
    naming = []
    for path in sorted((ROOT / "attnc").rglob("*")):
        rel = path.relative_to(ROOT).as_posix()
        if rel in allowed or rel.startswith(("attnc/backends/triton/normalize", "attnc/backends/tvm/normalize")):
            continue
        if path.suffix == ".py":
            tree = ast.parse(path.read_text())
            docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                          if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                          and node.body and isinstance(node.body[0], ast.Expr)
                          and isinstance(node.body[0].value, ast.Constant)}
            for node in ast.walk(tree):
                text = (node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute)
                        else node.value if isinstance(node, ast.Constant) and isinstance(node.value, str)
                        and id(node) not in docstrings else "")
                if "softmax" in text.lower():
                    naming.append(f"{rel}:{node.lineno}")
        elif path.suffix in (".j2", ".lark") and "softmax" in path.read_text().lower():
            naming.append(rel)
    assert naming == []


# ---------------------------------------------------------------- the reference against the formula


def test_reference_is_sigmoid_attention():
    """out = sum_j sigmoid(s_j) v_j over the kept keys, lse = log(sum_j sigmoid(s_j)); rows with no kept key
    (M > N under a bottom-right causal mask) give 0 and -inf; GQA heads read their K/V head."""
    spec = sigmoid_spec("f32")
    q, k, v = torch.randn(2, 4, 9, 16), torch.randn(2, 2, 6, 16), torch.randn(2, 2, 6, 16)
    out, lse = attnc.reference(spec, q, k, v)
    kk, vv = (t.double().repeat_interleave(2, dim=1) for t in (k, v))
    s = q.double() @ kk.transpose(-1, -2) / 4.0 - math.log(6)
    keep = torch.arange(9)[:, None] + (6 - 9) >= torch.arange(6)[None, :]
    w = torch.where(keep, torch.sigmoid(s), 0.0)
    torch.testing.assert_close(out, w @ vv, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, torch.log(w.sum(-1)), rtol=1e-12, atol=1e-12)
    assert bool((out[:, :, :3] == 0).all()) and bool((lse[:, :, :3] == -INF).all())


def test_reference_lse_of_very_negative_scores():
    """sigmoid(s) ~ exp(s) far below 0: the lse stays finite and exact (log sigmoid, not log of an underflow)."""
    spec = sigmoid_spec("f32", masks="", score="qk - 2000.0")
    q, k, v = torch.randn(1, 2, 3, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    out, lse = attnc.reference(spec, q, k, v)
    s = q.double() @ k.double().transpose(-1, -2) - 2000.0
    torch.testing.assert_close(lse, torch.logsumexp(s, -1), rtol=1e-12, atol=0)
    assert bool((out == 0).all())  # exp(-2000) underflows float64 too


# ---------------------------------------------------------------- Triton in the interpreter (GPU: -m gpu)

# (M, N, H, HKV, D, masks) of the softmax kernels' random shapes: decode M = 1 with GQA 8, D = 80, M > N (rows
# with no key), no mask, a window with a param; and a data-dependent mask (tile summary kernel)
PREFILL_CASES = [RANDOM_SHAPES[i] for i in (1, 5, 6, 7, 8)] + [
    (40, 70, 2, 1, 16, "input doc: i32[B, N]\nmask doc[b, i] == doc[b, j]")]


def prefill_kwargs(spec, sizes, device=DEVICE):
    if spec.input("doc") is None:
        return {}
    return {"doc": torch.sort(torch.randint(0, 3, (sizes["B"], sizes["N"])), dim=-1).values.int().to(device)}


def split_masks(masks):
    lines = masks.split("\n")
    return "\n".join(line for line in lines if line.startswith("mask")), \
        "\n".join(line for line in lines if not line.startswith("mask"))


@pytest.mark.parametrize("dtype", ["f32", "f16"])
@pytest.mark.parametrize("m, n, h, hkv, d, masks", PREFILL_CASES)
def test_triton_prefill(m, n, h, hkv, d, masks, dtype):
    mask_lines, extra = split_masks(masks)
    spec = sigmoid_spec(dtype, mask_lines, extra)
    sizes = {"B": 2, "H": h, "HKV": hkv, "M": m, "N": n, "D": d, "DV": d}
    run_and_check(spec, sizes, kwargs=prefill_kwargs(spec, sizes))


def test_triton_very_negative_scores_give_zero_not_nan():
    """2^-s overflows to inf for s far below 0: the weight is 0 (the reference's ~1e-87), never NaN; the lse is
    -inf where every weight of a row is below float32's range (ir.Sigmoid), else exact (shift 60: ~1e-26)."""
    spec = sigmoid_spec("f32", extra="param shift: f32", score="qk * rsqrt(D) - shift")
    sizes = {"B": 1, "H": 2, "HKV": 2, "M": 20, "N": 40, "D": 16, "DV": 16}
    q, k, v = qkv(spec, sizes)
    run_and_check(spec, sizes, kwargs={"shift": 60.0}, tensors=(q, k, v))
    (out, lse), (want, _) = attnc.compile(spec)(q, k, v, shift=200.0), attnc.reference(spec, q, k, v, shift=200.0)
    assert_matches(replace(spec, returns_lse=False), out, want)
    assert bool((out.abs() < 1e-30).all()) and not lse.isnan().any()


def split_launches(monkeypatch) -> list[int]:
    """The split counts of the decode launches made while the test runs."""
    import attnc.backends.triton.serving as serving

    launches = []
    original = serving.DecodeLauncher.calls
    monkeypatch.setattr(serving.DecodeLauncher, "calls", lambda self, bound, go, *a: (
        launches.append(go.splits), original(self, bound, go, *a))[1])
    return launches


@pytest.mark.parametrize("dtype", ["f32", "f16"])
@pytest.mark.parametrize("m, n, ratio", [(1, 200, 4), (3, 97, 1)])
def test_triton_split_kv_decode_sums_the_splits(m, n, ratio, dtype, monkeypatch):
    spec = sigmoid_spec(dtype)
    launches = split_launches(monkeypatch)
    q = torch.randn(2, 2 * ratio, m, 64, device=DEVICE).to(TORCH[dtype])
    k, v = (torch.randn(2, 2, n, 64, device=DEVICE).to(TORCH[dtype]) for _ in range(2))
    (split,) = check(spec, q, k, v, splits=(3,))
    assert launches == [3]
    (whole,) = check(spec, q, k, v, splits=(1,))
    torch.testing.assert_close(split[0].float(), whole[0].float(), **{"rtol": TOL[dtype], "atol": TOL[dtype]})


def test_triton_paged_decode_with_splits(monkeypatch):
    spec = sigmoid_spec("f32", layout="B, M, H, D", kv="PAGES, PAGE, HKV, D",
                        extra="paged k, v by table, lens")
    launches = split_launches(monkeypatch)
    k, v, table, lens = paged_cache([0, 1, 37, 100], 16, 2, 64, torch.float32)
    q = torch.randn(4, 2, 8, 64, device=DEVICE)
    check(spec, q, k, v, splits=(1, 4), table=table, lens=lens)
    assert launches == [1, 4]


@pytest.mark.parametrize("dtype", ["f32", "f16"])
def test_triton_varlen_with_splits_and_empty_sequences(dtype, monkeypatch):
    spec = sigmoid_spec(dtype, layout="T, H, D", kv="TK, HKV, D", extra="ragged q by cu_q\nragged k, v by cu_k")
    launches = split_launches(monkeypatch)
    q_lengths, k_lengths = [1, 0, 5, 2], [40, 3, 150, 0]
    q = torch.randn(sum(q_lengths), 4, 32, device=DEVICE).to(TORCH[dtype])
    k, v = (torch.randn(sum(k_lengths), 2, 32, device=DEVICE).to(TORCH[dtype]) for _ in range(2))
    results = check(spec, q, k, v, splits=(None, 3), cu_q=offsets(q_lengths), cu_k=offsets(k_lengths))
    assert launches[-1] > 1  # 3, or fewer where the longest sequence has fewer key tiles
    for out, lse in results:  # sequence 3 has no key: its rows are 0 and -inf
        assert bool((out[6:] == 0).all()) and bool((lse[:, 6:] == -INF).all())


# ---------------------------------------------------------------- TVM on the CPU, TVM CUDA source


@pytest.fixture
def tvm_nan_outputs(monkeypatch):
    pytest.importorskip("tvm")  # the GPU machine has no TVM compiler: these tests run in CI
    import attnc.backends.tvm.launch as tvm_launch

    monkeypatch.setattr(tvm_launch, "empty",
                        lambda shape, dtype, device: torch.full(shape, math.nan, dtype=dtype, device=device))


@pytest.mark.parametrize("dtype", ["f32", "f16"])
def test_tvm_cpu(dtype, tvm_nan_outputs):
    """Prefill and decode schedules, GQA, D = 48, rows with no key (M > N), a window, one kernel for every shape;
    scores shifted far below 0 (2^-s overflows) give weights of 0, not NaN."""
    spec = sigmoid_spec(dtype, "mask causal\nmask i + (N - M) - j < w", "param w: i32 = 9\nparam shift: f32 = 0.0",
                        score="qk * rsqrt(D) - log(N) - shift")
    kernel = attnc.compile(spec, backend="tvm")
    for b, h, hkv, m, n in [(2, 4, 2, 70, 130), (1, 2, 1, 1, 77), (2, 2, 2, 20, 9)]:
        sizes = {"B": b, "H": h, "HKV": hkv, "M": m, "N": n, "D": 48, "DV": 48}
        q, k, v = qkv(spec, sizes, "cpu")
        assert_matches(spec, kernel(q, k, v), attnc.reference(spec, q, k, v))
    (out, lse), (want, _) = kernel(q, k, v, shift=200.0), attnc.reference(spec, q, k, v, shift=200.0)
    assert_matches(replace(spec, returns_lse=False), out, want)
    assert not lse.isnan().any()  # -inf: every weight is below float32's range (ir.Sigmoid)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc (CUDA kernels are built by it)")
@pytest.mark.parametrize("dtype", ["bf16", "f32"])
def test_tvm_cuda_source_has_no_running_max(dtype):
    """The CUDA kernel (tensor cores for bf16, the plain GPU kernel for f32) builds; sigmoid keeps no row max,
    so its source has fewer max operations than the softmax kernel's."""
    pytest.importorskip("tvm")
    from attnc.backends.tvm import aot

    spec = sigmoid_spec(dtype)
    softmax = attnc.parse(spec.canonical.replace("return sigmoid", "return softmax"))[0]
    sources = [aot.emit_source(s, "cuda", "sm_90a", 64) for s in (spec, softmax)]
    assert all("extern \"C\" __global__" in src for src in sources)
    assert sources[0].count("max(") < sources[1].count("max(")


# ---------------------------------------------------------------- on the GPU


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["bf16", "f16"])
@pytest.mark.parametrize("m, n, h, hkv, d", [(1, 8192, 32, 8, 128), (300, 1000, 8, 2, 64), (1000, 1000, 4, 4, 96)])
def test_triton_prefill_and_split_kv_gpu(dtype, m, n, h, hkv, d):
    spec = sigmoid_spec(dtype)
    sizes = {"B": 2, "H": h, "HKV": hkv, "M": m, "N": n, "D": d, "DV": d}
    q, k, v = qkv(spec, sizes, "cuda")
    check(spec, q, k, v, splits=(None, 1, 16) if m == 1 else (None,))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["bf16", "f16"])
def test_triton_paged_and_varlen_gpu(dtype):
    paged = sigmoid_spec(dtype, layout="B, M, H, D", kv="PAGES, PAGE, HKV, D", extra="paged k, v by table, lens")
    k, v, table, lens = paged_cache([5000, 0, 1, 4099], 16, 8, 128, TORCH[dtype], device="cuda")
    q = torch.randn(4, 1, 32, 128, device="cuda").to(TORCH[dtype])
    check(paged, q, k, v, splits=(None, 1, 9), table=table, lens=lens)
    varlen = sigmoid_spec(dtype, layout="T, H, D", kv="TK, HKV, D", extra="ragged q by cu\nragged k, v by cu")
    lengths = [1, 0, 2048, 513, 77]
    q = torch.randn(sum(lengths), 16, 128, device="cuda").to(TORCH[dtype])
    k, v = (torch.randn(sum(lengths), 4, 128, device="cuda").to(TORCH[dtype]) for _ in range(2))
    check(varlen, q, k, v, cu=offsets(lengths, "cuda"))
