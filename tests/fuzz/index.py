"""Adversarial index data for the serving kernels (issue 15): page ids, lengths and offsets out of range,
decreasing, negative or huge, against a model of what the kernels promise (attnc/index_data.py):

- nothing is read or written outside a tensor (on the interpreter a stray gather is a segfault, which kills this
  process: run it in a subprocess, as tests/test_index_safety.py does);
- rows that bad data reaches are NaN (out and lse); every other row equals attnc.reference on the data as the
  kernel uses it (offsets clamped into [0, total] with the first 0 and the last the total, lengths clamped into
  [0, MAXP * PAGE], bad page ids read as page 0);
- `attnc.check_errors()` raises a CallError naming a tensor that holds a violation exactly when a kernel must have
  met one, and stays quiet for sound data (garbage in unused block-table entries included).

    python -m tests.fuzz.index --n 1000 [--seed 0] [--device cuda]   # the full run (CPU: the interpreter)
    python tests/fuzz/index.py --n 0 --cases '[{"kind": "paged", ...}]'  # given cases (test_index_safety)

Each case prints one JSON line: {"case": ..., "problems": [...], "recorded": ..., "validated": ...}; a line
"start <case>" goes to stderr first, so a crash names the case that caused it. Exit status 1 when a case has
problems. 1,000 cases (seeds 1000-1999) took 532 s on a shared 2-core CPU machine under the interpreter: CI runs
a share of them (tests/test_index_safety.py).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (NOTES.md)

import attnc  # noqa: E402
from attnc.passes import PlanOptions  # noqa: E402
from attnc.backends.triton import launch  # noqa: E402

SPECS = {
    # decode over a paged cache: q [B, M, H, D]
    "paged": """attention paged_decode {{
    q: {dt}[B, M, H, D]  k: {dt}[PAGES, PAGE, HKV, D]  v: {dt}[PAGES, PAGE, HKV, D]
    paged k, v by block_table, kv_len
    mask causal
    return softmax(score) @ v, lse
}}""",
    # chunked prefill: packed q over a paged cache
    "paged_prefill": """attention paged_prefill {{
    q: {dt}[T, H, D]  k: {dt}[PAGES, PAGE, HKV, D]  v: {dt}[PAGES, PAGE, HKV, D]
    ragged q by cu_q
    paged k, v by block_table, kv_len
    mask causal
    return softmax(score) @ v, lse
}}""",
    "varlen": """attention varlen {{
    q: {dt}[T, H, D]  k: {dt}[TK, HKV, D]  v: {dt}[TK, HKV, D]
    ragged q by cu_q
    ragged k, v by cu_k
    mask causal
    return softmax(score) @ v, lse
}}""",
    # dense queries over packed keys
    "ragged_kv": """attention ragged_kv {{
    q: {dt}[B, H, M, D]  k: {dt}[TK, HKV, D]  v: {dt}[TK, HKV, D]
    ragged k, v by cu_k
    mask causal
    return softmax(score) @ v, lse
}}""",
}
TOL = {"f32": 2e-5, "f16": 3e-3, "bf16": 3e-2}
H, D = 4, 16
I32_MIN, I32_MAX = -2**31, 2**31 - 1


@dataclass
class Case:
    """One call: the sound index data the tensors were made for, then the corruptions written over it,
    (tensor name, position, value) with position (b, entry) for block_table, b for kv_len and k for offsets."""

    kind: str
    seed: int
    splits: int | None
    hkv: int
    q_lens: list[int]
    kv_lens: list[int]
    page: int = 1
    maxp: int = 1
    spare_pages: int = 0
    corrupt: list = field(default_factory=list)
    validate: bool = False  # call it in validate mode too


def random_case(seed: int) -> Case:
    rng = random.Random(seed)
    kind = rng.choice(sorted(SPECS))
    b = rng.randint(1, 4)
    ragged_q = kind in ("paged_prefill", "varlen")
    m = rng.randint(1, 3)
    q_lens = [rng.choice([0, 1, 2, 3, 5]) for _ in range(b)] if ragged_q else [m] * b
    case = Case(kind, seed, rng.choice([None, 1, 3]), rng.choice([1, 2]), q_lens, [])
    if kind.startswith("paged"):
        case.page, case.maxp, case.spare_pages = rng.choice([1, 2, 4]), rng.randint(1, 4), rng.randint(0, 3)
        case.kv_lens = [rng.randint(0, case.maxp * case.page) for _ in range(b)]
    else:
        case.kv_lens = [rng.randint(0, 9) for _ in range(b)]
    for _ in range(rng.choice([0, 1, 1, 1, 2])):
        case.corrupt.append(_corruption(rng, case))
    return case


def _corruption(rng: random.Random, case: Case) -> tuple:
    b = len(case.kv_lens)
    targets = {"paged": ["block_table", "kv_len"], "paged_prefill": ["block_table", "kv_len", "cu_q"],
               "varlen": ["cu_q", "cu_k"], "ragged_kv": ["cu_k"]}[case.kind]
    target = rng.choice(targets)
    if target == "block_table":
        pages = _page_count(case)
        value = rng.choice([-1, pages, pages + rng.randint(1, 100), 1_000_000, I32_MAX, I32_MIN])
        return target, [rng.randrange(b), rng.randrange(case.maxp)], value
    if target == "kv_len":
        cap = case.maxp * case.page
        return target, rng.randrange(b), rng.choice([-1, cap + 1, cap + rng.randint(2, 1000), I32_MAX, I32_MIN])
    lengths = case.q_lens if target == "cu_q" else case.kv_lens
    total, k = sum(lengths), rng.randint(0, b)
    now = _offsets(lengths)[k]
    return target, k, rng.choice([-1, total + 1, 600, I32_MAX, I32_MIN, now - rng.randint(1, 3),
                                  now + rng.randint(1, 3)])


def _offsets(lengths: list[int]) -> list[int]:
    out = [0]
    for n in lengths:
        out.append(out[-1] + n)
    return out


def _page_count(case: Case) -> int:
    return sum(-(-n // case.page) for n in case.kv_lens) + case.spare_pages or 1


# ---------------------------------------------------------------- the call and the model


@dataclass
class Call:
    spec: attnc.Attention
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    bad: dict  # the index tensors as called
    used: dict  # as the kernel uses them (the reference's input); None where offsets decrease
    must: torch.Tensor  # [rows, H]: NaN required
    may: torch.Tensor  # [rows, H]: NaN or the reference's value
    violated: set  # tensors holding a violation a kernel must meet
    maybe_violated: set  # ... or may meet


def build(case: Case, device: str, dtype: str) -> Call:
    torch.manual_seed(case.seed)
    gen = random.Random(case.seed)
    spec = attnc.parse(SPECS[case.kind].format(dt=dtype), f"{case.kind}.attn")[0]
    tdt = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[dtype]
    b, ragged_q = len(case.kv_lens), spec.q_storage is not None
    t = sum(case.q_lens)
    m = case.q_lens[0]
    q = torch.randn((t, H, D) if ragged_q else (b, H, m, D) if case.kind == "ragged_kv" else (b, m, H, D))
    index = {}
    if case.kind.startswith("paged"):
        pages = _page_count(case)
        k, v = (torch.randn(pages, case.page, case.hkv, D) for _ in range(2))
        ids = list(range(pages))
        gen.shuffle(ids)
        table = [[gen.choice([-1, I32_MAX, pages]) for _ in range(case.maxp)] for _ in range(b)]
        for s, n in enumerate(case.kv_lens):
            for e in range(-(-n // case.page)):
                table[s][e] = ids.pop()
        index["block_table"], index["kv_len"] = table, list(case.kv_lens)
    else:
        k, v = (torch.randn(sum(case.kv_lens), case.hkv, D) for _ in range(2))
        index["cu_k"] = _offsets(case.kv_lens)
    if ragged_q:
        index["cu_q"] = _offsets(case.q_lens)
    for name, at, value in case.corrupt:
        if name == "block_table":
            index[name][at[0]][at[1]] = value
        else:
            index[name][at] = value

    must = torch.zeros((t, H) if ragged_q else (b, m, H), dtype=torch.bool)
    may = torch.zeros_like(must)
    violated, maybe = set(), set()
    used = {}
    disorder = False
    bad_seq = [False] * b
    q_rows = [slice(s, s + 1) for s in range(b)]  # dense q: batch s
    m_of = [m] * b
    for name, total in (("cu_q", t), ("cu_k", sum(case.kv_lens))):
        if name not in index:
            continue
        raw = index[name]
        fixed = [0] + [min(max(x, 0), total) for x in raw[1:-1]] + [total]
        if raw[0] != 0 or raw[-1] != total or any(raw[s] < raw[s - 1] for s in range(1, b + 1)):
            (violated if t else maybe).add(name)  # an empty q launches nothing
        disorder |= any(raw[s] < raw[s - 1] for s in range(1, b + 1))
        for s in range(b):
            bad_seq[s] |= raw[s] != fixed[s] or raw[s + 1] != fixed[s + 1]
        used[name] = fixed
        if name == "cu_q":
            q_rows = [slice(fixed[s], fixed[s + 1]) for s in range(b)]
            m_of = [max(fixed[s + 1] - fixed[s], 0) for s in range(b)]
        else:
            n_of = [max(fixed[s + 1] - fixed[s], 0) for s in range(b)]
    if disorder:
        must[:] = True
        return Call(spec, *_on(device, tdt, q, k, v), _tensors(index, device), None, must, may, violated,
                    violated | maybe | set(index))
    if "kv_len" in index:
        cap = case.maxp * case.page
        n_of = [min(max(n, 0), cap) for n in index["kv_len"]]
        for s, n in enumerate(index["kv_len"]):
            if n != n_of[s]:
                bad_seq[s] = True
                (violated if m_of[s] else maybe).add("kv_len")
        used["kv_len"] = n_of
        used["block_table"] = [[e if 0 <= e < pages else 0 for e in row] for row in index["block_table"]]
    for s in range(b):
        rows = must[q_rows[s]] if ragged_q else must[s]
        if bad_seq[s]:
            rows[:] = True
            continue
        if "block_table" not in index:
            continue
        bad_entries = [e for e in range(-(-n_of[s] // case.page)) if not 0 <= index["block_table"][s][e] < pages]
        if not bad_entries:
            continue
        (may[q_rows[s]] if ragged_q else may[s])[:] = True
        for i in range(m_of[s]):
            keys = min(n_of[s], i + n_of[s] - m_of[s] + 1)  # causal, bottom-right: keys j < keys
            if any(e * case.page < keys for e in bad_entries):
                rows[i] = True
                violated.add("block_table")
    return Call(spec, *_on(device, tdt, q, k, v), _tensors(index, device), _tensors(used, device), must, may,
                violated, violated | maybe)


def _on(device: str, dtype: torch.dtype, *tensors):
    return [x.to(device=device, dtype=dtype) for x in tensors]


def _tensors(index: dict, device: str) -> dict:
    return {name: torch.tensor(value, dtype=torch.int32, device=device) for name, value in index.items()}


# ---------------------------------------------------------------- running a case

_KERNELS: dict = {}


def run_case(case: Case, device: str, dtype: str) -> dict:
    """{"problems": what is wrong with the kernel's answer to `case` (empty: nothing), "recorded": the message
    check_errors raised (None: none), "validated": the one validate mode raised (None: none, or not run)}."""
    call = build(case, device, dtype)
    key = (case.kind, case.splits, dtype)
    kernel = _KERNELS.get(key)
    if kernel is None:
        kernel = _KERNELS[key] = attnc.compile(call.spec, options=PlanOptions(num_splits=case.splits))
    with launch.poisoned_outputs():
        out, lse = kernel(call.q, call.k, call.v, **call.bad)
    problems, raised = [], None
    try:
        attnc.check_errors()
        flagged = None
    except attnc.CallError as e:
        flagged = str(e)
    if flagged is None and call.violated:
        problems.append(f"no error recorded, but {sorted(call.violated)} hold violations")
    if flagged is not None and not any(flagged.startswith(f"{name}: ") for name in call.maybe_violated):
        problems.append(f"recorded {flagged!r}, but only {sorted(call.maybe_violated)} may hold violations")
    if case.validate:
        try:
            kernel(call.q, call.k, call.v, validate=True, **call.bad)
            raised = None
        except attnc.CallError as e:
            raised = str(e)
        if (raised is not None) != (flagged is not None):
            problems.append(f"validate=True raised {raised!r} where check_errors raised {flagged!r}")
    ragged_q = call.spec.q_storage is not None
    # out and lse rows as [rows, H] (dense q: [B, M, H])
    if ragged_q:
        rows_out, rows_lse = out.isnan().all(-1), lse.isnan().T
    elif case.kind == "ragged_kv":
        rows_out, rows_lse = out.isnan().all(-1).transpose(1, 2), lse.isnan().transpose(1, 2)
    else:
        rows_out, rows_lse = out.isnan().all(-1), lse.isnan().transpose(1, 2)
    for what, nan in (("out", rows_out), ("lse", rows_lse)):
        if (call.must & ~nan.cpu()).any():
            problems.append(f"{what}: rows that bad index data reaches are not NaN: "
                            f"{call.must.nonzero().tolist()[:4]}")
    result = {"problems": problems, "recorded": flagged, "validated": raised}
    if call.used is None:
        return result
    # on the host: under compute-sanitizer only the kernels under test run on the GPU
    want_out, want_lse = attnc.reference(call.spec, call.q.cpu(), call.k.cpu(), call.v.cpu(),
                                         **{name: t.cpu() for name, t in call.used.items()})
    exact = ~call.must & ~call.may
    tol = TOL[dtype]
    if ragged_q:
        pairs = ((out, want_out, rows_out), (lse.T, want_lse.T, rows_lse))
    elif case.kind == "ragged_kv":
        pairs = ((out.transpose(1, 2), want_out.transpose(1, 2), rows_out), (lse.transpose(1, 2),
                                                                             want_lse.transpose(1, 2), rows_lse))
    else:
        pairs = ((out, want_out, rows_out), (lse.transpose(1, 2), want_lse.transpose(1, 2), rows_lse))
    for what, (got, want, nan) in zip(("out", "lse"), pairs):
        got, want, nan = got.cpu().double(), want.cpu(), nan.cpu()
        check = exact | (call.may & ~nan)  # rows that may be NaN but are not must be right
        if not check.any():
            continue
        g, w = got[check], want[check]
        same_inf = (torch.isinf(w) & (g == w)) | (~torch.isinf(w) & ~torch.isinf(g))
        finite = torch.isfinite(w)
        err = (g[finite] - w[finite]).abs().max().item() if finite.any() else 0.0
        scale = max(1.0, w[finite].abs().max().item() if finite.any() else 0.0)
        if g.isnan().any() or not bool(same_inf.all()) or err > max(tol, 1e-5) * scale:
            problems.append(f"{what}: rows of sound sequences differ from the reference (max error {err:.3g}, "
                            f"NaN {int(g.isnan().sum())})")
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1000, help="random cases (after --cases)")
    parser.add_argument("--seed", type=int, default=0, help="the first case's seed (the others follow)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="f32 on the interpreter, f16 on a GPU")
    parser.add_argument("--cases", default=None, help="a JSON list of cases, run before the random ones")
    args = parser.parse_args(argv)
    dtype = args.dtype or ("f32" if args.device == "cpu" else "f16")
    cases = [Case(**c) for c in json.loads(args.cases or "[]")] + [random_case(args.seed + n) for n in range(args.n)]
    failed, start = 0, time.perf_counter()
    for case in cases:
        print(f"start {json.dumps(asdict(case))}", file=sys.stderr, flush=True)
        result = run_case(case, args.device, dtype)
        failed += bool(result["problems"])
        print(json.dumps({"case": asdict(case), **result}), flush=True)
    print(f"{len(cases)} cases, {failed} with problems, {time.perf_counter() - start:.1f} s on {args.device}",
          file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
