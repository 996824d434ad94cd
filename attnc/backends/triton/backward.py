"""KernelPlan -> the source of the backward module (backward.py.j2): `attn_bwd_prep`, `attn_bwd_dkdv` and
`attn_bwd_dq`. Everything variant-specific comes from the IR that passes/grad.py derives (d score / d qk, the
derivatives of the score and the sink by each float input they read, the normalizer's dS rule) and from the
forward's mask analysis, through the forward's expression emitter; `generate_backward` is pure: the same plan
gives the same text."""
from __future__ import annotations

from ...ir import Expr, walk
from ...passes.grad import SCORE, WEIGHT, Derivatives, TableGrad, derive, normalizer_backward, plan_backward
from ...passes.plan import BackwardPlan, KernelPlan, QueryRange, TileConfig
from .. import names
from .emit import COL, KEY_MAJOR, QUERY_MAJOR, ROW, SCALAR, TILE, TRITON_VECTORS, Emitter, Layout, Vectors, exp2_for
from .generate import as_tile, bounds, float_tile, shared_hooks, template
from .signature import backward_signatures, gradient_tables, spec_args, summary_used


def generate_backward(plan: KernelPlan) -> str:
    spec, masks = plan.spec, plan.masks
    backward = plan_backward(plan)
    derivs = derive(spec)
    rule = normalizer_backward(spec.normalizer)
    exp2 = exp2_for(plan.target.arch)
    data_dependent = summary_used(plan)
    signatures = backward_signatures(spec_args(plan, per_sequence=True), gradient_tables(spec), data_dependent,
                                     plan.triton.tma)
    ragged_q, ragged_kv = spec.q_storage is not None, spec.kv_storage is not None

    # attn_bwd_prep: per row, the sink's gradient into the tables it reads
    prep = Emitter(spec, exp2, approx=plan.approximated())
    bounds(prep, masks.exact, masks.hull)  # the rows macro's key-tile range reads them
    sink, sink_lines = "", []
    if plan.score.sink2 is not None:
        v = prep.value(plan.score.sink2)
        sink = prep.as_float(v, v.level) if v.level else f"tl.zeros([BLOCK_M], tl.float32) + {prep.as_float(v, 0)}"
        for n, grad in enumerate(derivs.sink_tables):
            sink_lines += scatter(prep, grad, "dsink", ROW, f"c{n}", masked=False)

    dkdv = dkdv_hooks(plan, derivs, exp2, data_dependent=data_dependent)

    # attn_bwd_dq: the forward's shape
    dq = Emitter(spec, exp2, approx=plan.approximated())
    bounds(dq, masks.exact, masks.hull)
    dq_tiles = {masked: tile_hooks(dq, plan, derivs, masked, tables=False) for masked in (False, True)}

    storage = {}
    for side, st in (("q", spec.q_storage), ("kv", spec.kv_storage)):
        if st is not None:
            storage.update({f"{side}_offsets": names.tensor(st.offsets),
                            f"{side}_offsets_stride": names.stride(st.offsets, 0)})
    hooks = shared_hooks(plan, exp2)
    return template("backward.py.j2").render({
        **hooks,  # the forward's hooks; the backward's own below take precedence
        **storage,
    }, plan_line=_plan_line(plan, backward),
        ragged_q=ragged_q, ragged_kv=ragged_kv,
        q_rows="q_row0 + i_row.to(tl.int64)" if ragged_q else "i_row.to(tl.int64)",
        k_rows="k_row0 + j_col.to(tl.int64)" if ragged_kv else "j_col.to(tl.int64)",
        normalized=rule.normalized,
        delta_line=delta_line(rule.normalized, exp2),
        tables=bool(derivs.tables), gqa=plan.spec.is_gqa_shape,
        prep_prologue="\n".join(prep.prologue), sink=sink, sink_lines="\n".join(sink_lines),
        head_lines="\n".join(dkdv["prologue"] + dkdv["range_lines"]), row_lines=dkdv["row_lines"], full=dkdv["full"],
        dkdv_tiles=dkdv["tiles"], key_major=_orientation(KEY_MAJOR),
        dq_prologue="\n".join(dq.prologue), dq_tiles=dq_tiles, query_major=_orientation(QUERY_MAJOR),
        d_mask_vt=" & (offs_dv[:, None] < VALUE_DIM)" if hooks["d_mask_v"] else "",
        # the dQ kernel's key loops: common.key_loops as the forward's, without descriptors
        data_dependent=data_dependent, all_partial=bool(masks.evaluated) and not data_dependent,
        partial_before=bool(masks.exact.lower), ws_arg="",
        tma=plan.triton.tma, per_tile_check=backward.queries.per_tile_check,
        **{f"{name.removeprefix('attn_bwd_')}_signature": s.render() for name, s in signatures.items()},
        **{f"{name.removeprefix('attn_bwd_')}_scalars": s.unspecialized() for name, s in signatures.items()},
    )


def dkdv_hooks(plan: KernelPlan, derivs: Derivatives, exp2: str, vectors: Vectors = TRITON_VECTORS,
               data_dependent: bool = False, full_range: bool = True, select_zero_dqk: bool = True) -> dict:
    """The dK/dV kernel's emitted lines (attn_bwd_dkdv's, and the Gluon kernel's with GLUON_VECTORS): per head
    (scope 0, `prologue`) the values free of i and `range_lines`, the query tiles [m_start, m_end) this key tile can
    meet (and, with `full_range`, [f_start, f_end) of full ones where the plan knows them); per query tile (scope 1)
    `row_lines`, the rows' key bounds, and the `tiles`' element-wise work, full and partial; `full`, the per-tile
    condition of a full tile (with `data_dependent`, the tile summary's class too)."""
    masks, backward = plan.masks, plan_backward(plan)
    em = Emitter(plan.spec, exp2, KEY_MAJOR, vectors, plan.approximated())
    range_lines = query_tiles(em, backward.queries)
    if full_range and not backward.queries.per_tile_check:
        range_lines += full_query_tiles(em, backward.full_queries)
    with em.scope() as row_lines:
        bounds(em, masks.exact, masks.hull, row_lines)
        tiles = {masked: tile_hooks(em, plan, derivs, masked, tables=True, select_zero_dqk=select_zero_dqk)
                 for masked in (False, True)}
    full = "(tl.min((row_valid & (exact_lo <= key_first) & (exact_hi >= key_first + BLOCK_N)).to(tl.int32), 0) > 0)"
    if data_dependent:
        full += " & (cls == 1)"
    elif masks.evaluated:
        full = "False"  # evaluated on every tile
    return dict(prologue=em.prologue, range_lines=range_lines, row_lines="\n".join(row_lines), tiles=tiles, full=full)


def delta_line(normalized: bool, exp2: str) -> str:
    """The row term of dS = g (dP - delta) (grad.py): normalised rows rowsum(dO * O) - dlse; others
    -dlse exp(-lse), 0 where the row kept nothing or no dlse flows (where exp(-lse) is not even evaluated: it
    may overflow)."""
    if normalized:
        return "delta = tl.sum(o_tile * do_tile, 1) - dlse"
    return ("unused = (lse == -INF) | (dlse == 0.0)\n"
            f"delta = tl.where(unused, 0.0, -dlse * {exp2}(-tl.where(unused, 0.0, lse) * LOG2E))")


def query_tiles(em: Emitter, queries: QueryRange) -> list[str]:
    """The dK/dV kernel's lines that set [m_start, m_end), the query tiles whose rows can keep a key of
    [key_first, key_end) (plan.QueryRange); the bounds' values are emitted into `em`'s per-head prologue."""
    lines = row_range(em, queries, "q", "key_end > key_first", ("key_first + 1", "key_end", "> key_first", "< key_end"))
    # clamped into [0, M], the tile indices fit int32, and so do the positions i the loop makes from them
    return lines + ["m_start = (tl.minimum(q_lo, sz_M) // BLOCK_M).to(tl.int32)",
                    "m_end = ((tl.minimum(q_hi, sz_M) + BLOCK_M - 1) // BLOCK_M).to(tl.int32)"]


def full_query_tiles(em: Emitter, full: QueryRange | None) -> list[str]:
    """The lines that set [f_start, f_end), the query tiles of [m_start, m_end) whose rows are all inside the
    sequence and keep every key of [key_first, key_first + BLOCK_N) (BackwardPlan.full_queries); an empty range
    at m_end where no tile is known full."""
    if full is None:
        return ["f_start = m_end", "f_end = m_end"]
    lines = row_range(em, full, "f", "key_first + BLOCK_N <= sz_N",
                      ("key_first + BLOCK_N", "key_first + 1", ">= key_first + BLOCK_N", "<= key_first"))
    # whole tiles inside the rows [f_lo, f_hi) (f_lo >= 0; f_hi <= M), within [m_start, m_end)
    return lines + ["f_start = tl.minimum(tl.maximum(((f_lo + BLOCK_M - 1) // BLOCK_M).to(tl.int32), m_start), m_end)",
                    "f_end = tl.minimum(tl.maximum((tl.maximum(f_hi, 0) // BLOCK_M).to(tl.int32), f_start), m_end)"]


def row_range(em: Emitter, rows: QueryRange, prefix: str, some: str, rules: tuple[str, str, str, str]) -> list[str]:
    """Lines that set the query rows [<prefix>_lo, <prefix>_hi) of `rows` for this program's key tile: all rows
    where `some` holds, narrowed by each bound i + r (rows >= rules[0] - r from upper ones, < rules[1] - r from
    lower ones), none unless every free upper bound satisfies rules[2] and every free lower one rules[3]."""
    def code(e: Expr) -> str:
        return em.as_int(em.value(e), SCALAR)

    lo, hi = f"{prefix}_lo", f"{prefix}_hi"
    lines = [f"{lo} = {em.vectors.scalar('0', 'tl.int64')}", f"{hi} = tl.where({some}, sz_M, 0).to(tl.int64)"]
    lines += [f"{lo} = tl.maximum({lo}, {rules[0]} - {code(r)})" for r in rows.from_upper]
    lines += [f"{hi} = tl.minimum({hi}, {rules[1]} - {code(r)})" for r in rows.from_lower]
    lines += [f"{hi} = tl.where({code(u)} {rules[2]}, {hi}, 0)" for u in rows.upper_free]
    lines += [f"{hi} = tl.where({code(x)} {rules[3]}, {hi}, 0)" for x in rows.lower_free]
    return lines


def tile_hooks(em: Emitter, plan: KernelPlan, derivs: Derivatives, masked: bool, tables: bool,
               select_zero_dqk: bool = True) -> dict:
    """The emitted lines of one tile's element-wise work (backward.py.j2's `tile`), full or partial, each in a
    scope of its own (the template puts the two in the branches of one `if`). `select_zero_dqk`: a partial tile
    zeroes dS at masked keys by a select even where p (0 there) already does (the Gluon kernel passes False: the
    select kept `keep` alive across dP's wait; the template's register allocation came out worse without it)."""
    rule = normalizer_backward(plan.spec.normalizer)
    with em.scope() as score_lines:
        logits = float_tile(em, plan.score.logits2)
        mask_lines, keep_terms = [], ""
        if masked:
            with em.scope() as mask_lines:
                keep_terms = "".join(f" & ({as_tile(em, c)})" for c in plan.masks.evaluated)
        with em.scope() as grad_lines:
            gain = "p" if rule.normalized else _weight_derivative(em, rule.dweight, grad_lines)
            dqk_value = em.value(derivs.dqk)
            dqk = em.as_float(dqk_value, TILE)
            table_lines = []
            if tables:
                for n, grad in enumerate(derivs.score_tables):
                    table_lines += scatter(em, grad, "ds", TILE, f"c{n}", masked)
    return dict(score_lines="\n".join(score_lines), logits=logits, mask_lines="\n".join(mask_lines),
                keep_terms=keep_terms, grad_lines="\n".join(grad_lines), gain=gain, dqk=dqk,
                # a masked key's p is 0, so its dS is 0 where the gain is p and d score / d qk one value a program
                # (no NaN or inf of a masked key's score to multiply)
                mask_dqk=select_zero_dqk or not (rule.normalized and dqk_value.level == SCALAR),
                table_lines="\n".join(table_lines))


def _weight_derivative(em: Emitter, dweight: Expr, lines: list[str]) -> str:
    """f'(s) of an unnormalised normalizer, from its IR over grad.SCORE (the natural-log score) and grad.WEIGHT
    (f(s), the tile's `p`)."""
    if SCORE in set(walk(dweight)):
        lines.append("s_nat = s * LN2")
        em.bind(SCORE, "s_nat", TILE, "float")
    em.bind(WEIGHT, "p", TILE, "float")
    return em.as_float(em.value(dweight), TILE)


def scatter(em: Emitter, grad: TableGrad, contribution: str, level: int, name: str, masked: bool) -> list[str]:
    """Lines that add `contribution` (code of a value of `level`: dS, or the sink's gradient) times grad.dscore
    into the gradient of grad.lookup's table at the element the lookup reads. The product is summed to the level
    of that element's offset first (a per-head table takes one add per tile), then added by an atomic, or
    (DETERMINISTIC) into the program's slice of the workspace (by add_ordered, or for one element an atomic that
    only this program issues); out-of-range lookups add nothing."""
    table = grad.lookup.tensor
    strides = [names.gradient_stride(table, a) for a in range(len(grad.lookup.indices))]
    offset, checks, at = em.element(grad.lookup, strides)
    lines = [f"{name} = {contribution} * {em.as_float(em.value(grad.dscore), level)}"]
    if masked:
        lines.append(f"{name} = tl.where(keep, {name}, 0.0)")
    total = _reduce(name, level, at, em.layout)
    ok = " & ".join(f"({c})" for c in checks)
    mask = f", mask={ok}" if ok else ""
    slice_ = f"{names.gradient(table)} + prog * {names.gradient_stride(table, 'p')}"
    if at == SCALAR:
        # One add per tile into the program's own slice, issued by one thread in program order: deterministic.
        # (A load and a store here gave wrong per-head gradients on the H100, bit-identical run to run.)
        ordered = [f"tl.atomic_add({slice_} + {offset}, {total}{mask})"]
    else:
        size = {ROW: "BLOCK_M", COL: "BLOCK_N", TILE: "BLOCK_M * BLOCK_N"}[at]
        ordered = [f"add_ordered({slice_}, {offset}, {total}, {ok or 'True'}, {size})"]
    return lines + ["if DETERMINISTIC:", *(f"    {line}" for line in ordered),
                    "else:", f"    tl.atomic_add({names.gradient(table)} + {offset}, {total}{mask})"]


def _reduce(code: str, level: int, to: int, layout: Layout) -> str:
    """Code for the value `code` of `level` summed down to level `to` (over keys for a row value, over queries
    for a col value)."""
    if level == to:
        return code
    if level == TILE and to != SCALAR:
        keys_axis = 0 if layout.keys_major else 1
        return f"tl.sum({code}, {keys_axis if to == ROW else 1 - keys_axis})"
    return f"tl.sum(tl.sum({code}, 1), 0)" if level == TILE else f"tl.sum({code}, 0)"


def _orientation(layout: Layout) -> dict:
    """How a layout's tiles broadcast rows and cols, and the partial tile's kept-element terms beyond the
    forward's: the dK/dV kernel sums over its rows, so rows past the sequence are masked there."""
    row, col = layout.broadcast(ROW), layout.broadcast(COL)
    return dict(row=row, col=col, extra=f" & row_valid{row}" if layout.keys_major else "")


def _plan_line(plan: KernelPlan, backward: BackwardPlan) -> str:
    def tile(c: TileConfig) -> str:
        return f"{c.block_m}x{c.block_n} w{c.num_warps} s{c.num_stages}"

    return (f"{plan.target.backend}/{plan.target.device}"
            f"{'' if plan.target.arch is None else f'/sm_{plan.target.arch}'} {plan.dtype} D={plan.head_dim} "
            f"DV={plan.value_dim}; backward dK/dV {tile(backward.dkdv)}, dQ {tile(backward.dq)}")
