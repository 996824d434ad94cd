"""Compile-only evidence about a kernel that triton.compile built for sm_90 (no GPU needed): ptxas's registers and
spills, counts of the instructions that tell how it runs (wgmma vs mma.sync, TMA, ldmatrix/stmatrix and shared
memory round trips, local-memory spills, exp2, atomics), and the same counts per loop of the SASS that holds an
MMA (a backward branch's body; a pipelined loop's waits may fall outside or inside it, so read the counts as
rough). benchmarks/compile_backward_sm90.py prints them with STATS=1, benchmarks/compile_prefill_sm90.py always.
`compile_sm90` compiles a launch the scripts captured as the JIT would specialize it."""
from __future__ import annotations

import os
import re
import subprocess
import tempfile

PTX = {"wgmma": r"wgmma\.mma_async", "mma.sync": r"mma\.sync", "ldmatrix": r"ldmatrix", "stmatrix": r"stmatrix",
       "st.shared": r"st\.shared", "ld.shared": r"ld\.shared", "cp.async.bulk": r"cp\.async\.bulk",
       "bar": r"bar\.sync|barrier\.sync", "wgmma.wait": r"wgmma\.wait_group", "red/atom": r"\bred\.|\batom\.",
       "ex2": r"ex2\.approx"}
SASS = {"HGMMA": r"HGMMA", "QGMMA": r"QGMMA", "HMMA": r"HMMA", "LDSM": r"LDSM", "STSM": r"STSM", "STS": r"\bSTS\b",
        "LDS": r"\bLDS\b", "LDL": r"\bLDL", "STL": r"\bSTL", "BAR": r"\bBAR\b", "WARPSYNC": r"WARPSYNC|WARPGROUP", "EX2": r"MUFU\.EX2",
        "RED": r"\bRED", "ATOM": r"\bATOM", "UTMA": r"UTMA|UBLKCP", "I64": r"IMAD\.WIDE|IADD3\.X|LEA\.HI\.X",
        "BRA": r"\bBRA\b"}
# TTGIR: whether the pipeliner ran (multi-buffered TMA loads, asynchronous warpgroup dots) and branches in loops
TTGIR = {"tma_loads": r"async_tma_copy_global_to_local", "async_dots": r"isAsync = true",
         "dot_waits": r"warp_group_dot_wait", "buffers": r"memdesc_index", "if": r"scf\.if", "for": r"scf\.for"}


def count(table: dict[str, str], text: str) -> str:
    return " ".join(f"{k}={len(re.findall(v, text))}" for k, v in table.items())


def ptxas_usage(ptx: str) -> str:
    """ptxas -v's lines on registers and spills for the PTX (Triton's bundled ptxas)."""
    import triton

    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(ptx)
        f.flush()
        err = subprocess.run([ptxas, "-arch=sm_90a", "-v", f.name, "-o", os.devnull], capture_output=True,
                             text=True).stderr
    return " | ".join(line.split("info    : ")[-1].strip() for line in err.splitlines()
                      if "Used" in line or "spill" in line)


def full_sass(cubin: bytes) -> str:
    """triton.tools.disasm.get_sass of the whole kernel: its line pattern takes 4-hex-digit offsets, so it stops at
    the first instruction past 64 KB of code (the Gluon FP8 MLA decode kernel with quantised queries has more)."""
    from triton.tools import disasm

    wide = disasm.FLINE_RE.pattern.replace(r"\w{4}\*", r"\w{4,}\*")
    if disasm.FLINE_RE.pattern != wide:
        disasm.FLINE_RE = re.compile(wide)
        disasm.get_sass.cache_clear()
    return disasm.get_sass(cubin)


def mma_loops(sass: str, needle: str = "MMA") -> list[tuple[str, int, int, list[str]]]:
    """Per backward branch whose body holds an MMA (or `needle`): its label, line range and instructions."""
    lines = sass.splitlines()
    labels = {line.strip().rstrip(":"): n for n, line in enumerate(lines) if re.match(r"^\s*\.?L\w+:\s*$", line)}
    out = []
    for n, line in enumerate(lines):
        m = re.search(r"\bBRA\s+(\w+)", line)
        if m and labels.get(m.group(1), n) < n:
            body = [x for x in lines[labels[m.group(1)]:n + 1] if "\t" in x]
            if needle in "\n".join(body):
                out.append((m.group(1), labels[m.group(1)], n, body))
    return out


def loops(sass: str) -> list[str]:
    """Per backward branch whose body holds an MMA: its line range and instruction counts."""
    return [f"loop {label} lines {start}-{end}: instrs={len(body)} {count(SASS, chr(10).join(body))}"
            for label, start, end, body in mma_loops(sass)]


def key_tile_loop(sass: str) -> str:
    """The counts of the shortest loop that holds an MMA and an exp2: one key tile of a steady-state key loop
    (a warp-specialized kernel's loops nest in the SASS's branch ranges; the shortest is the innermost)."""
    bodies = [body for *_, body in mma_loops(sass) if any(re.search(SASS["EX2"], x) for x in body)]
    return count(SASS, "\n".join(min(bodies, key=len))) if bodies else "none"


def report(name: str, compiled) -> str:
    """Print the counts of a triton.compile result; returns its SASS."""
    from triton.tools.disasm import get_sass

    md, ptx = compiled.metadata, compiled.asm["ptx"]
    sass = get_sass(compiled.asm["cubin"])
    print(f"== {name}: smem={md.shared} warps={md.num_warps} stages={md.num_stages} ptxas: {ptxas_usage(ptx)}")
    print("   ttgir:", count(TTGIR, compiled.asm["ttgir"]))
    print("   ptx:", count(PTX, ptx))
    print("   sass:", count(SASS, sass))
    for line in loops(sass):
        print("   ", line)
    print("   key tile loop:", key_tile_loop(sass))
    return sass


def compile_sm90(fn, args: list, keywords: dict):
    """triton.compile of the JIT function `fn` for sm_90, specialized as the JIT would for the launch's `args`
    (integers divisible by 16 and aligned pointers become attributes, which change what the pipeliner does) and
    constexpr `keywords`; the other keywords (num_warps, num_stages, ...) are compile options."""
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.compiler import ASTSource
    from triton._C.libtriton import native_specialize_impl
    import triton

    signature, constexprs, attrs = {}, {}, {}
    for i, (an, param, value) in enumerate(zip(fn.arg_names, fn.params, [*args, *[None] * (len(fn.params) - len(args))])):
        if param.is_constexpr:
            signature[an], constexprs[an] = "constexpr", keywords.get(an)
            continue
        signature[an], attr = native_specialize_impl(CUDABackend, value, False, not param.do_not_specialize, True)
        if signature[an] == "constexpr":  # an integer 1, or None
            constexprs[an] = attr
        elif isinstance(attr, str):
            attrs[(i,)] = CUDABackend.parse_attr(attr)
    options = {k: v for k, v in keywords.items() if k not in fn.arg_names}
    return triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", 90, 32), options=options)
