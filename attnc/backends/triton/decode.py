"""KernelPlan -> the source of the decode / serving module: `attn_decode` (split-KV, packed GQA rows, dense,
ragged or paged storage) and `attn_combine` (the LSE merge of the splits), from decode.py.j2. Expressions
come from the same emitter as the prefill kernel; `generate_decode` is pure: the same plan gives the same text.
The checks of the index data (attnc/index_data.py) are generated with the storage: the kernel names the tensors
it records in the error buffer by their place in `spec.inputs`.
"""
from __future__ import annotations

from ... import index_data
from ...ir import FP8_DTYPES, QUANTIZE_DTYPES, QUANTIZE_TINY, Paged, Ragged, TensorDecl
from ...passes.decode import dot_size
from ...passes.latent_decode import persistent_latent
from ...passes.plan import KernelPlan
from ...passes.tiling import next_pow2
from .. import names
from .generate import shared_hooks, template
from .signature import COMBINE_SIGNATURE, SCHEDULED_COMBINE_SIGNATURE, decode_signature, spec_args


def storage_hooks(plan: KernelPlan) -> tuple[dict, list[dict]]:
    """The storage switches' names (offsets, lengths, block table, page size and the tensors' numbers in the error
    buffer; "0" where the spec has none) and every offsets tensor a program checks."""
    spec = plan.spec
    storage = {"q_offsets": "0", "q_offsets_stride": "0", "kv_offsets": "0", "kv_offsets_stride": "0",
               "kv_lengths": "0", "kv_lengths_stride": "0", "table": "0", "table_row_stride": "0",
               "table_stride": "0", "page_size": "0", "lengths_tensor": "0", "table_tensor": "0"}
    place = {t.name: n for n, t in enumerate(spec.inputs)}  # a tensor's number in the error buffer
    offsets = []  # every offsets tensor, checked by every program (its q and k/v roles separately: T and TK)
    if isinstance(spec.q_storage, Ragged):
        name = spec.q_storage.offsets
        storage.update(q_offsets=names.tensor(name), q_offsets_stride=names.stride(name, 0))
        offsets.append(dict(arg=names.tensor(name), stride=names.stride(name, 0), tensor=place[name],
                            total=names.capacity("M"), is_kv=0))
    kv = spec.kv_storage
    if isinstance(kv, Ragged):
        storage.update(kv_offsets=names.tensor(kv.offsets), kv_offsets_stride=names.stride(kv.offsets, 0))
        offsets.append(dict(arg=names.tensor(kv.offsets), stride=names.stride(kv.offsets, 0),
                            tensor=place[kv.offsets], total=names.capacity("N"), is_kv=1))
    page = spec.dim_values.get("PAGE")
    if isinstance(kv, Paged):
        storage.update(kv_lengths=names.tensor(kv.lengths), kv_lengths_stride=names.stride(kv.lengths, 0),
                       table=names.tensor(kv.table), table_row_stride=names.stride(kv.table, 0),
                       table_stride=names.stride(kv.table, 1), page_size=str(page) if page else names.size("PAGE"),
                       lengths_tensor=str(place[kv.lengths]), table_tensor=str(place[kv.table]))
    return storage, offsets


def generate_decode(plan: KernelPlan) -> str:
    spec = plan.spec
    args = spec_args(plan, per_sequence=True)
    storage, offsets = storage_hooks(plan)
    kv = spec.kv_storage
    page = spec.dim_values.get("PAGE")
    dots = latent_dots(plan)
    # every key-side tile as key_steps walks it: (name, stride between keys, between pages, keys along its rows)
    key_sides = [("k_tile", "s_kn", "s_kb", False)] + ([] if spec.shares_kv else [("v_tile", "s_vn", "s_vb", True)])
    key_sides += [(d["key_tile"], d["seq_stride"], d["pages_stride"], False) for d in dots]
    signature = decode_signature(args)
    d = plan.decode.tile
    return template("decode.py.j2").render(
        **shared_hooks(plan),
        plan_line=(f"{plan.target.backend}/{plan.target.device}"
                   f"{'' if plan.target.arch is None else f'/sm_{plan.target.arch}'} {plan.dtype} D={plan.head_dim} "
                   f"DV={plan.value_dim}; decode <= {d.block_m} rows x {d.block_n} w{d.num_warps} s{d.num_stages}, "
                   f"up to {plan.decode.max_splits} splits"),
        runtime_scalars=signature.unspecialized(),
        decode_signature=signature.render(),
        combine_signature=COMBINE_SIGNATURE.render(),
        # the persistent Gluon MLA decode kernel's merge of the items its shares cut
        scheduled_combine_signature=SCHEDULED_COMBINE_SIGNATURE.render() if persistent_latent(plan) else "",
        all_partial=bool(plan.masks.evaluated),  # data-dependent masks too: evaluated on every tile, no summary
        ragged_q=spec.q_storage is not None,
        kv_storage="paged" if isinstance(kv, Paged) else "ragged" if isinstance(kv, Ragged) else "dense",
        index_data=spec.q_storage is not None or kv is not None,
        offsets=offsets,
        dots=dots,
        key_sides=key_sides,
        # a page size bound by `dims` that is a multiple of the launch's BLOCK_N (a constexpr condition): each key
        # tile lies in one page, so the kernel reads one page id a tile and steps its tiles as a contiguous cache's
        page_tiles=f"{page} % BLOCK_N == 0" if isinstance(kv, Paged) and page else "",
        shares_kv=spec.shares_kv,
        k_fp8=spec.k.dtype in FP8_DTYPES,
        v_fp8=spec.v.dtype in FP8_DTYPES,
        q_quantized=spec.quantized("q") is not None,
        quantize_max=QUANTIZE_DTYPES["f8e4m3"],
        quantize_tiny=repr(QUANTIZE_TINY),
        err=ERROR_CONSTANTS,
        **storage,
    )


def latent_dots(plan: KernelPlan) -> list[dict]:
    """The dot products of latent attention beyond qk (`qr @ kr`), each as the decode template reads it: its
    tile's name (the emitter's, emit.dot_tile), its query-side tile (loaded once per program, as q's: `query`, in
    [BLOCK_M, width]) and the pieces of its key-side tile's address (`base` per program, `columns` per key tile:
    the rows of k's storage), `width` the head dim's block and `dim` its size (D, or bound by `dims`)."""
    spec = plan.spec
    dots = []
    for n, dot in enumerate(spec.dots):
        if dot.is_qk:
            continue
        query, key = spec.input(dot.query), spec.input(dot.key)
        dim = spec.dot_dim(dot)
        size = dot_size(plan, dot)
        qa, ka = _axes(query), _axes(key)
        offs = f"offs_dot{n}"
        rows = "q_rows" if spec.q_storage is not None else "i_row.to(tl.int64)"
        batch = "" if "B" not in qa else f"b * {names.stride(query.name, qa['B'])} + "
        head_axis = ka.get("HKV", ka.get("H"))
        head = "" if head_axis is None else f" + kvh * {names.stride(key.name, head_axis)}"  # none: one K/V head
        if isinstance(spec.kv_storage, Paged):
            base = f"{names.tensor(key.name)}{head}"
            seq, pages = names.stride(key.name, ka["PAGE"]), names.stride(key.name, ka["PAGES"])
        else:
            seq, pages = names.stride(key.name, ka["TK" if "TK" in ka else "N"]), ""
            start = f" + k_row0 * {seq}" if isinstance(spec.kv_storage, Ragged) else ""
            batch_k = f" + b * {names.stride(key.name, ka['B'])}" if "B" in ka else ""
            base = f"{names.tensor(key.name)}{batch_k}{start}{head}"
        dots.append(dict(
            tile=f"qk_{n}", query_tile=f"qdot{n}_tile", key_tile=f"kdot{n}_tile", key_base=f"kdot{n}_base",
            offs=offs, width=max(16, next_pow2(size)), dim=str(size), base=base, fp8=key.dtype in FP8_DTYPES,
            quantized=spec.quantized(query.name) is not None,
            seq_stride=seq, pages_stride=pages, key_dim_stride=names.stride(key.name, ka[dim]),
            query=(f"{names.tensor(query.name)} + {batch}h_row[:, None] * {names.stride(query.name, qa['H'])} + "
                   f"{rows}[:, None] * {names.stride(query.name, qa['T' if 'T' in qa else 'M'])} + "
                   f"{offs}[None, :] * {names.stride(query.name, qa[dim])}")))
    return dots


def _axes(t: TensorDecl) -> dict[str, int]:
    return {name: axis for axis, name in enumerate(t.shape)}


# The record layout and violation kinds as the kernel's constexprs (ERR_COUNT, ..., ERR_PAGE_ID).
ERROR_CONSTANTS = tuple((f"ERR_{name}", getattr(index_data, name)) for name in (
    "COUNT", "SITE", "TENSOR", "KIND", "SEQ", "INDEX", "VALUE", "LIMIT", "OTHER",
    "PAGE_ID", "LENGTH", "OFFSETS_START", "OFFSETS_DECREASE", "OFFSETS_END"))
