"""Untrusted index data and out-of-range lookups (issue 15; README "Safety", attnc/index_data.py).

Calls with bad page ids, lengths and offsets run in a subprocess (tests/fuzz/index.py): on the interpreter a
missed clamp is a segfault, which must fail a test, not end the suite. Each is checked against the model in
tests/fuzz/index.py (no out-of-bounds access, the rows bad data reaches are NaN, every other row equals the reference,
check_errors and validate mode raise exactly when a kernel must have met bad data); here the messages are checked
too. Out-of-range lookups read 0 on every backend and in the reference, and validate mode reports those that reach
the result; those tests run in process (a lookup's load is masked, never a stray gather).
"""
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

import attnc
from attnc import index_data
from attnc.passes import PlanOptions
from fuzz.index import D, Case, build

pytestmark = pytest.mark.shared_cache

WORKER = Path(__file__).resolve().parent / "fuzz" / "index.py"
CI_FUZZ_CASES = 40  # the CI share of the 1,000+ the full run takes (`python -m tests.fuzz.index --n 1000`)
ROOT = Path(__file__).resolve().parent.parent


def paged(corrupt, splits=None, lens=(5, 9, 3), m=2, page=4, maxp=3):
    return Case("paged", 7, splits, 2, [m] * len(lens), list(lens), page=page, maxp=maxp, spare_pages=2,
                corrupt=corrupt, validate=True)


def varlen(corrupt, kind="varlen", splits=None, q_lens=(2, 4), kv_lens=(4, 6)):
    q_lens = list(q_lens) if kind != "ragged_kv" else [2] * len(kv_lens)
    return Case(kind, 8, splits, 2, q_lens, list(kv_lens), corrupt=corrupt, validate=True)


PAGES = 2 + 3 + 1 + 2  # pages of paged(): ceil(5 / 4) + ceil(9 / 4) + ceil(3 / 4), and 2 spare
PAGE_ID = r"^block_table: block_table\[1, 0\] = {} is not a page id: k and v have PAGES = 8 pages \(sequence 1 has 9 keys"
LENGTH = r"^kv_len: kv_len\[2\] = {}, but a sequence holds 0 to MAXP \* PAGE = 12 keys \(its 3 block-table entries"
# (case, the message check_errors and validate mode must raise, or None for sound data)
FIXED = {
    "page id PAGES": (paged([("block_table", [1, 0], PAGES)]), PAGE_ID.format(PAGES)),
    "page id -1": (paged([("block_table", [1, 0], -1)], splits=3), PAGE_ID.format(-1)),
    "page id 1,000,000": (paged([("block_table", [1, 0], 1_000_000)]), PAGE_ID.format(1000000)),
    "page id -2^31, one page of one slot": (
        paged([("block_table", [0, 4], -2**31)], lens=(5, 1), page=1, maxp=9),
        r"^block_table: block_table\[0, 4\] = -2147483648 is not a page id"),
    "bad ids past the last page are never read": (paged([("block_table", [2, 2], 1_000_000)]), None),
    "kv_len above the capacity": (paged([("kv_len", 2, 13)], splits=3), LENGTH.format(13)),
    "kv_len 2^31 - 1": (paged([("kv_len", 2, 2**31 - 1)]), LENGTH.format(2**31 - 1)),
    "kv_len negative": (paged([("kv_len", 2, -1)]), LENGTH.format(-1)),
    "chunked prefill, page id past the pool": (
        Case("paged_prefill", 9, None, 1, [3, 1, 2], [7, 4, 8], page=2, maxp=4, spare_pages=1,
             corrupt=[("block_table", [2, 3], 1_000_000)], validate=True),
        r"^block_table: block_table\[2, 3\] = 1000000 is not a page id"),
    "cu_q past T: [0, 2, 600] with T = 6": (
        varlen([("cu_q", 2, 600)]),
        r"^cu_q: the offsets must end at T = 6, the number of packed tokens, but cu_q\[2\] = 600"),
    "cu_q decreasing": (
        varlen([("cu_q", 1, 7)], q_lens=(2, 4, 3), kv_lens=(4, 6, 5), splits=3),
        r"^cu_q: the offsets must never decrease, but cu_q\[2\] = 6 < cu_q\[1\] = 7"),
    "cu_q negative": (varlen([("cu_q", 0, -3)]), r"^cu_q: the offsets must start at 0, but cu_q\[0\] = -3"),
    "cu_k past TK": (
        varlen([("cu_k", 2, 600)]),
        r"^cu_k: the offsets must end at TK = 10, the number of packed tokens, but cu_k\[2\] = 600"),
    "cu_k[1] past TK": (
        varlen([("cu_k", 1, 600)], splits=3),
        r"^cu_k: the offsets must never decrease, but cu_k\[2\] = 10 < cu_k\[1\] = 600"),
    "cu_k decreasing, dense q": (
        varlen([("cu_k", 2, 1)], kind="ragged_kv", kv_lens=(4, 6, 5)),
        r"^cu_k: the offsets must never decrease, but cu_k\[2\] = 1 < cu_k\[1\] = 4"),
    "cu_k negative, dense q": (
        varlen([("cu_k", 1, -5)], kind="ragged_kv"),
        r"^cu_k: the offsets must never decrease, but cu_k\[1\] = -5 < cu_k\[0\] = 0"),
    "cu_k -2^31 at the end": (
        varlen([("cu_k", 2, -2**31)]),
        r"^cu_k: the offsets must never decrease, but cu_k\[2\] = -2147483648 < cu_k\[1\] = 4"),
}


def run_worker(cases: list[Case], n: int, device: str, timeout: int) -> tuple[dict[str, dict], str, float]:
    """The worker's result per case (by its JSON), its stderr, and the seconds it took; a crash fails the test that
    asked for the run, naming the case it died on."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, str(WORKER), "--n", str(n), "--device", device,
                           "--cases", json.dumps([asdict(c) for c in cases])],
                          capture_output=True, text=True, timeout=timeout, env=env)
    seconds = time.perf_counter() - start
    results = {}
    for line in proc.stdout.splitlines():
        record = json.loads(line)
        results[json.dumps(record.pop("case"), sort_keys=True)] = record
    if proc.returncode not in (0, 1):  # 1: some case has problems, reported per case
        last = [line for line in proc.stderr.splitlines() if line.startswith("start ")][-1:]
        pytest.fail(f"the worker died (exit {proc.returncode}) on {last}; stderr ends:\n{proc.stderr[-3000:]}")
    return results, proc.stderr, seconds


def key(case: Case) -> str:
    return json.dumps(asdict(case), sort_keys=True)


@pytest.fixture(scope="module")
def interpreted():
    if torch.cuda.is_available():
        pytest.skip("the interpreter run is for CPU machines; the GPU run is test_adversarial_index_data_gpu")
    return run_worker([case for case, _ in FIXED.values()], CI_FUZZ_CASES, "cpu", timeout=900)


@pytest.mark.parametrize("name", list(FIXED))
def test_bad_index_data_is_clamped_flagged_and_poisoned(interpreted, name):
    case, message = FIXED[name]
    result = interpreted[0][key(case)]
    assert result["problems"] == []
    if message is None:
        assert result["recorded"] is None and result["validated"] is None
    else:
        assert result["recorded"] is not None and result["validated"] is not None
        for raised in (result["recorded"], result["validated"]):
            assert re.match(message, raised), raised
            assert "the rows it reached are NaN" in raised


def test_random_index_data(interpreted):
    """A CI share of the fuzzer: every random case clean (the worker prints how long it took)."""
    results, stderr, seconds = interpreted
    random_results = [r for k, r in results.items() if k not in {key(c) for c, _ in FIXED.values()}]
    assert len(random_results) == CI_FUZZ_CASES
    bad = [r for r in random_results if r["problems"]]
    assert not bad, bad[:3]
    assert f"{CI_FUZZ_CASES + len(FIXED)} cases, 0 with problems" in stderr, stderr[-2000:]
    print(f"{CI_FUZZ_CASES + len(FIXED)} adversarial calls on the interpreter in {seconds:.1f} s")


@pytest.mark.gpu
def test_adversarial_index_data_gpu():
    """The fixed cases and 1,000 random ones on the GPU (f16), in a subprocess (a fault must not take the
    suite's CUDA context). benchmarks/sanitize_index.sh runs the same under compute-sanitizer."""
    results, stderr, _ = run_worker([case for case, _ in FIXED.values()], 1000, "cuda", timeout=1800)
    assert "0 with problems" in stderr, [r for r in results.values() if r["problems"]][:3]
    for name, (case, message) in FIXED.items():
        result = results[key(case)]
        assert (result["recorded"] is None) == (message is None), name


def compile_serving_kernels_for_hopper() -> list[str]:
    """attn_decode of a chunked prefill (ragged q, paged k/v) and of varlen (ragged q and k/v), with splits,
    compiled for sm_90 from the arguments the launcher passes (meta tensors; no GPU): the compiler rejects what the
    interpreter lets through, such as a loop-carried value that changes from int32 to int64. Run with
    TRITON_INTERPRET=0 (in a subprocess of its own)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import mangle_type

    from attnc.dsl.signature import bind
    from attnc.passes import Target, plan_kernel
    from attnc.backends.triton import serving

    done = []
    for kind, splits in (("paged_prefill", 4), ("varlen", 1)):
        call = build(Case(kind, 0, splits, 2, [3, 5], [9, 7], page=4, maxp=3), "cpu", "f16")
        plan = plan_kernel(call.spec, Target("triton", "cuda", 90), D, D, PlanOptions(num_splits=splits))
        launcher = serving.DecodeLauncher(plan)
        meta = [t.to("meta") for t in (call.q, call.k, call.v)]
        bound = bind(call.spec, *meta, {name: t.to("meta") for name, t in call.bad.items()})
        go = launcher.launch_for(bound)
        fn, _, args, keywords = launcher.calls(bound, go, *serving.allocate(
            serving.output_shapes(call.spec, bound, go), meta[0].dtype, meta[0].device))[0]
        signature, constexprs = {}, {}
        for name, param, value in zip(fn.arg_names, fn.params, [*args, *[None] * (len(fn.params) - len(args))]):
            if param.is_constexpr:
                signature[name], constexprs[name] = "constexpr", keywords[name]
            else:
                signature[name] = mangle_type(value)
        options = {k: v for k, v in keywords.items() if k not in fn.arg_names}
        triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", 90, 32), options=options)
        done.append(call.spec.name)
    return done


def test_the_checked_serving_kernels_compile_for_hopper(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_CACHE_DIR=str(tmp_path),
               PYTHONPATH=os.pathsep.join([str(ROOT), str(WORKER.parent.parent)]))
    proc = subprocess.run([sys.executable, "-c", "import test_index_safety as t; "
                           "print(t.compile_serving_kernels_for_hopper())"],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "['paged_prefill', 'varlen']" in proc.stdout


# ---------------------------------------------------------------- calls that stay sound, in process


PAGED = attnc.parse("""attention paged_decode {
    q: f32[B, M, H, D]  k: f32[PAGES, PAGE, HKV, D]  v: f32[PAGES, PAGE, HKV, D]
    paged k, v by block_table, kv_len
    mask causal
    return softmax(score) @ v
}""", "paged.attn")[0]


def backends():
    names = ["triton"] if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1" else []
    try:
        import tvm  # noqa: F401

        names.append("tvm")
    except ImportError:
        pass
    return names


def serving_backends():
    """The backends whose serving kernels run on this machine's device: tvm's only on the CPU."""
    return [name for name in backends() if name == "triton" or not torch.cuda.is_available()]


@pytest.mark.parametrize("backend", serving_backends())
def test_a_validated_call_has_its_own_error_buffer(backend):
    """validate=True raises for its own call only: an earlier unchecked record stays for check_errors. (The pools
    are views one page into their storage, so page id -1 stays inside it even if the clamp were lost.)"""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    k, v = (torch.randn(5, 4, 2, 16, device=device)[1:] for _ in range(2))
    q = torch.randn(2, 1, 4, 16, device=device)
    table = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32, device=device)
    lens = torch.tensor([6, 8], dtype=torch.int32, device=device)
    kern = attnc.compile(PAGED, backend=backend)
    want = attnc.reference(PAGED, q, k, v, block_table=table, kv_len=lens)
    attnc.check_errors()  # whatever earlier tests left
    bad = torch.tensor([[0, 1], [-1, 3]], dtype=torch.int32, device=device)
    out = kern(q, k, v, block_table=bad, kv_len=lens)  # recorded, not raised: no sync
    assert out[1].isnan().all() and not out[0].isnan().any()
    got = kern(q, k, v, block_table=table, kv_len=lens, validate=True)  # sound: no error of its own
    torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=2e-5)
    with pytest.raises(attnc.CallError, match=r"^block_table: block_table\[1, 0\] = -1 is not a page id"):
        attnc.check_errors()
    attnc.check_errors()  # cleared


def test_validate_is_a_reserved_name():
    with pytest.raises(attnc.SpecError, match="'validate' is reserved for the call option"):
        attnc.parse("attention a { q: f32[B, H, M, D] k: f32[B, H, N, D] v: f32[B, H, N, D] input validate: f32[H] "
                    "score = qk + validate[h] return softmax(score) @ v }")


# -- lookups: one rule, read 0 out of range, everywhere

REL = attnc.parse("""attention rel_bias {
    q: f32[B, H, M, D]  k: f32[B, H, N, D]  v: f32[B, H, N, D]
    input rel: f32[H, R]
    input doc: i32[B, N]
    score = qk * rsqrt(D) + rel[h, i - j + 2]
    mask doc[b, j + 1] != 7
    return softmax(score) @ v, lse
}""", "rel.attn")[0]


@pytest.mark.parametrize("backend", backends())
def test_out_of_range_lookups_read_zero_like_the_reference(backend):
    """rel[h, i - j + 2] leaves rel (R = 5) for j > i + 2 and i - j > 2; doc[b, j + 1] at the last key: both read 0,
    on the backend and in the reference. The table values sit far from 0, so a clamped read would show."""
    device = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    torch.manual_seed(3)
    q, k, v = (torch.randn(2, 3, 9, 32, device=device) for _ in range(3))
    rel = torch.randn(3, 5, device=device) + 4.0
    doc = torch.randint(0, 9, (2, 9), dtype=torch.int32, device=device)
    doc[:, -1] = 7  # doc[b, 9] reads 0, not the clamped doc[b, 8] = 7: the last key stays kept
    kern = attnc.compile(REL, backend=backend)
    out, lse = kern(q, k, v, rel=rel, doc=doc)
    want, want_lse = attnc.reference(REL, q, k, v, rel=rel, doc=doc)
    torch.testing.assert_close(out.double(), want, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(lse.double(), want_lse, rtol=2e-5, atol=2e-5)
    # the score's lookups are checked first: rel at row 0 is outside for j >= 3, and key 8 is always kept
    with pytest.raises(attnc.CallError, match=r"^rel: index 1 of `rel\[h, i - j \+ 2\]` is -\d at b=0, h=0, i=0, j=\d"):
        kern(q, k, v, rel=rel, doc=doc, validate=True)


def test_validate_mode_reports_lookups_that_reach_the_result(monkeypatch):
    """Causal: rel[i - j] is inside rel for every kept key, so validate mode is quiet; without the mask the keys
    past the diagonal read 0 and are reported. ATTNC_VALIDATE=1 (VALIDATE_ALL) does the same for every call.
    (The check is the backends' common host-side rule: the Triton kernels stand for them here.)"""
    backend, device = "triton", "cuda" if torch.cuda.is_available() else "cpu"
    text = """attention rel_causal {{
        q: f32[B, H, M, D]  k: f32[B, H, N, D]  v: f32[B, H, N, D]
        input rel: f32[N]
        score = qk * rsqrt(D) + rel[i - j]
        {mask}
        return softmax(score) @ v
    }}"""
    causal = attnc.parse(text.format(mask="mask causal"))[0]
    dense = attnc.parse(text.format(mask=""))[0]
    q, k, v = (torch.randn(1, 2, 6, 32, device=device) for _ in range(3))
    rel = torch.randn(6, device=device) + 4.0
    out = attnc.compile(causal, backend=backend)(q, k, v, rel=rel, validate=True)
    torch.testing.assert_close(out.double(), attnc.reference(causal, q, k, v, rel=rel), rtol=2e-5, atol=2e-5)
    kern = attnc.compile(dense, backend=backend)
    out = kern(q, k, v, rel=rel)
    torch.testing.assert_close(out.double(), attnc.reference(dense, q, k, v, rel=rel), rtol=2e-5, atol=2e-5)
    monkeypatch.setattr(index_data, "VALIDATE_ALL", True)
    with pytest.raises(attnc.CallError, match=r"^rel: index 0 of `rel\[i - j\]` is -1 at b=0, h=0, i=0, j=1"):
        kern(q, k, v, rel=rel)
