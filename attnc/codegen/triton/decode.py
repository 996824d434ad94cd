"""KernelPlan -> the source of the decode / serving module: `attn_decode` (split-KV, packed GQA rows, dense,
ragged or paged storage) and `attn_combine` (the LSE merge of the splits), from decode.py.j2. Expressions
come from the same emitter as the prefill kernel; `generate_decode` is pure: the same plan gives the same text.
The checks of the index data (attnc/index_data.py) are generated with the storage: the kernel names the tensors
it records in the error buffer by their place in `spec.inputs`.
"""
from __future__ import annotations

from dataclasses import dataclass

from ... import index_data
from ...ir import Paged, Ragged
from ...passes.plan import KernelPlan
from .emit import input_arg, param_arg, size_arg, stride_arg
from .generate import _wrap_args, kernel_args, shared_hooks, template


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
    if isinstance(spec.kv_storage, Paged):  # PAGE for the slots (unless bound by dims), PAGES to check page ids
        sizes += tuple(s for s in ("PAGE", "PAGES") if s not in sizes and s not in spec.dim_values)
    per_sequence = {"M": spec.q_storage is not None, "N": spec.kv_storage is not None}
    size_args = tuple(f"cap_{s}" if per_sequence.get(s) else size_arg(s) for s in sizes)
    return DecodeArgs(sizes, size_args, base.params, base.inputs)


def generate_decode(plan: KernelPlan) -> str:
    spec = plan.spec
    args = decode_args(plan)

    storage = {"q_offsets": "0", "q_offsets_stride": "0", "kv_offsets": "0", "kv_offsets_stride": "0",
               "kv_lengths": "0", "kv_lengths_stride": "0", "table": "0", "table_row_stride": "0",
               "table_stride": "0", "page_size": "0", "lengths_tensor": "0", "table_tensor": "0"}
    place = {t.name: n for n, t in enumerate(spec.inputs)}  # a tensor's number in the error buffer
    offsets = []  # every offsets tensor, checked by every program (its q and k/v roles separately: T and TK)
    if isinstance(spec.q_storage, Ragged):
        name = spec.q_storage.offsets
        storage.update(q_offsets=input_arg(name), q_offsets_stride=stride_arg(name, 0))
        offsets.append(dict(arg=input_arg(name), stride=stride_arg(name, 0), tensor=place[name], total="cap_M",
                            is_kv=0))
    kv = spec.kv_storage
    if isinstance(kv, Ragged):
        storage.update(kv_offsets=input_arg(kv.offsets), kv_offsets_stride=stride_arg(kv.offsets, 0))
        offsets.append(dict(arg=input_arg(kv.offsets), stride=stride_arg(kv.offsets, 0), tensor=place[kv.offsets],
                            total="cap_N", is_kv=1))
    elif isinstance(kv, Paged):
        page = spec.dim_values.get("PAGE")
        storage.update(kv_lengths=input_arg(kv.lengths), kv_lengths_stride=stride_arg(kv.lengths, 0),
                       table=input_arg(kv.table), table_row_stride=stride_arg(kv.table, 0),
                       table_stride=stride_arg(kv.table, 1), page_size=str(page) if page else size_arg("PAGE"),
                       lengths_tensor=str(place[kv.lengths]), table_tensor=str(place[kv.table]))

    runtime_scalars = list(args.size_args) + [param_arg(p) for p in args.params] + ["search_steps", "n_splits",
                                                                                     "err_site"]
    d = plan.decode.tile
    return template("decode.py.j2").render(
        **shared_hooks(plan),
        plan_line=(f"{plan.target.backend}/{plan.target.device}"
                   f"{'' if plan.target.arch is None else f'/sm_{plan.target.arch}'} {plan.dtype} D={plan.head_dim} "
                   f"DV={plan.value_dim}; decode <= {d.block_m} rows x {d.block_n} w{d.num_warps} s{d.num_stages}, "
                   f"up to {plan.decode.max_splits} splits"),
        runtime_scalars=", ".join(f'"{n}"' for n in runtime_scalars),
        common_args=_wrap_args(args.names()),
        all_partial=bool(plan.masks.evaluated),  # data-dependent masks too: evaluated on every tile, no summary
        ragged_q=spec.q_storage is not None,
        kv_storage="paged" if isinstance(kv, Paged) else "ragged" if isinstance(kv, Ragged) else "dense",
        index_data=spec.q_storage is not None or kv is not None,
        offsets=offsets,
        err=ERROR_CONSTANTS,
        **storage,
    )


# The record layout and violation kinds as the kernel's constexprs (ERR_COUNT, ..., ERR_PAGE_ID).
ERROR_CONSTANTS = tuple((f"ERR_{name}", getattr(index_data, name)) for name in (
    "COUNT", "SITE", "TENSOR", "KIND", "SEQ", "INDEX", "VALUE", "LIMIT", "OTHER",
    "PAGE_ID", "LENGTH", "OFFSETS_START", "OFFSETS_DECREASE", "OFFSETS_END"))
