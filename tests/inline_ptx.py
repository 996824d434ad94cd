"""The sm_90 Triton modules' inline-PTX helpers (common.j2), and their source made to run in the interpreter, which
runs no inline assembly."""
INLINE_EX2 = 'tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32, is_pure=True, pack=1)'
INLINE_RCP = 'tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32, is_pure=True, pack=1)'


def interpretable(source: str) -> str:
    """`source` with each helper's body as its tl equivalent."""
    assert INLINE_EX2 in source and INLINE_RCP in source
    return source.replace(INLINE_EX2, "tl.exp2(x)").replace(INLINE_RCP, "1.0 / x")
