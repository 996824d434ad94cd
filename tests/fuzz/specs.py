"""Spec fuzzer: mutants of the example specs and of Python front-end calls must give attnc's own errors.

Each mutant is made from (seed, index) alone, so any finding is reproduced by `--seed S --only INDEX`. Text mutants
stack one to four mutations of an example spec (characters, tokens, lines, splices of two specs, deep nesting,
huge or zero numbers, `score = score + score` chains, long repetitions); each runs through attnc.parse, through
`attnc check` on a file holding its bytes, and, where it parses, through planning, Triton source generation and
the `attnc show` forms ir and plan (each with a time bound of its own; the ir must read back).
Python mutants are decorator functions and flex score/mask mods written from a random expression grammar over
the traced API (hostile defaults, deep loops, doubling, division by zero), traced without compiling and shown.

Outcomes: "ok" (parsed or traced), "error" (an AttncError: the expected answer to bad input), "user" (an exception
raised by the mutant's own Python code, such as `1 // 0` on two Python ints), and the findings: "traceback"
(any other exception), "hang" (over cpu_limit of CPU in the worker, a `show` form over SHOW_LIMIT_S, or killed
after KILL_S of wall time) and "crash" (the worker died). Workers are forked processes that each run one mutant at a time.
"""
from __future__ import annotations

import contextlib
import importlib
import io
import multiprocessing
import os
import random
import re
import resource
import tempfile
import time
import traceback
from dataclasses import dataclass
from multiprocessing.connection import wait
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples" / "specs").glob("*.attn"))
LIMIT_S = 2.0  # CPU seconds a mutant may take, per LIMIT_CHARS of its source
# A mutant this long (18x the longest example spec) parses and checks well within LIMIT_S; a longer one (the repeats
# reach megabytes) gets LIMIT_S per LIMIT_CHARS, so time linear in the input is no hang and super-linear time is
# (mutant 776 of seed 2026, 47 KB, parsed twice at 1.7-2.1 s on a 2-core machine).
LIMIT_CHARS = 32768
SHOWN = ("ir", "plan")  # the `attnc show --emit` forms every accepted mutant is printed in
SHOW_LIMIT_S = 0.5  # CPU seconds each of them may take (their text grows with the DAG, as a spec's check does)
KILL_S = 20.0  # wall seconds before a worker is killed (the machine may be shared: CPU time decides hangs)
FINDINGS = ("traceback", "hang", "crash")


@dataclass(frozen=True)
class Mutant:
    index: int
    kind: str  # "text" or "python"
    how: str  # the mutations applied
    source: str


@dataclass
class Outcome:
    mutant: Mutant
    result: str  # "ok", "error", "user", or one of FINDINGS
    detail: str = ""
    cpu_s: float = 0.0


# ---------------------------------------------------------------- text mutants

_TOKEN = re.compile(r"\d+\.\d*(?:[eE][+-]?\d+)?|\.\d+|\w+|\s+|.", re.S)
_NAN = re.compile(r"\bnan\b")
_NUMBER = re.compile(r"^(\d+\.\d*|\.\d+|\d+)([eE][+-]?\d+)?$")
KEYWORDS = ("attention", "dims", "param", "input", "score", "mask", "return", "and", "or", "not", "inf", "true",
            "false", "qk", "causal", "paged", "ragged", "by", "softmax", "sigmoid", "sink", "lse", "where", "tanh",
            "exp", "exp2", "log", "rsqrt", "abs", "min", "max", "floor", "erf", "q", "k", "v", "b", "h", "i", "j",
            "B", "H", "HKV", "M", "N", "D", "DV", "T", "TK", "PAGES", "PAGE", "MAXP", "f32", "bf16", "i32", "bool")
SYMBOLS = ("(", ")", "[", "]", "{", "}", ",", ":", "=", "==", "!=", "<", "<=", ">", ">=", "+", "-", "*", "/", "//",
           "%", "@", "#", ".", "\n", " ", "\t", "&", "|", "!", "^", "'", '"', "$", "\\", ";")
ODD = ("\x00", "\r", "\f", "\x0b", "\x1c", "\u2028", "\u00e9", "\ufeff", "\U0001f600", "\ud800", "\x7f")
HUGE = ("18446744073709551616", "9223372036854775808", "9223372036854775807", "1" + "0" * 400, "1e400", "1e-400",
        "3.5e38", "3.4e38", "0", "0.0", "4294967296", "2147483648", "2147483647", "1" * 5000, "1e38", ".0", "00",
        "1.7976931348623157e308", "5e-324", "123456789012345678901234567890.5")
WRAPS = ("({})", "abs({})", "-{}", "not {}", "({} + 1)", "exp({})", "where(i < j, {}, 0.0)", "max({}, 0)",
         "floor({})", "({} * score)", "({} // 1)")
DEPTHS = (10, 50, 98, 99, 100, 101, 150, 500, 3000)
DIVISORS = (" % 0", " // 0", " / 0", " % (D - D)", " // (3 - 3)", " % 0.0", " / 0.0", " // (N - N)")
DOUBLINGS = ("score = score + score", "score = score * score", "score = where(score > 0, score, score)",
             "score = max(score, score) - score", "score = score / 2 + score / 2")


def _corpus() -> list[str]:
    return [p.read_text(encoding="utf-8") for p in EXAMPLES]


def _pick_text(rng: random.Random, corpus: list[str]) -> str:
    return rng.choice(corpus)


def _random_token(rng: random.Random) -> str:
    pool = rng.random()
    if pool < 0.35:
        return rng.choice(KEYWORDS)
    if pool < 0.7:
        return rng.choice(SYMBOLS)
    if pool < 0.85:
        return rng.choice(HUGE)
    if pool < 0.92:
        return rng.choice(ODD)
    return "".join(rng.choice("abcxyz_019") for _ in range(rng.randint(1, 6)))


def _chars(rng: random.Random, text: str, _corpus) -> str:
    chars = list(text)
    for _ in range(rng.randint(1, 8)):
        at = rng.randrange(len(chars) + 1)
        op = rng.random()
        new = rng.choice(SYMBOLS + ODD) if rng.random() < 0.7 else chr(rng.randrange(32, 127))
        if op < 0.4 and chars and at < len(chars):
            del chars[at]
        elif op < 0.7:
            chars.insert(at, new)
        elif at < len(chars):
            chars[at] = new
    return "".join(chars)


def _tokens(rng: random.Random, text: str, _corpus) -> str:
    tokens = _TOKEN.findall(text) or [_random_token(rng)]  # (an earlier mutation may have emptied it)
    for _ in range(rng.randint(1, 6)):
        at = rng.randrange(len(tokens))
        op = rng.random()
        if op < 0.25:
            del tokens[at]
        elif op < 0.5:
            tokens.insert(at, _random_token(rng))
        elif op < 0.7:
            tokens[at] = _random_token(rng)
        elif op < 0.85:
            tokens.insert(at, tokens[rng.randrange(len(tokens))])
        else:
            other = rng.randrange(len(tokens))
            tokens[at], tokens[other] = tokens[other], tokens[at]
        if not tokens:
            tokens = [_random_token(rng)]
    return "".join(tokens)


def _lines(rng: random.Random, text: str, corpus) -> str:
    lines = text.split("\n")
    for _ in range(rng.randint(1, 4)):
        at = rng.randrange(len(lines))
        op = rng.random()
        if op < 0.3 and len(lines) > 1:
            del lines[at]
        elif op < 0.55:
            lines[at:at] = [lines[at]] * rng.choice((1, 2, 5, 50))
        elif op < 0.8:
            donor = _pick_text(rng, corpus).split("\n")
            lines.insert(at, rng.choice(donor))
        else:
            other = rng.randrange(len(lines))
            lines[at], lines[other] = lines[other], lines[at]
    return "\n".join(lines)


def _splice(rng: random.Random, text: str, corpus) -> str:
    donor = _pick_text(rng, corpus)
    if rng.random() < 0.5:
        return text[:rng.randrange(len(text) + 1)] + donor[rng.randrange(len(donor) + 1):]
    a, b = text.split("\n"), donor.split("\n")
    return "\n".join(a[:rng.randrange(len(a) + 1)] + b[rng.randrange(len(b) + 1):])


def _expression_spans(text: str) -> list[tuple[int, int]]:
    """Where the expressions of `score = ...`, `mask ...`, `param ... = ...` and `dims ... = ...` lines lie."""
    spans = []
    for m in re.finditer(r"(?m)^[ \t]*(?:score\s*=|mask|param\s+\w+\s*:\s*\w+\s*=|dims\s+\w+\s*=)[ \t]*([^#\n]+)",
                         text):
        spans.append(m.span(1))
    return spans


def _in_expression(rng: random.Random, text: str, make) -> str:
    spans = _expression_spans(text)
    if not spans:
        return text
    start, end = rng.choice(spans)
    return text[:start] + make(text[start:end].rstrip()) + text[end:]


def _nest(rng: random.Random, text: str, _corpus) -> str:
    wrap, depth = rng.choice(WRAPS), rng.choice(DEPTHS)
    open_, close = wrap.split("{}")
    return _in_expression(rng, text, lambda e: open_ * depth + e + close * depth)


def _long_chain(rng: random.Random, text: str, _corpus) -> str:
    op, count = rng.choice((" + ", " * ", " and ", " - ", " < ")), rng.choice((50, 99, 100, 101, 400, 3000))
    return _in_expression(rng, text, lambda e: op.join([f"({e})"] * count))


def _huge(rng: random.Random, text: str, _corpus) -> str:
    tokens = _TOKEN.findall(text)
    numbers = [n for n, t in enumerate(tokens) if _NUMBER.match(t)]
    if numbers and rng.random() < 0.7:
        tokens[rng.choice(numbers)] = rng.choice(HUGE)
        return "".join(tokens)
    return _in_expression(rng, text, lambda e: f"({e}) {rng.choice('+*/-')} {rng.choice(HUGE)}")


def _divide_by_zero(rng: random.Random, text: str, _corpus) -> str:
    return _in_expression(rng, text, lambda e: f"({e}){rng.choice(DIVISORS)}")


def _doubling(rng: random.Random, text: str, _corpus) -> str:
    at = text.rfind("return")
    if at < 0:
        return text
    lines = rng.choice(DOUBLINGS) + "\n"
    return text[:at] + lines * rng.choice((1, 5, 20, 30, 40, 64, 97, 120)) + text[at:]


def _repeat(rng: random.Random, text: str, _corpus) -> str:
    """Whole blocks or one line many times: the size and token caps, duplicate names, thousands of masks."""
    if rng.random() < 0.5:
        return text * rng.choice((2, 10, 100, 1000))
    at = text.rfind("return")
    line = rng.choice(("mask i - j < 3\n", "param p: f32 = 1.0\n", "score = score + 1\n", "# comment\n", " " * 999))
    return text[:max(at, 0)] + line * rng.choice((100, 3000, 30000)) + text[max(at, 0):]


TEXT_MUTATIONS = {f.__name__.lstrip("_"): f for f in (_chars, _tokens, _lines, _splice, _nest, _long_chain, _huge,
                                                      _divide_by_zero, _doubling, _repeat)}
_WEIGHTS = {"chars": 20, "tokens": 20, "lines": 12, "splice": 8, "nest": 8, "long_chain": 4, "huge": 10,
            "divide_by_zero": 8, "doubling": 6, "repeat": 2}


def text_mutant(rng: random.Random, corpus: list[str]) -> tuple[str, str]:
    text, names = _pick_text(rng, corpus), []
    for _ in range(rng.choice((1, 1, 1, 2, 2, 3, 4))):
        name = rng.choices(list(_WEIGHTS), weights=list(_WEIGHTS.values()))[0]
        names.append(name)
        text = TEXT_MUTATIONS[name](rng, text, corpus)
        if len(text) > 4 << 20:  # the repeats stack: keep a mutant a few MB at most
            text = text[:4 << 20]
    return "+".join(names), text


# ---------------------------------------------------------------- Python front-end mutants

_PY_NUMBERS = ("0", "1", "2", "0.5", "-3", "2**64", "10**400", "1e400", "float('inf')", "float('nan')", "2**31",
               "-2**63", "2**63", "1e-400", "3.5e38", "True", "False")
_PY_FUNCS = ("attnc.tanh", "attnc.exp", "attnc.exp2", "attnc.log", "attnc.sqrt", "attnc.rsqrt", "attnc.abs",
             "attnc.sigmoid", "attnc.floor", "attnc.erf", "attnc.sin")
_PY_BINARY = (" + ", " - ", " * ", " / ", " // ", " % ", " < ", " > ", " == ", " != ", " & ", " | ", " ** ")


def _py_expr(rng: random.Random, atoms: tuple[str, ...], depth: int = 0) -> str:
    if depth > 3 or rng.random() < 0.3:
        return rng.choice(atoms) if rng.random() < 0.75 else rng.choice(_PY_NUMBERS)
    choice = rng.random()
    sub = lambda: _py_expr(rng, atoms, depth + 1)  # noqa: E731
    if choice < 0.5:
        return f"({sub()}{rng.choice(_PY_BINARY)}{sub()})"
    if choice < 0.7:
        return f"{rng.choice(_PY_FUNCS)}({sub()})"
    if choice < 0.8:
        return f"attnc.where({sub()}, {sub()}, {sub()})"
    if choice < 0.9:
        return f"attnc.{rng.choice(('minimum', 'maximum'))}({sub()}, {sub()})"
    return f"(~{sub()})" if rng.random() < 0.5 else f"(-{sub()})"


def _py_loops(rng: random.Random, var: str, atoms: tuple[str, ...]) -> list[str]:
    lines = []
    for _ in range(rng.randint(0, 3)):
        kind = rng.random()
        if kind < 0.4:  # (var stays traced: a Python number squared in a loop would hang Python itself)
            lines.append(f"{var} = {var} + {_py_expr(rng, atoms)}")
        elif kind < 0.7:
            body = rng.choice((f"{var} + {var}", f"{var} * {var}", f"attnc.abs({var})", f"{var} + 1.0",
                               f"attnc.where({var} > 0, {var}, {var})"))
            lines.append(f"for _ in range({rng.choice((2, 30, 40, 64, 99, 101, 3000))}): {var} = {body}")
        else:
            lines.append(f"{var} = {var}{rng.choice(_PY_BINARY)}{rng.choice(_PY_NUMBERS)}")
    return lines


def python_mutant(rng: random.Random) -> tuple[str, str]:
    """Source defining `run(attnc, q, k, v)`, which traces one decorator function or one flex call."""
    if rng.random() < 0.5:
        params = [f"{name}: {kind} = {rng.choice(_PY_NUMBERS)}" for name, kind in
                  rng.sample((("cap", "float"), ("w", "int"), ("on", "bool"), ("s2", "float")), rng.randint(0, 2))]
        names = tuple(p.split(":")[0] for p in params)
        atoms = ("s", "q.pos", "k.pos", "q.head", "q.D", "q.batch", "(q @ k)") + names
        body = ["s = (q @ k) * q.D ** -0.5", *_py_loops(rng, "s", atoms)]
        keep = f", where={_py_expr(rng, atoms)}" if rng.random() < 0.5 else ""
        star = ", *, " + ", ".join(params) if params else ""
        lines = [f"def fuzzed(q, k, v{star}):", *(f"    {x}" for x in body),
                 f"    return attnc.{rng.choice(('softmax', 'softmax', 'sigmoid'))}(s{keep}) @ v",
                 "", "def run(attnc, q, k, v):", "    return attnc.attention(fuzzed).trace(q, k, v)"]
        return "decorator", "\n".join(lines) + "\n"
    atoms = ("score", "b", "h", "q_idx", "kv_idx")
    score_body = _py_loops(rng, "score", atoms)
    mask_atoms = ("b", "h", "q_idx", "kv_idx")
    lines = ["def score_mod(score, b, h, q_idx, kv_idx):", *(f"    {x}" for x in score_body),
             f"    return {_py_expr(rng, atoms) if rng.random() < 0.7 else 'score'}", "",
             "def mask_mod(b, h, q_idx, kv_idx):", f"    return {_py_expr(rng, mask_atoms)}", "",
             "def run(attnc, q, k, v):",
             f"    mask = attnc.create_block_mask(mask_mod, None, None, {rng.choice((4, 8, 2**40))}, 4)"
             if rng.random() < 0.6 else "    mask = None",
             "    from attnc.dsl.flex import flex_spec",
             f"    return flex_spec(q, k, v, score_mod=score_mod, block_mask=mask, scale={rng.choice(_PY_NUMBERS)})"]
    if rng.random() < 0.3:  # drawn last, so the other mutants stay as they were: MLA's spelling (docs/mla.md)
        latent = rng.choice(("(q, q[..., :4]), (k, k[..., :4]), k", "(q,), (c,), c", "(q, q), (c, c), c",
                             "(q, q), (c, k), c"))
        lines[-1:] = ["    c = k[:, 0]  # a latent cache without a head axis",
                      lines[-1].replace("flex_spec(q, k, v,", f"flex_spec({latent},")]
    return "flex", "\n".join(lines) + "\n"


def make_mutant(seed: int, index: int, corpus: list[str]) -> Mutant:
    rng = random.Random(f"{seed}:{index}")
    if rng.random() < 0.85:
        how, source = text_mutant(rng, corpus)
        return Mutant(index, "text", how, source)
    how, source = python_mutant(rng)
    return Mutant(index, "python", how, source)


# ---------------------------------------------------------------- running one mutant (in a worker)


def _run_text(mutant: Mutant, workdir: Path) -> str:
    import attnc
    from attnc import cli
    from attnc.backends.triton.generate import generate
    from attnc.passes import Target, head_dims, plan_kernel

    path = workdir / f"m{mutant.index}.attn"
    path.write_bytes(mutant.source.encode("utf-8", "surrogatepass"))
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        status = cli.main(["check", str(path)])
    if status not in (0, 2):
        raise AssertionError(f"attnc check exited with {status}")
    specs = attnc.parse(mutant.source, filename=path.name)
    for spec in specs:
        spec.key
        d, dv = head_dims(spec, spec.dim_values.get("D", 64))
        generate(plan_kernel(spec, Target("triton", "cuda", 90), d, dv))
        _show(spec)
    return "ok"


class Slow(Exception):
    """A step with its own time bound took longer: reported as a hang."""


def _show(spec) -> None:
    """Print `spec` as `attnc show --emit ir|plan` does, each within SHOW_LIMIT_S of CPU; the ir text, where it is
    spec text, must read back to the same kernel key."""
    import attnc
    from attnc import cli

    for form in SHOWN:
        module, function = cli.EMITTERS[form].split(":")
        start = time.process_time()
        text = getattr(importlib.import_module(module), function)(spec)
        cpu = time.process_time() - start
        if cpu > SHOW_LIMIT_S:
            raise Slow(f"attnc show --emit {form} took {cpu:.2f} s of CPU ({len(text):,} characters)")
        # A NaN constant (a Python front-end's `scale=float("nan")`) prints as `nan`, which the language lacks.
        if form == "ir" and spec.canonical_parses and not _NAN.search(text):
            try:
                same = [s.key for s in attnc.parse(text)] == [spec.key]
            except attnc.AttncError as e:
                raise AssertionError(f"attnc show --emit ir does not parse: {e}") from None
            if not same:
                raise AssertionError(f"attnc show --emit ir reads back to another key:\n{text[:2000]}")


def _run_python(mutant: Mutant, workdir: Path) -> str:
    import attnc
    import torch

    path = workdir / f"m{mutant.index}.py"
    path.write_text(mutant.source)
    scope: dict = {"attnc": attnc}
    exec(compile(mutant.source, str(path), "exec"), scope)  # the mutant's own source: spans point into it
    q = torch.randn(1, 2, 4, 8)
    try:
        spec = scope["run"](attnc, q, q, q)
    except attnc.AttncError:
        raise
    except Exception as e:
        if traceback.extract_tb(e.__traceback__)[-1].filename == str(path):
            return "user"  # raised by the mutant's own Python (1 // 0 on two ints), as it would be without attnc
        raise
    _show(spec)
    return "ok"


def run_one(mutant: Mutant, workdir: Path) -> tuple[str, str]:
    import attnc

    try:
        return (_run_text if mutant.kind == "text" else _run_python)(mutant, workdir), ""
    except attnc.AttncError:
        return "error", ""
    except Slow as e:
        return "hang", str(e)
    except RecursionError as e:  # keep the report short: the frames repeat
        return "traceback", "".join(traceback.format_exception(e)[-6:])
    except Exception as e:
        return "traceback", "".join(traceback.format_exception(e))


def cpu_limit(mutant: Mutant) -> float:
    """The CPU seconds past which `mutant` is a hang: LIMIT_S per LIMIT_CHARS of its source, at least LIMIT_S."""
    return LIMIT_S * max(1.0, len(mutant.source) / LIMIT_CHARS)


def _worker(conn, workdir: str) -> None:
    for mutant in iter(conn.recv, None):
        start = resource.getrusage(resource.RUSAGE_SELF)
        result, detail = run_one(mutant, Path(workdir))
        end = resource.getrusage(resource.RUSAGE_SELF)
        cpu = end.ru_utime + end.ru_stime - start.ru_utime - start.ru_stime
        conn.send((result if cpu <= cpu_limit(mutant) or result in FINDINGS else "hang", detail, cpu))


# ---------------------------------------------------------------- the pool


class _Worker:
    def __init__(self, context, workdir: str):
        self.conn, child = context.Pipe()
        self.process = context.Process(target=_worker, args=(child, workdir), daemon=True)
        self.process.start()
        child.close()
        self.mutant: Mutant | None = None
        self.started = 0.0

    def give(self, mutant: Mutant) -> None:
        self.mutant, self.started = mutant, time.monotonic()
        self.conn.send(mutant)

    def stop(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join()
        self.conn.close()


def _warm() -> None:
    """Import what the workers run before forking them, so that each starts warm."""
    import attnc
    from attnc.backends.triton.generate import generate  # noqa: F401
    from attnc.dsl.flex import flex_spec  # noqa: F401
    from attnc.runtime.api import emit_plan  # noqa: F401

    attnc.parse(EXAMPLES[0].read_text())


def fuzz(n: int, seed: int = 0, workers: int = 2, only: list[int] | None = None, progress=None) -> list[Outcome]:
    """Run mutants 0..n-1 of `seed` (or the indices `only`) on `workers` forked processes; every outcome, in order."""
    _warm()
    corpus = _corpus()
    indices = iter(only if only is not None else range(n))
    todo = (make_mutant(seed, i, corpus) for i in indices)  # made as needed: a mutant may be megabytes
    count = len(only) if only is not None else n
    context = multiprocessing.get_context("fork")
    outcomes: list[Outcome] = []
    with tempfile.TemporaryDirectory(prefix="attnc-fuzz-") as workdir:
        pool = [_Worker(context, workdir) for _ in range(max(1, min(workers, count)))]
        pending = next(todo, None)
        try:
            while pending is not None or any(w.mutant is not None for w in pool):
                for w in pool:
                    if w.mutant is None and pending is not None:
                        w.give(pending)
                        pending = next(todo, None)
                ready = wait([w.conn for w in pool if w.mutant is not None], timeout=0.5)
                now = time.monotonic()
                for index, w in enumerate(pool):
                    if w.mutant is None:
                        continue
                    dead = False
                    if w.conn in ready:
                        try:
                            result, detail, cpu = w.conn.recv()
                        except EOFError:
                            w.process.join()
                            result, detail, cpu, dead = "crash", f"worker exit code {w.process.exitcode}", 0.0, True
                    elif now - w.started > KILL_S:
                        result, detail, cpu, dead = "hang", f"killed after {KILL_S:.0f} s", KILL_S, True
                    else:
                        continue
                    outcomes.append(Outcome(w.mutant, result, detail, cpu))
                    if progress is not None:
                        progress(outcomes[-1])
                    w.mutant = None
                    if dead:
                        w.stop()
                        pool[index] = _Worker(context, workdir)
        finally:
            for w in pool:
                with contextlib.suppress(Exception):
                    w.conn.send(None)
                w.stop()
    outcomes.sort(key=lambda o: o.mutant.index)
    return outcomes


def summary(outcomes: list[Outcome]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for o in outcomes:
        counts[o.result] = counts.get(o.result, 0) + 1
    return counts
