"""KernelPlan -> the source of the decode / serving module: `attn_decode` (split-KV, packed GQA rows, dense,
ragged or paged storage) and `attn_combine` (the LSE merge of the splits), from decode.py.j2. Expressions
come from the same emitter as the prefill kernel; `generate_decode` is pure: the same plan gives the same text.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import jinja2

from ... import __version__
from ...ir import Paged, Ragged
from ...passes.plan import KernelPlan
from .emit import Emitter, input_arg, param_arg, size_arg, stride_arg
from .generate import _as_tile, _bounds, _float_tile, _wrap_args, kernel_args


@dataclass(frozen=True)
class DecodeArgs:
    """The runtime arguments `attn_decode` takes after its fixed pointers and strides."""

    sizes: tuple[str, ...]  # size names, in order
    size_args: tuple[str, ...]  # their argument names: cap_M / cap_N where sequences have their own lengths
    params: tuple[str, ...]
    inputs: tuple[tuple[str, int], ...]  # (input name, rank): t_<name> then its strides

    def names(self) -> list[str]:
        names = list(self.size_args) + [param_arg(p) for p in self.params]
        for t, rank in self.inputs:
            names += [input_arg(t)] + [stride_arg(t, axis) for axis in range(rank)]
        return names


def decode_args(plan: KernelPlan) -> DecodeArgs:
    spec = plan.spec
    base = kernel_args(plan)
    sizes = base.sizes
    if isinstance(spec.kv_storage, Paged) and "PAGE" not in sizes and "PAGE" not in spec.dim_values:
        sizes += ("PAGE",)
    per_sequence = {"M": spec.q_storage is not None, "N": spec.kv_storage is not None}
    size_args = tuple(f"cap_{s}" if per_sequence.get(s) else size_arg(s) for s in sizes)
    return DecodeArgs(sizes, size_args, base.params, base.inputs)


@lru_cache(maxsize=1)
def _template() -> jinja2.Template:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(Path(__file__).parent), undefined=jinja2.StrictUndefined,
                             keep_trailing_newline=True)
    return env.get_template("decode.py.j2")


def generate_decode(plan: KernelPlan) -> str:
    spec, masks, tiling = plan.spec, plan.masks, plan.tiling
    args = decode_args(plan)

    main = Emitter(spec)
    _bounds(main, masks.exact, masks.hull)
    sink = None
    if plan.score.sink2 is not None:
        v = main.value(plan.score.sink2)
        sink = main.as_float(v, v.level) if v.level else f"tl.zeros([BLOCK_M], tl.float32) + {main.as_float(v, 0)}"
    with main.scope() as score_lines:
        logits = _float_tile(main, plan.score.logits2)
        with main.scope() as mask_lines:
            keep_terms = "".join(f" & ({_as_tile(main, c)})" for c in masks.evaluated)

    storage = {"q_offsets": "0", "q_offsets_stride": "0", "kv_offsets": "0", "kv_offsets_stride": "0",
               "kv_lengths": "0", "kv_lengths_stride": "0", "table": "0", "table_row_stride": "0",
               "table_stride": "0", "page_size": "0"}
    if isinstance(spec.q_storage, Ragged):
        storage.update(q_offsets=input_arg(spec.q_storage.offsets),
                       q_offsets_stride=stride_arg(spec.q_storage.offsets, 0))
    kv = spec.kv_storage
    if isinstance(kv, Ragged):
        storage.update(kv_offsets=input_arg(kv.offsets), kv_offsets_stride=stride_arg(kv.offsets, 0))
    elif isinstance(kv, Paged):
        page = spec.dim_values.get("PAGE")
        storage.update(kv_lengths=input_arg(kv.lengths), kv_lengths_stride=stride_arg(kv.lengths, 0),
                       table=input_arg(kv.table), table_row_stride=stride_arg(kv.table, 0),
                       table_stride=stride_arg(kv.table, 1), page_size=str(page) if page else size_arg("PAGE"))

    pad_d, pad_dv = tiling.block_d != plan.head_dim, tiling.block_dv != plan.value_dim
    runtime_scalars = list(args.size_args) + [param_arg(p) for p in args.params] + ["search_steps", "n_splits"]
    d = plan.decode.tile
    return _template().render(
        version=__version__, name=spec.name, key=plan.spec_key[:16],
        plan_line=(f"{plan.target.backend}/{plan.target.device}"
                   f"{'' if plan.target.arch is None else f'/sm_{plan.target.arch}'} {plan.dtype} D={plan.head_dim} "
                   f"DV={plan.value_dim}; decode <= {d.block_m} rows x {d.block_n} w{d.num_warps} s{d.num_stages}, "
                   f"up to {plan.decode.max_splits} splits"),
        head_dim=plan.head_dim, value_dim=plan.value_dim, block_d=tiling.block_d, block_dv=tiling.block_dv,
        runtime_scalars=", ".join(f'"{n}"' for n in runtime_scalars),
        common_args=_wrap_args(args.names()),
        prologue="\n".join(main.prologue), score_lines="\n".join(score_lines), logits=logits,
        mask_lines="\n".join(mask_lines), keep_terms=keep_terms,
        all_partial=bool(masks.evaluated),  # data-dependent masks too: evaluated on every tile, no summary
        sink=sink, returns_lse=spec.returns_lse,
        ragged_q=spec.q_storage is not None,
        kv_storage="paged" if isinstance(kv, Paged) else "ragged" if isinstance(kv, Ragged) else "dense",
        **storage,
        dot_args=', input_precision="ieee"' if plan.dtype == "f32" and plan.triton.dot_precision == "ieee" else "",
        d_mask_q=" & (offs_d[None, :] < HEAD_DIM)" if pad_d else "",
        d_mask_k=" & (offs_d[:, None] < HEAD_DIM)" if pad_d else "",
        d_mask_v=" & (offs_dv[None, :] < VALUE_DIM)" if pad_dv else "",
        d_mask_o=" & (offs_dv[None, :] < VALUE_DIM)" if pad_dv else "",
    )
