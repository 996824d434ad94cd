"""The operator table (attnc/ops.py): one entry per operator; each entry's folding and reference semantics
agree; its derivative rule matches torch.autograd; the float formulas (tanh, erf) are accurate in f32 as Triton
(in its interpreter) and TVM's CPU code compute them; erf, sin and cos work end to end from every front-end;
and expressions that share subexpressions (`score = score + score`, repeated) are checked, planned, emitted
and evaluated in time linear in their DAG."""
import importlib.util
import math
import random
import shutil
import sys
import time

import numpy as np
import pytest
import torch

import attnc
from attnc import ir, ops
from attnc.dsl import reference as ref
from attnc.dsl.flex import flex_spec
from attnc.passes.fold import NotConstant, evaluate

pytestmark = pytest.mark.shared_cache

HEADER = "q: f32[B, H, M, D]  k: f32[B, H, N, D]  v: f32[B, H, N, D]"


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    """Kernel outputs start as NaN (Triton and TVM), so an element a kernel fails to write fails the check."""
    import attnc.backends.triton.launch as launch

    monkeypatch.setattr(launch, "empty", launch.nan_empty)
    try:
        import attnc.backends.tvm.launch as tvm_launch
    except ImportError:  # no TVM (the GPU machine): the TVM tests skip
        return
    monkeypatch.setattr(tvm_launch, "empty", launch.nan_empty)


def _spec(body: str, name: str = "t") -> ir.Attention:
    return attnc.parse(f"attention {name} {{ {HEADER}\n{body}\nreturn softmax(score) @ v, lse }}")[0]


def _assert_close(spec, got, q, k, v, rtol: float, **kwargs):
    """out within rtol of the reference relative to its largest value, lse within rtol of each row's."""
    (out, lse), (want, want_lse) = got, attnc.reference(spec, q, k, v, **kwargs)
    assert not out.isnan().any() and not lse.isnan().any()
    assert (out.double() - want).abs().max() <= rtol * max(1.0, want.abs().max().item())
    assert ((lse.double() - want_lse).abs() / want_lse.abs().clamp(min=1.0)).max() <= rtol


# ---------------------------------------------------------------- the table


def test_one_entry_per_operator_and_function():
    keys = [(op.node, op.name) for op in ops.OPS]
    assert len(keys) == len(set(keys))
    assert {op.name for op in ops.OPS if op.node is ir.Binary} == set(ir.ARITH_OPS + ir.COMPARE_OPS + ir.LOGIC_OPS)
    assert {op.name for op in ops.OPS if op.node is ir.Unary} == {"neg", "not"}
    assert {"erf", "sin", "cos", "tanh", "where", "min", "max"} <= set(ops.FUNCTIONS)
    for op in ops.OPS:
        assert op.derivative is None and op.about_derivative or len(op.derivative) == op.arity, op.name
        assert op.result in ("bool", "float", "common") and set(op.operands) <= {"number", "integer", "bool", "any"}


def _operands(op: ops.Op, rng: random.Random):
    """Random Python operands of the kinds the checker accepts for `op`."""
    def number():
        return rng.choice([rng.randint(-7, 7), rng.uniform(-3, 3), rng.choice([0, 0.0, 2, -1.5])])

    either = rng.choice(["bool", "number"])
    return [rng.random() < 0.5 if role == "bool" or (role == "any" and either == "bool")
            else rng.randint(-9, 9) if role == "integer" else number()
            for role in op.operands]


def _env() -> ref._Env:
    return ref._Env(index={}, qk=torch.empty(0), sizes={}, params={}, inputs={}, input_decls={},
                    device=torch.device("cpu"))


def _node(op: ops.Op, args) -> ir.Expr:
    if op.node is ir.Unary:
        return ir.Unary(op.name, args[0])
    if op.node is ir.Binary:
        return ir.Binary(op.name, *args)
    return ir.Call(op.name, tuple(args))


@pytest.mark.parametrize("op", ops.OPS, ids=lambda op: op.name)
def test_folding_and_reference_agree(op):
    """An entry's Python value (constant folding) and its torch value (the reference) are the same number of
    the same kind, for random operands; the checker's kind rule (ops.Kinds) gives that kind."""
    rng = random.Random(op.name)
    spec = _spec("score = qk")
    for _ in range(200):
        values = _operands(op, rng)
        e = _node(op, [ir.Num(x, isinstance(x, float)) for x in values])
        try:
            folded = evaluate(e, {})
        except NotConstant:  # a domain error (log(-1), x % 0): the kernels compute NaN or are refused
            continue
        evaluated = ref.evaluate(e, _env())
        kind = ops.expr_type(e, spec)
        assert {"bool": torch.bool, "int": torch.int64, "float": torch.float64}[kind] == evaluated.dtype, values
        assert isinstance(folded, {"bool": bool, "int": int, "float": float}[kind]), (values, folded)
        if isinstance(folded, float) and math.isnan(folded):
            assert evaluated.isnan(), values
        else:
            assert math.isclose(float(evaluated), float(folded), rel_tol=1e-12, abs_tol=1e-300), values


# Where each function's derivative is checked: inside its domain, away from kinks and ties.
_DOMAIN = {"log": (0.1, 4.0), "log2": (0.1, 4.0), "sqrt": (0.1, 4.0), "rsqrt": (0.1, 4.0), "%": (0.2, 3.0)}


@pytest.mark.parametrize("op", [op for op in ops.OPS if op.derivative], ids=lambda op: op.name)
def test_derivative_rules_match_autograd(op):
    rng = random.Random(op.name)
    lo, hi = _DOMAIN.get(op.name, (-3.0, 3.0))
    for _ in range(20):
        values = [rng.random() < 0.5 if role == "bool" else rng.uniform(lo, hi) for role in op.operands]
        if op.name == "%" and abs(values[0] / values[1] - round(values[0] / values[1])) < 1e-3:
            continue  # a jump of the remainder
        leaves = [torch.tensor(x, dtype=torch.bool if isinstance(x, bool) else torch.float64,
                               requires_grad=not isinstance(x, bool)) for x in values]
        grads = torch.autograd.grad(op.torch(torch, *leaves), [t for t in leaves if t.requires_grad])
        args = tuple(ir.ParamRef(f"a{n}") for n in range(op.arity))
        env = {f"a{n}": x for n, x in enumerate(values)}
        wanted = iter(grads)
        for rule, value in zip(op.derivative, values):
            if rule is None:
                assert isinstance(value, bool)
                continue
            got = evaluate(rule(args, _node(op, args)), env)
            assert math.isclose(got, float(next(wanted)), rel_tol=1e-9, abs_tol=1e-12), (op.name, values)


def test_min_max_split_ties_as_torch_does():
    for name in ("min", "max"):
        op = ops.function(name)
        args = (ir.ParamRef("a"), ir.ParamRef("b"))
        leaves = [torch.tensor(1.5, dtype=torch.float64, requires_grad=True) for _ in range(2)]
        grads = torch.autograd.grad(op.torch(torch, *leaves), leaves)
        assert [evaluate(rule(args, _node(op, args)), {"a": 1.5, "b": 1.5}) for rule in op.derivative] \
            == [float(g) for g in grads] == [0.5, 0.5]


# ---------------------------------------------------------------- the float formulas in f32

_GRID = torch.cat([torch.linspace(-12, 12, 24001), torch.logspace(-30, 1.3, 2001), -torch.logspace(-30, 1.3, 2001),
                   torch.tensor([0.0, 0.625, -0.625, 0.9, -0.9, 3.92, 4.0, 50.0, 1e30])]).float()
_SPECIAL = torch.tensor([math.inf, -math.inf, math.nan])
_TRUTH = {"tanh": torch.tanh, "erf": torch.erf}


def _ulps(got: torch.Tensor, x: torch.Tensor, name: str) -> float:
    truth = _TRUTH[name](x.double())
    ulp = torch.from_numpy(np.spacing(truth.abs().float().numpy())).double()
    return ((got.double() - truth).abs() / ulp).max().item()


def _check_specials(got: torch.Tensor) -> None:
    assert got[0] == 1 and got[1] == -1 and got[2].isnan()  # tanh and erf: +-inf -> +-1, NaN propagates


def _triton_values(tmp_path, name: str, x: torch.Tensor) -> torch.Tensor:
    """The function as a generated kernel computes it: the emitter's code for `name(qk)`, in a small kernel."""
    from attnc.backends.triton.emit import TILE, Emitter

    em = Emitter(_spec("score = qk"))
    with em.scope() as lines:
        result = em.at(em.value(ir.Call(name, (ir.QK(),))), TILE)
    body = "\n".join(f"    {line}" for line in lines)
    path = tmp_path / f"formula_{name}.py"
    path.write_text("import triton\nimport triton.language as tl\n\n\n@triton.jit\n"
                    "def f(x_ptr, y_ptr, n, BLOCK: tl.constexpr):\n"
                    "    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)\n"
                    "    qk = tl.load(x_ptr + offs, mask=offs < n, other=0.0)\n"
                    f"{body}\n    tl.store(y_ptr + offs, {result}, mask=offs < n)\n")
    spec = importlib.util.spec_from_file_location(f"formula_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    y = torch.full_like(x, math.nan)
    module.f[(-(-x.numel() // 4096),)](x, y, x.numel(), BLOCK=4096)
    return y


def _tvm_values(name: str, x: torch.Tensor) -> torch.Tensor:
    """The function as TVM's CPU kernels compute it (ops.Formula over the vectorizable exp2), vectorized."""
    tvm = pytest.importorskip("tvm")
    from tvm.script.ir_builder import IRBuilder
    from tvm.script.ir_builder import tirx as T

    from attnc.backends.tvm.emit import float_function
    from attnc.backends.tvm.host import host_cpu

    with IRBuilder() as ib:
        with T.prim_func():
            T.func_name("f")
            xs = T.match_buffer(T.arg("x", T.handle()), (x.numel(),), "float32")
            ys = T.match_buffer(T.arg("y", T.handle()), (x.numel(),), "float32")
            with T.serial(0, x.numel() // 16) as o:
                with T.vectorized(0, 16) as i:
                    T.buffer_store(ys, float_function(name, xs[o * 16 + i]), [o * 16 + i])
    fn = tvm.compile(tvm.IRModule({"f": ib.get()}), target=host_cpu().target())["f"]
    y = torch.full_like(x, math.nan)
    fn(x, y)
    return y


@pytest.mark.parametrize("name, triton_ulps, tvm_ulps", [("tanh", 2.0, 3.0), ("erf", 2.0, 3.0)])
def test_float_formulas_are_accurate_in_f32(tmp_path, name, triton_ulps, tvm_ulps):
    """tanh and erf to a few ulp over the whole range (tanh no longer cancels near 0: softcap with a large cap
    divides the score by it first), on the Triton interpreter (exact exp2) and TVM (its polynomial exp2)."""
    x = torch.cat([_GRID, _SPECIAL, torch.zeros(-(_GRID.numel() + 3) % 16)])
    finite = slice(0, _GRID.numel())
    got = _triton_values(tmp_path, name, x)
    assert _ulps(got[finite], x[finite], name) <= triton_ulps
    _check_specials(got[_GRID.numel():])
    got = _tvm_values(name, x)
    assert _ulps(got[finite], x[finite], name) <= tvm_ulps
    _check_specials(got[_GRID.numel():])


SOFTCAP = """
attention softcap {
    q: f32[B, H, M, D]  k: f32[B, H, N, D]  v: f32[B, H, N, D]
    param cap: f32
    score = cap * tanh(score / cap)
    mask causal
    return softmax(score) @ v, lse
}
"""


@pytest.mark.parametrize("backend", ["triton", "tvm"])
def test_softcap_is_accurate_for_every_cap(backend):
    """cap * tanh(s / cap) to 1e-5 relative in f32 for caps 1 .. 1e9 (1 - 2 / (exp(2x) + 1) lost 0.07 at 1e6)."""
    if backend == "tvm":
        pytest.importorskip("tvm")
    spec = attnc.parse(SOFTCAP)[0]
    kernel = attnc.compile(spec, backend=backend)
    torch.manual_seed(0)
    q, k, v = (3 * torch.randn(1, 2, 33, 16) for _ in range(3))
    for cap in (1.0, 1e3, 1e6, 1e9):
        _assert_close(spec, kernel(q, k, v, cap=cap), q, k, v, 1e-5, cap=cap)


# ---------------------------------------------------------------- erf, sin, cos from every front-end

ERF_SIN_COS = "score = score + erf(score) * sin(2.0 * score) - cos(score / 3.0)"


@pytest.mark.parametrize("backend", ["triton", "tvm"])
def test_erf_sin_cos_kernels_match_the_reference(backend):
    if backend == "tvm":
        pytest.importorskip("tvm")
    spec = _spec(ERF_SIN_COS + "\nmask causal")
    torch.manual_seed(1)
    q, k, v = (torch.randn(2, 2, 29, 16) for _ in range(3))
    _assert_close(spec, attnc.compile(spec, backend=backend)(q, k, v), q, k, v, 1e-5)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc (CUDA kernels are built by it)")
def test_cuda_kernel_renders_the_functions():
    """The TVM CUDA kernel (built by nvcc, no GPU needed) calls CUDA's erff, sinf and cosf and computes tanh by
    the table's formula (fast-math tanhf may be the hardware approximation)."""
    pytest.importorskip("tvm")
    import dataclasses

    from attnc.backends.tvm.backend import compile_module, cuda_target
    from attnc.backends.tvm.cuda import build_cuda_primfunc, cuda_schedule
    from attnc.passes import PlanOptions, Target
    from attnc.passes.pipeline import plan_kernel

    spec = attnc.parse(_doubling(6).replace("f32", "bf16").replace(
        "score = score + score\nmask", f"score = 30.0 * tanh(score / 30.0)\n{ERF_SIN_COS}\nmask"))[0]
    plan = plan_kernel(spec, Target("tvm", "cuda", 90), 64, 64, PlanOptions())
    sched = dataclasses.replace(cuda_schedule(plan), fold_scale=False)
    module = compile_module({"attn": build_cuda_primfunc(plan, sched)}, plan, cuda_target(90), "test")
    src = module.mod.imports[0].inspect_source()
    assert all(f"{fn}f(" in src for fn in ("erf", "sin", "cos")) and "tanhf(" not in src


def test_erf_sin_cos_trace_from_the_decorator_and_flex_mods():
    q, k, v = (torch.randn(1, 2, 8, 16) for _ in range(3))
    text = _spec(ERF_SIN_COS)

    @attnc.attention
    def decorated(q, k, v):
        s = (q @ k) * q.D ** -0.5
        return attnc.softmax(s + attnc.erf(s) * attnc.sin(2.0 * s) - attnc.cos(s / 3.0)) @ v

    assert decorated.trace(q, k, v).score == text.score

    def score_mod(score, b, h, q_idx, kv_idx):
        return score + torch.erf(score) * (2.0 * score).sin() - torch.cos(score / 3.0)

    assert flex_spec(q, k, v, score_mod).score == text.score


def test_function_names_come_from_the_table():
    for name in ops.UNARY_FUNCTIONS:
        assert callable(getattr(attnc, name))
    with pytest.raises(attnc.SpecError, match="unknown function 'erff'; did you mean 'erf'"):
        _spec("score = erff(score)")
    with pytest.raises(attnc.SpecError, match="sin takes 1 argument, got 2"):
        _spec("score = sin(score, 2.0)")


# ---------------------------------------------------------------- linear in the DAG


def _doubling(lines: int, masks: str = "mask causal") -> str:
    """`score = score + score` `lines` times after a score scaled down by as much: the same math as plain
    attention (powers of two are exact), as a DAG of `lines` nodes whose tree has 2^lines leaves."""
    body = f"score = qk * rsqrt(D) / {2 ** lines}\n" + "score = score + score\n" * lines + masks
    return f"attention doubling {{ {HEADER}\n{body}\nreturn softmax(score) @ v, lse }}"


def test_shared_subexpressions_check_plan_and_generate_in_linear_time():
    from attnc.backends.triton.decode import generate_decode
    from attnc.backends.triton.generate import generate
    from attnc.passes import PlanOptions, Target
    from attnc.passes.pipeline import plan_kernel

    text = _doubling(40)
    attnc.parse(_doubling(1))  # the grammar loads once
    start = time.perf_counter()
    spec = attnc.parse(text)[0]
    plan = plan_kernel(spec, Target("triton", "cpu", None), 16, 16, PlanOptions())
    sources = generate(plan), generate_decode(plan)
    again = attnc.parse(text)[0]
    assert again == spec and hash(again) == hash(spec) and again.key == spec.key
    assert time.perf_counter() - start < 1.0
    assert all(len(source) < 100_000 for source in sources)  # a line per distinct node, not per tree node
    # The reference evaluates each distinct node once, and computes plain causal attention.
    q, k, v = (torch.randn(1, 2, 12, 16) for _ in range(3))
    out, lse = attnc.reference(spec, q, k, v)
    logits = (q.double() @ k.double().transpose(-1, -2)) / 4.0 + torch.triu(torch.full((12, 12), -math.inf), 1)
    torch.testing.assert_close(out, torch.softmax(logits, -1) @ v.double(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, torch.logsumexp(logits, -1), rtol=1e-12, atol=1e-12)


def test_every_front_end_and_the_kernel_key_stay_linear_in_the_dag():
    """40 doubling lines from the decorator and from a flex score_mod trace, fold with compile-time sizes, and
    key a kernel (the plan's text numbers its expressions) in well under a second."""
    from attnc.backends import cache
    from attnc.passes import PlanOptions, Target
    from attnc.passes.fold import fold_spec
    from attnc.passes.pipeline import plan_kernel

    def doubled(q, k, v):
        s = (q @ k) * q.D ** -0.5 / 2**40
        for _ in range(40):
            s = s + s
        return attnc.softmax(s, where=attnc.causal(q, k)) @ v

    def score_mod(score, b, h, q_idx, kv_idx):
        score = score / 2**40
        for _ in range(40):
            score = score + score
        return score

    q = torch.randn(1, 2, 12, 16)
    attnc.attention(doubled).trace(q, q, q)  # tracing machinery warm
    start = time.perf_counter()
    traced = attnc.attention(doubled).trace(q, q, q)
    flexed = flex_spec(q, q, q, score_mod=score_mod)
    text = attnc.parse(_doubling(40))[0]
    folded = fold_spec(text, {"D": 16, "M": 12, "N": 12})
    plan = plan_kernel(text, Target("tvm", "cpu", None), 16, 16, PlanOptions())
    parts = cache.plan_parts(plan)
    assert time.perf_counter() - start < 1.0
    assert len(parts["plan"]) < 100_000 and ir.depth(folded.score) == 43
    # the same math as plain attention, causal (the decorator) or not (flex)
    for spec, plain in ((traced, text), (flexed, _spec("score = qk * rsqrt(D)"))):
        torch.testing.assert_close(attnc.reference(spec, q, q, q), attnc.reference(plain, q, q, q)[0], rtol=1e-12,
                                   atol=1e-12)


def test_shared_subexpressions_run_on_the_triton_interpreter_and_tvm():
    """40 doubling lines (2^40 leaves as a tree) compile and run on the Triton interpreter and on TVM's CPU kernel
    in seconds and equal the reference: TVM's kernels hold float values in register buffers, which TVM never
    substitutes into their uses (emit.bind)."""
    spec = attnc.parse(_doubling(40))[0]
    torch.manual_seed(3)
    q, k, v = (torch.randn(1, 2, 19, 16) for _ in range(3))
    start = time.perf_counter()
    got = attnc.compile(spec, backend="triton")(q, k, v)
    assert time.perf_counter() - start < 20
    _assert_close(spec, got, q, k, v, 1e-5)
    if importlib.util.find_spec("tvm") is None:
        return
    start = time.perf_counter()
    got = attnc.compile(spec, backend="tvm")(q, k, v)
    assert time.perf_counter() - start < 30  # through `Let`s 20 lines took 46 s, each line more doubling that
    _assert_close(spec, got, q, k, v, 1e-5)


def _integer_doubling(q, k, v, *, table: attnc.Tensor):
    """An integer DAG of 40 doubling lines (2^40 leaves as a tree) in a mask and in a lookup's index."""
    x = k.pos - q.pos
    for _ in range(40):
        x = x + x
    return attnc.softmax((q @ k) * q.D ** -0.5 + table[q.head, x % 5], where=x % 7 != 3) @ v


def _boolean_doubling(q, k, v, *, table: attnc.Tensor):
    """A mask that is a boolean DAG of 40 doubling lines (`&` would fold: a mask's conjuncts are deduplicated)."""
    keep = (k.pos - q.pos) % 3 != 1
    for _ in range(40):
        keep = keep | keep
    return attnc.softmax((q @ k) * q.D ** -0.5 + table[q.head, k.pos % 5], where=keep) @ v


@pytest.mark.parametrize("fn", [_integer_doubling, _boolean_doubling])
def test_shared_integer_and_boolean_subexpressions_build_on_tvm(fn):
    """Integer and boolean DAGs of 40 doubling lines build on TVM in seconds (the CPU forward and backward, and
    the CUDA kernel's TVM passes where nvcc is installed) and equal the reference: shared integer and boolean
    nodes are held in register buffers like float ones (emit.bind; TVM expanded them as trees: 15 integer lines
    took 13 s), and mask analysis looks at each node of an `or` once (passes.masks.interval_hull)."""
    pytest.importorskip("tvm")
    torch.manual_seed(4)
    q, k, v = (torch.randn(1, 2, 19, 16, requires_grad=True) for _ in range(3))
    table = torch.randn(2, 5)
    spec = attnc.attention(fn).trace(q, k, v, table=table)
    start = time.perf_counter()
    out = attnc.compile(spec, backend="tvm")(q, k, v, table=table)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    assert time.perf_counter() - start < 30  # about 2 s for the forward and 1.5 s for the backward on 2 cores
    want = attnc.reference(spec, q, k, v, table=table)
    assert (out.double() - want).abs().max() <= 1e-5 * max(1.0, want.abs().max().item())
    for got, expected in zip(grads, torch.autograd.grad(want, (q, k, v), dout.double())):
        assert (got.double() - expected).abs().max() <= 1e-5 * max(1.0, expected.abs().max().item())
    if shutil.which("nvcc") is None:
        return
    from attnc.backends.tvm.backend import compile_module, cuda_target
    from attnc.backends.tvm.cuda import build_cuda_kernel
    from attnc.passes import PlanOptions, Target
    from attnc.passes.pipeline import plan_kernel

    half = attnc.attention(fn).trace(*(x.detach().half() for x in (q, k, v)), table=table)
    plan = plan_kernel(half, Target("tvm", "cuda", 90), 16, 16, PlanOptions())
    start = time.perf_counter()
    compile_module({"attn": build_cuda_kernel(plan)[1]}, plan, cuda_target(90), "test")
    assert time.perf_counter() - start < 30


def test_checking_a_shared_subexpression_reports_its_error_once():
    text = _doubling(40).replace("qk * rsqrt(D)", "(qk + (i < j))")
    start = time.perf_counter()
    with pytest.raises(attnc.SpecError) as err:
        attnc.parse(text)
    assert time.perf_counter() - start < 1.0
    assert str(err.value).count("`+` needs numbers, but this is a boolean") == 1


@pytest.mark.parametrize("backend", ["triton", "tvm"])
def test_shared_subexpressions_compile_and_run(backend):
    """12 doubling lines (4096 leaves as a tree) compile quickly on both backends and compute attention: the
    TVM emitter binds each shared float node once (a register buffer) instead of copying it into every use."""
    if backend == "tvm":
        pytest.importorskip("tvm")
    spec = attnc.parse(_doubling(12))[0]
    torch.manual_seed(2)
    q, k, v = (torch.randn(2, 2, 37, 16) for _ in range(3))
    start = time.perf_counter()
    got = attnc.compile(spec, backend=backend)(q, k, v)
    assert time.perf_counter() - start < 60  # before: over 100 s from 8 lines on TVM, doubling per line
    _assert_close(spec, got, q, k, v, 1e-5)


# ---------------------------------------------------------------- integer division by zero


@pytest.mark.parametrize("backend", ["triton", "tvm"])
def test_integer_division_by_zero_gives_zero_in_kernels(backend):
    """x % 0 and x // 0 are 0 in the kernels, whether the zero comes at run time (a param) or from sizes folded at
    compile time (D - 16 with D = 16): x86's division traps on a zero divisor, which killed the process on TVM.
    The reference raises instead, so the kernels are compared with the same math written without the division."""
    if backend == "tvm":
        pytest.importorskip("tvm")
    spec = _spec("param w: i32 = 3\nscore = qk * rsqrt(D) + (j - i) // w + (i - j) // (D - 16)\nmask causal\n"
                 "mask (i - j) % w == 0 and (j + 1) % (D - 16) == 0")
    plain = _spec("mask causal")
    torch.manual_seed(5)
    q, k, v = (torch.randn(1, 2, 37, 16) for _ in range(3))
    kernel = attnc.compile(spec, backend=backend)
    _assert_close(plain, kernel(q, k, v, w=0), q, k, v, 1e-5)
    with pytest.raises(attnc.CallError, match="integer modulo by zero"):
        attnc.reference(spec, q, k, v, w=0)
    # a non-zero divisor divides: w = 3 keeps every third key on the diagonal's side, floored
    want = _spec("score = qk * rsqrt(D) + (j - i) // 3\nmask causal\nmask (i - j) % 3 == 0")
    _assert_close(want, kernel(q, k, v, w=3), q, k, v, 1e-5)


def test_half_precision_gpu_kernels_take_the_hardware_tanh():
    """GPU kernels over bf16 / f16 inputs, forward and backward, run tanh as tanh.approx.f32 (relative error 2^-11,
    FlashAttention's softcap; benchmarks/NOTES.md session 17 measures it); f32 kernels, the interpreter and
    PlanOptions(approx_functions=False) keep the formula above."""
    from attnc.backends.triton.backward import generate_backward
    from attnc.backends.triton.generate import generate
    from attnc.passes import PlanOptions, Target, plan_kernel

    gpu, interpreter = Target("triton", "cuda", 90), Target("triton", "cpu", None)

    def plan(dtype, target, options=PlanOptions()):
        return plan_kernel(attnc.parse(SOFTCAP.replace("f32[", f"{dtype}["))[0], target, 64, 64, options)

    for dtype in ("bf16", "f16"):
        p = plan(dtype, gpu)
        assert p.approximated() == ["tanh"] and "tanh by hardware approximation" in p.describe()
        for source in (generate(p), generate_backward(p)):
            assert "tanh.approx.f32" in source and "tanh_approx(" in source.split("def tanh_approx")[1]
    for p in (plan("f32", gpu), plan("bf16", interpreter), plan("bf16", gpu, PlanOptions(approx_functions=False))):
        assert p.approximated() == [] and "hardware approximation" not in p.describe()
        for source in (generate(p), generate_backward(p)):
            assert "tanh_approx" not in source and "tanh.approx" not in source
    # a spec without tanh defines no helper
    causal = attnc.parse(SOFTCAP.replace("f32[", "bf16[").replace("score = cap * tanh(score / cap)", ""))[0]
    assert "tanh_approx" not in generate(plan_kernel(causal, gpu, 64, 64, PlanOptions()))
