"""No user text in generated source (issue 15): sizes, params and input tensors reach Triton, Python and TVM code
only through attnc/backends/names.py, whatever they are called (`start`, `tl`, `def`, `a` beside `a_s0`), and a
decorated function's name never does."""
import io
import keyword
import re
import tokenize
from pathlib import Path

import pytest
import torch

import attnc
from attnc.backends import names
from attnc.dsl.check import check_attention
from attnc.backends.triton.backward import generate_backward
from attnc.backends.triton.decode import generate_decode
from attnc.backends.triton.generate import generate
from attnc.passes import PlanOptions, Target, plan_kernel

pytestmark = pytest.mark.shared_cache

TRITON_DIR = Path(attnc.__file__).parent / "backends" / "triton"
GOLDEN = Path(__file__).resolve().parent / "golden"
SPECS = Path(__file__).resolve().parent.parent / "examples" / "specs"

# Names the templates use (start, end, tl, triton, q_ptr, i_row, BLOCK_M, x0 from the emitter's temporaries),
# Python keywords and builtins (def, lambda, range), and a pair whose strides would meet (a, a_s0; x, x__0).
HOSTILE = ("start", "end", "tl", "triton", "q_ptr", "i_row", "BLOCK_M", "x0", "def", "lambda", "range", "a",
           "a_s0", "x", "x__0")
# The same spec with names that mean nothing to any template, in the same sorted order as HOSTILE (declarations are
# sorted by name, so both specs lay out their arguments alike).
PLAIN = {name: f"zq{rank:02d}" for rank, name in enumerate(sorted(HOSTILE))}
TABLES = ("start", "tl", "q_ptr", "i_row", "def", "a", "a_s0", "x__0")  # inputs f32[H] / f32[M]
PARAMS = ("end", "triton", "BLOCK_M", "x0", "lambda", "range", "x")  # f32 params
SIZE = "S"  # a free size, bound by the `x` table


def _text(rename=lambda n: n) -> str:
    r = rename
    tables = "\n".join(f"    input {r(t)}: f32[H]" for t in TABLES[:-1])
    params = "\n".join(f"    param {r(p)}: f32 = {0.25 * (n + 1)}" for n, p in enumerate(PARAMS))
    terms = " + ".join(f"{r(t)}[h] * {r(p)}" for t, p in zip(TABLES, PARAMS))
    return f"""attention hostile {{
    q: f32[B, H, M, D]  k: f32[B, H, N, D]  v: f32[B, H, N, D]
{tables}
    input {r(TABLES[-1])}: f32[{SIZE}]
{params}
    score = qk * rsqrt(D) + {terms.replace(f"{r(TABLES[-1])}[h]", f"{r(TABLES[-1])}[i % {SIZE}]")}
    mask causal
    return softmax(score) @ v, lse
}}"""


def _call_args(gen: torch.Generator, rename=lambda n: n) -> dict:
    args = {rename(t): torch.randn(2, generator=gen) for t in TABLES[:-1]}
    args[rename(TABLES[-1])] = torch.randn(5, generator=gen)
    args.update({rename(p): 0.5 + n / 10 for n, p in enumerate(PARAMS)})
    return args


def test_hostile_names_parse_as_written():
    spec = attnc.parse(_text())[0]
    assert {t.name for t in spec.inputs} == set(TABLES) and {p.name for p in spec.params} == set(PARAMS)
    plain = attnc.parse(_text(PLAIN.get))[0]
    assert [PLAIN[t.name] for t in spec.inputs] == [t.name for t in plain.inputs]
    assert [PLAIN[p.name] for p in spec.params] == [p.name for p in plain.params]


def _identifiers(source: str) -> list[str]:
    return [t.string for t in tokenize.generate_tokens(io.StringIO(source).readline) if t.type == tokenize.NAME]


# The roles' alternatives of names.MANGLED, a group: `(sz|cap|...)`.
ROLE = names.MANGLED.pattern[:names.MANGLED.pattern.index(")_") + 1]


def _renamed(source: str) -> str:
    """`source` of the PLAIN spec with each mangled PLAIN name turned into the mangled HOSTILE one."""
    back = {v: k for k, v in PLAIN.items()}
    return re.sub(rf"\b{ROLE}_(zq[0-9][0-9])\b", lambda m: f"{m[1]}_{back[m[2]]}", source)


def _without_key(source: str) -> str:
    """The text without the spec's key and with any run of white space as one space (names of other lengths
    wrap a signature elsewhere)."""
    return " ".join(re.sub(r"from attention \[[0-9a-f]+\]", "", source).split())


@pytest.mark.parametrize("target", [Target("triton", "cpu", None), Target("triton", "cuda", 90)],
                         ids=["interpreter", "sm90"])
def test_triton_source_holds_user_names_only_mangled(target):
    """The hostile spec's kernels are the plain spec's, name for mangled name: no user name is emitted as written,
    and none meets a template's."""
    for make in (generate, generate_decode, generate_backward):
        hostile = make(plan_kernel(attnc.parse(_text())[0], target, 16, 16, PlanOptions()))
        plain = make(plan_kernel(attnc.parse(_text(PLAIN.get))[0], target, 16, 16, PlanOptions()))
        compile(hostile, "hostile.py", "exec")
        assert _without_key(hostile) == _without_key(_renamed(plain))
        assert "zq" not in _renamed(plain)  # every plain name it holds is mangled


def test_tvm_kernel_holds_user_names_only_mangled():
    pytest.importorskip("tvm")
    from attnc.backends.tvm.kernel import build_primfunc, parameter_names
    from attnc.backends.tvm.schedule import prefill_schedule

    from attnc.backends.tvm.backward import build_backward_primfuncs

    def scripts(rename):
        """The forward's and the backward functions' TVMScript, and the forward's parameter names."""
        spec = attnc.parse(_text(rename))[0]
        plan = plan_kernel(spec, Target("tvm", "cpu", None), 16, 16, PlanOptions())
        backward = build_backward_primfuncs(plan, prefill_schedule(8))
        return ([build_primfunc(plan, prefill_schedule(8)).script(), *(f.script() for f in backward.values())],
                parameter_names(spec))

    (hostile, params), (plain, plain_params) = scripts(lambda n: n), scripts(PLAIN.get)
    assert len(hostile) == 4  # the forward and the backward's rows, keys and finish functions
    for got, want in zip(hostile, plain, strict=True):
        assert got == _renamed(want) and "zq" not in _renamed(want)
    assert params == tuple(_renamed(p) for p in plain_params) and len(set(params)) == len(params)


def _assert_close(got, want, tol=2e-5):
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, rtol=tol, atol=tol)


@pytest.mark.parametrize("backend", ["triton", "tvm"])
def test_hostile_names_compile_and_compute(backend):
    if backend == "tvm":
        pytest.importorskip("tvm")
    spec = attnc.parse(_text())[0]
    gen = torch.Generator().manual_seed(15)
    q, k, v = (torch.randn(2, 2, 37, 16, generator=gen) for _ in range(3))
    args = _call_args(gen)
    got = attnc.compile(spec, backend=backend)(q, k, v, **args)
    _assert_close(got, attnc.reference(spec, q, k, v, **args))


@pytest.mark.parametrize("backend", ["triton", "tvm"])
def test_hostile_names_train(backend):
    """The backward kernels name the tables' gradients and strides after the spec too: every gradient against
    autograd through the float64 reference."""
    if backend == "tvm":
        pytest.importorskip("tvm")
    spec = attnc.parse(_text())[0]
    gen = torch.Generator().manual_seed(18)
    qkv = [torch.randn(1, 2, 21, 16, generator=gen) for _ in range(3)]
    args = _call_args(gen)
    read = TABLES[:len(PARAMS)]  # the tables the score reads (each times a param)
    tables = [args[t] for t in read]
    dout, dlse = torch.randn(1, 2, 21, 16, generator=gen), torch.randn(1, 2, 21, generator=gen)

    def grads(fn):
        leaves = [x.clone().requires_grad_() for x in qkv + tables]
        out, lse = fn(*leaves[:3], **{**args, **dict(zip(read, leaves[3:]))})
        return torch.autograd.grad((out * dout).sum() + (lse * dlse).sum(), leaves)

    want = grads(lambda *a, **kw: attnc.reference(spec, *a, **kw))  # computed in float64
    got = grads(attnc.compile(spec, backend=backend))
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4 * w.abs().max().item())


def test_decode_kernel_with_hostile_names_computes():
    """M = 1 runs the decode template (split-KV), which names the spec's tensors too."""
    spec = attnc.parse(_text())[0]
    gen = torch.Generator().manual_seed(16)
    q = torch.randn(2, 2, 1, 16, generator=gen)
    k, v = (torch.randn(2, 2, 300, 16, generator=gen) for _ in range(2))
    args = _call_args(gen)
    got = attnc.compile(spec, backend="triton")(q, k, v, **args)
    _assert_close(got, attnc.reference(spec, q, k, v, **args))


PAYLOAD = "import os; os._exit(7)"


def _decorated():
    def alibi(q, k, v, *, tl: attnc.Tensor, start: float = 0.5):
        s = (q @ k) * q.D ** -0.5 + tl[q.head] * start * (k.pos - q.pos)
        return attnc.softmax(s, where=attnc.causal(q, k)) @ v

    alibi.__name__ = alibi.__qualname__ = f"alibi\n{PAYLOAD}\n#"
    return attnc.attention(alibi)


@pytest.mark.parametrize("backend", ["triton", "tvm"])
def test_a_decorated_function_name_never_reaches_source(backend):
    if backend == "tvm":
        pytest.importorskip("tvm")
    fn = _decorated()
    gen = torch.Generator().manual_seed(17)
    q, k, v = (torch.randn(1, 2, 20, 16, generator=gen) for _ in range(3))
    slopes = torch.rand(2, generator=gen)
    fn.backend = backend
    got = fn(q, k, v, tl=slopes, start=0.7)
    assert fn.spec.name == "traced_attention"
    _assert_close([got], [attnc.reference(fn.spec, q, k, v, tl=slopes, start=0.7)])
    plan = plan_kernel(fn.spec, Target("triton", "cpu", None), 16, 16, PlanOptions())
    for source in (generate(plan), generate_decode(plan), fn.spec.canonical):
        assert PAYLOAD not in source and "alibi" not in source


@pytest.mark.parametrize("bad", ["a\nb", "λ", "1x", "mask", ""])
def test_names_the_language_cannot_write_are_spec_errors(bad):
    """IR built in Python (decorator arguments, captured tensors, hand-made specs) is checked for names too."""
    from attnc import ir

    spec = attnc.parse(_text())[0]
    with pytest.raises(attnc.SpecError, match="not a name|cannot name|reserved"):
        check_attention(ir.make_attention("x", spec.q, spec.k, spec.v, params=[ir.ParamDecl(bad, "f32")]))
    with pytest.raises(attnc.SpecError, match="is not a name"):
        check_attention(ir.with_name(spec, bad))


def test_templates_and_emitters_name_nothing_with_a_user_prefix():
    """The mangled names' prefixes are the user's alone: a template or emitter that names its own variable
    `t_start` would meet the input `start`. Read: the templates' text, the emitters' string literals but docstrings
    (the code and TIR variable names they write). The fixed roles' sizes (sz_N, cap_M) are mangled names themselves."""
    role_sizes = {names.size(r) for r in attnc.ir.ROLES + ("T", "TK", "PAGE", "PAGES", "MAXP")}
    role_sizes |= {names.capacity(r) for r in ("M", "N")}
    for path in [*TRITON_DIR.glob("*.j2"), *TRITON_DIR.glob("*.py"), *(TRITON_DIR.parent / "tvm").glob("*.py")]:
        text = path.read_text()
        if path.suffix == ".py":
            text = " ".join(t.string for t in tokenize.generate_tokens(io.StringIO(text).readline)
                            if t.type == tokenize.STRING and not t.string.endswith('"""'))  # no docstrings
        text = re.sub(r"\{[{%#].*?[}%#]\}", " ", text, flags=re.S)  # jinja blocks
        own = {w for w in re.findall(r"[A-Za-z_][A-Za-z0-9_]*", text) if names.MANGLED.fullmatch(w)}
        assert own <= role_sizes, f"{path.name} names {sorted(own - role_sizes)} with a user prefix"


def test_golden_sources_hold_no_user_name_as_written():
    """Every golden file: each name its spec declares appears only mangled, the spec's name not at all."""
    from test_triton_golden import CASES, GLUON_CASES

    template = set(_identifiers(generate(plan_kernel(attnc.parse(_text(PLAIN.get))[0], Target(
        "triton", "cpu", None), 16, 16, PlanOptions()))))  # what the templates name on their own
    seen = set()
    for golden, file, name, _, _ in CASES + GLUON_CASES:
        spec = next(s for s in attnc.parse_file(SPECS / file) if s.name == name)
        source = (GOLDEN / golden).read_text()
        user = ({p.name for p in spec.params} | {t.name for t in spec.inputs}
                | {n for t in spec.inputs for n in t.shape} - set(attnc.ir.ROLES))
        identifiers = _identifiers(source)
        assert not {w for w in identifiers if w in user} - template, golden
        mangled = {w.split("_", 1)[1] for w in identifiers if names.MANGLED.fullmatch(w)}
        assert mangled <= user | set(attnc.ir.ROLES), golden
        assert spec.name in user or spec.name not in source, golden
        seen |= user & mangled
    assert {"slopes", "doc", "sinks", "window"} <= seen  # the goldens do pass user names


def test_mangling_is_injective_and_never_a_keyword():
    made = {}
    for name in HOSTILE + ("_", "__", "_a", "a_", "s0", "st0_a", "p_x", "g", "st0", "gst0_a", "p"):
        for role, fn in (("size", names.size), ("capacity", names.capacity), ("param", names.param),
                         ("tensor", names.tensor), ("gradient", names.gradient),
                         ("partials", names.gradient_partials)):
            made.setdefault(fn(name), []).append((role, name))
        for axis in (0, 1, 10):
            made.setdefault(names.stride(name, axis), []).append((f"stride {axis}", name))
        for axis in (0, 1, 10, "p"):
            made.setdefault(names.gradient_stride(name, axis), []).append((f"gradient stride {axis}", name))
    assert all(len(v) == 1 for v in made.values()), [v for v in made.values() if len(v) > 1]
    assert not any(keyword.iskeyword(m) for m in made) and all(names.MANGLED.fullmatch(m) for m in made)
    with pytest.raises(ValueError):
        names.param("a\nb")
