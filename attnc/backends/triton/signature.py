"""One record per generated kernel, its parameter list: the template renders the kernel's `def` from it and the
launchers pack their arguments through it, so no argument slot is counted by hand (as Inductor's KernelArgs).

A signature is a sequence of groups. Each group has a role, the name of what a launcher passes for it (`q`, the
strides of `q`, the sizes, ...), and the kernel parameters it fills, in order. `pack` lays the launcher's values
out in the kernel's order; `slot` says where a parameter sits, for launches that patch a prepared list.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

from ...ir import ROLES, Attention, IndexVar, Paged, SizeRef, dtype_kind, walk
from ...dsl.signature import canonical_view
from ...passes.grad import derive
from ...passes.plan import KernelPlan
from .. import names

# Sizes every kernel takes; other sizes are passed only when an expression uses them.
KERNEL_SIZES = ("B", "H", "HKV", "M", "N")


@dataclass(frozen=True)
class Group:
    role: str  # the key of the value a launcher passes for it
    names: tuple[str, ...]  # the kernel parameters it fills


@dataclass(frozen=True)
class Signature:
    function: str
    groups: tuple[Group, ...]
    constexprs: tuple[str, ...]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(n for g in self.groups for n in g.names)

    def slot(self, name: str) -> int:
        """The position of parameter `name` among the runtime (non-constexpr) arguments."""
        return self.names.index(name)

    def names_of(self, *roles: str) -> tuple[str, ...]:
        return tuple(n for g in self.groups if g.role in roles for n in g.names)

    def has(self, role: str) -> bool:
        return any(g.role == role for g in self.groups)

    @property
    def pointed_tensors(self) -> tuple[str, ...]:
        """The names of the tensors its pointers group reads (`{name}_ptr`), in order."""
        return tuple(p.removesuffix("_ptr") for p in self.names_of("pointers"))

    def span(self, role: str) -> tuple[int, int]:
        """[start, end) of a group's parameters among the runtime arguments."""
        start = 0
        for g in self.groups:
            if g.role == role:
                return start, start + len(g.names)
            start += len(g.names)
        raise KeyError(role)

    def pack(self, values: Mapping[str, Sequence]) -> list:
        """The runtime arguments in the kernel's order from `values[role]` (a sequence per group)."""
        args = []
        for g in self.groups:
            got = values[g.role]
            if len(got) != len(g.names):
                raise AssertionError(f"{self.function}: {g.role} has {len(got)} values for {g.names}")
            args.extend(got)
        return args

    def unspecialized(self) -> str:
        """Triton's do_not_specialize list: the sizes, params, launch scalars and the decode kernel's call site in
        the error buffer change between calls (one compile serves them all)."""
        return ", ".join(f'"{n}"' for n in self.names_of("sizes", "params", "launch", "site"))

    def render(self, width: int = 100) -> str:
        """The parameter list of the kernel's `def`, wrapped at `width` with the signature's indentation."""
        names = list(self.names) + [f"{c}: tl.constexpr" for c in self.constexprs]
        lines, line = [], ""
        for n in names:
            if line and len(line) + len(n) + 2 > width - 4:
                lines.append(line.rstrip())
                line = ""
            line += f"{n}, "
        lines.append(line.rstrip())
        return "\n    ".join(lines)


def _strides(prefix: str, axes: str) -> tuple[str, ...]:
    return tuple(f"s_{prefix}{a}" for a in axes)


# The q/k/v/out/lse pointers and strides every attention kernel starts with; strides of the canonical
# [B, H, M, D] views (lse [B, H, M]).
QKV_GROUPS = (
    Group("pointers", ("q_ptr", "k_ptr", "v_ptr", "out_ptr", "lse_ptr")),
    Group("q_strides", _strides("q", "bhmd")),
    Group("k_strides", _strides("k", "bhnd")),
    Group("v_strides", _strides("v", "bhnd")),
    Group("out_strides", _strides("o", "bhmd")),
    Group("lse_strides", _strides("l", "bhm")),
)
# What AOT's "dense" layout assumes of the tensors a contiguous head dim gives: 16-byte aligned pointers and
# row strides, unit head-dim strides.
ALIGNED = ("q_ptr", "k_ptr", "v_ptr", "out_ptr") + tuple(
    g.names[i] for g in QKV_GROUPS[1:5] for i in range(3))
UNIT = tuple(g.names[3] for g in QKV_GROUPS[1:5])


@dataclass(frozen=True)
class SpecArgs:
    """The spec's runtime arguments: sizes its expressions use, params, extra input tensors with strides."""

    sizes: tuple[str, ...]  # size names
    size_args: tuple[str, ...]  # their parameter names (cap_M / cap_N where sequences have their own lengths)
    params: tuple[str, ...]
    inputs: tuple[tuple[str, int], ...]  # (input name, rank)
    data_dependent: bool  # the prefill kernel reads a tile summary
    summary_uses_b: bool  # whether the tile summary differs per batch / per head program
    summary_uses_h: bool

    def groups(self) -> tuple[Group, ...]:
        return (Group("sizes", self.size_args), Group("params", tuple(names.param(p) for p in self.params)),
                Group("inputs", tuple(n for t, rank in self.inputs
                                      for n in (names.tensor(t), *(names.stride(t, a) for a in range(rank))))))

    def values(self, sizes: Mapping[str, int], params: Mapping[str, object], inputs: Mapping[str, object]) -> dict:
        """The sizes, params and inputs groups' values for one call."""
        tensors = []
        for name, _ in self.inputs:
            t = inputs[name]
            tensors += [t, *t.stride()]
        return {"sizes": [sizes[s] for s in self.sizes], "params": [params[p] for p in self.params],
                "inputs": tensors}


def spec_args(plan: KernelPlan, per_sequence: bool = False) -> SpecArgs:
    """`per_sequence`: the decode kernel, where M and N of ragged or paged storage are capacities and a paged
    spec also takes the page size."""
    spec = plan.spec
    exprs = [spec.score, *spec.masks] + ([spec.normalizer.sink] if spec.normalizer.sink is not None else [])
    used = {n.name for e in exprs for n in walk(e) if isinstance(n, SizeRef)}
    used |= {dim for t in spec.inputs for dim in t.shape}  # lookups check their indices against these
    sizes = KERNEL_SIZES + tuple(sorted(used - set(ROLES)))
    size_args = tuple(names.size(s) for s in sizes)
    if per_sequence:
        if isinstance(spec.kv_storage, Paged):  # PAGE for the slots (unless bound by dims), PAGES to check page ids
            sizes += tuple(s for s in ("PAGE", "PAGES") if s not in sizes and s not in spec.dim_values)
        capacity = {"M": spec.q_storage is not None, "N": spec.kv_storage is not None}
        size_args = tuple(names.capacity(s) if capacity.get(s) else names.size(s) for s in sizes)
    mask_vars = {n.name for e in spec.masks for n in walk(e) if isinstance(n, IndexVar)}
    return SpecArgs(sizes, size_args, tuple(p.name for p in spec.params),
                    tuple((t.name, len(t.shape)) for t in spec.inputs), plan.masks.data_dependent,
                    "b" in mask_vars, "h" in mask_vars)


TILE_CONSTEXPRS = ("BLOCK_M", "BLOCK_N", "BLOCK_MQ", "PACK")
SUMMARY = Group("summary", ("summary_ptr", "s_sb", "s_sh"))


def prefill_signature(args: SpecArgs, tma: bool) -> Signature:
    return Signature("attn_fwd", QKV_GROUPS + args.groups() + ((SUMMARY,) if args.data_dependent else ()),
                     TILE_CONSTEXPRS + ("UPCAST",) + (("TMA",) if tma else ()))


def gluon_signature(args: SpecArgs) -> Signature:
    """The Gluon prefill kernel's (gluon.py.j2): its tile sizes are module constants, and data-dependent masks are
    evaluated on every tile, without a tile summary."""
    return Signature("attn_fwd_gluon", QKV_GROUPS + args.groups(), ())


def summary_signature(args: SpecArgs) -> Signature:
    return Signature("tile_summary", args.groups() + (SUMMARY, Group("head_programs", ("head_programs_s",))),
                     TILE_CONSTEXPRS)


WORKSPACE = (Group("workspace", ("ws_out_ptr", "ws_lse_ptr")),
             Group("workspace_strides", ("s_wo_s", "s_wo_h", "s_wo_r", "s_wl_s", "s_wl_h")))


def _decode_groups(args: SpecArgs) -> tuple[Group, ...]:
    # the workspace pointers follow q/k/v/out/lse: a prepared launch replaces the seven tensors as one run
    return (QKV_GROUPS[:1] + WORKSPACE[:1] + QKV_GROUPS[1:] + WORKSPACE[1:] + args.groups()
            + (Group("launch", ("search_steps", "n_splits")), Group("errors", ("err_ptr",)), Group("site", ("err_site",))))


def decode_signature(args: SpecArgs) -> Signature:
    return Signature("attn_decode", _decode_groups(args), TILE_CONSTEXPRS + ("SPLIT", "UPCAST"))


COMBINE_SIGNATURE = Signature(
    "attn_combine",
    (Group("workspace", ("ws_out_ptr", "ws_lse_ptr")), Group("outputs", ("out_ptr", "lse_ptr")),
     WORKSPACE[1], QKV_GROUPS[4], QKV_GROUPS[5], Group("rows", ("rows", "rows_per_b", "n_splits"))),
    ("BLOCK_R", "BLOCK_S"))
# attn_combine_scheduled's (the persistent MLA decode's merge): the items' cumulative key tiles and heads per item
SCHEDULE = Group("schedule", ("sched_ptr",))
SCHEDULED_COMBINE_SIGNATURE = Signature("attn_combine_scheduled", COMBINE_SIGNATURE.groups
                                        + (SCHEDULE, Group("item_heads", ("item_heads",))), ("BLOCK_R", "BLOCK_S"))


def gluon_decode_signature(args: SpecArgs, persistent: bool = False) -> Signature:
    """The Gluon MLA decode kernel's (gluon_decode.py.j2): attn_decode's arguments, so one launcher packs both; its
    rows and key tile are module constants, a launch passes heads per program, positions (1) and the split switch.
    Persistent: the items' cumulative key tiles too (SCHEDULE; search_steps: the binary search's over them)."""
    return Signature("attn_decode_gluon", _decode_groups(args) + ((SCHEDULE,) if persistent else ()),
                     ("BLOCK_MQ", "PACK", "SPLIT"))


# The backward's tensors (backward.py.j2): each one's pointer `{name}_ptr` and strides of its canonical view
# ([B, H, M, D] / [B, H, M]), named as QKV_GROUPS names those of q, k, v, out and lse.
BACKWARD_TENSORS = {"q": ("q", "bhmd"), "k": ("k", "bhnd"), "v": ("v", "bhnd"), "out": ("o", "bhmd"),
                    "do": ("do", "bhmd"), "lse": ("l", "bhm"), "dlse": ("dl", "bhm"), "delta": ("de", "bhm"),
                    "dq": ("dq", "bhmd"), "dk": ("dk", "bhnd"), "dv": ("dv", "bhnd")}
SEARCH = Group("launch", ("search_steps",))  # binary-search steps over a ragged batch's offsets


def _tensor_groups(names: tuple[str, ...]) -> tuple[Group, ...]:
    return (Group("pointers", tuple(f"{n}_ptr" for n in names)),
            *(Group(f"{n}_strides", _strides(*BACKWARD_TENSORS[n])) for n in names))


def gradient_tables(spec: Attention) -> tuple[tuple[str, int], ...]:
    """(name, rank) of each float input that gets a gradient, in derive(spec).tables' order."""
    return tuple((name, len(spec.input(name).shape)) for name in derive(spec).tables)


def summary_used(plan: KernelPlan) -> bool:
    """Whether the backward reads the forward's tile summary: data-dependent masks of dense storage (ragged
    storage evaluates them on every tile, as its forward does)."""
    return plan.masks.data_dependent and plan.spec.q_storage is None and plan.spec.kv_storage is None


def backward_signatures(args: SpecArgs, tables: tuple[tuple[str, int], ...], summary: bool,
                        tma: bool) -> dict[str, Signature]:
    """The backward kernels' signatures by function: `tables` the float inputs that get a gradient (name, rank),
    `summary` whether the dK/dV and dQ kernels read a tile summary, `tma` whether the dK/dV kernel takes the TMA
    switch (the dQ kernel loads by pointers: gradients.BackwardLauncher.descriptors says why). With tables, the prep
    and dK/dV kernels take TABLE_GRADS: False skips the tables' gradients where no table of the call wants one."""
    grads = (Group("table_grads", tuple(n for name, rank in tables for n in (
        names.gradient(name), names.gradient_stride(name, "p"),
        *(names.gradient_stride(name, a) for a in range(rank))))),) if tables else ()
    classes = (SUMMARY,) if summary else ()
    wanted = ("TABLE_GRADS",) if tables else ()  # whether this call's tables want their gradients
    return {s.function: s for s in (
        Signature("attn_bwd_prep", _tensor_groups(("out", "do", "lse", "dlse", "delta")) + args.groups() + grads
                  + (SEARCH,), TILE_CONSTEXPRS + ("HAS_DLSE", "DETERMINISTIC") + wanted),
        Signature("attn_bwd_dkdv", _tensor_groups(("q", "k", "v", "do", "lse", "delta", "dq", "dk", "dv"))
                  + args.groups() + grads + classes + (SEARCH,),
                  ("BLOCK_M", "BLOCK_N", "UPCAST", "DETERMINISTIC", "DQ_KERNEL") + (("TMA",) if tma else ()) + wanted),
        Signature("attn_bwd_dq", _tensor_groups(("q", "k", "v", "do", "lse", "delta", "dq")) + args.groups()
                  + classes + (SEARCH,), TILE_CONSTEXPRS + ("UPCAST",)),
    )}


def gluon_dkdv_signature(args: SpecArgs, dq_in_dkdv: bool = False) -> Signature:
    """The Gluon dK/dV kernel's (gluon_backward.py.j2): attn_bwd_dkdv's tensors but dQ (the dQ kernel's, unless
    `dq_in_dkdv`: the float32 dQ it reduce-adds into), its tiles module constants; no table gradients, tile summary
    or ragged storage (passes/warpgroups.py dkdv_layout)."""
    tensors = ("q", "k", "v", "do", "lse", "delta", "dk", "dv") + (("dq",) if dq_in_dkdv else ())
    return Signature("attn_bwd_dkdv_gluon", _tensor_groups(tensors) + args.groups(), ())


def padded_strides(t, rank: int) -> tuple[int, ...]:
    """Strides padded in front with zeros: a packed [H, T, D] view addresses like [1, H, T, D] with b = 0."""
    return (0,) * (rank - t.dim()) + tuple(t.stride())


def qkv_values(spec, bound, out, lse) -> dict:
    """The pointer and stride groups of q, k, v, out and lse for one call (lse None: out stands in, strides 0)."""
    return {"pointers": [bound.q, bound.k, bound.v, out, out if lse is None else lse],
            "q_strides": padded_strides(canonical_view(bound.q, spec.q), 4),
            "k_strides": padded_strides(canonical_view(bound.k, spec.k), 4),
            "v_strides": padded_strides(canonical_view(bound.v, spec.v), 4),
            "out_strides": padded_strides(canonical_view(out, spec.q), 4),
            "lse_strides": (0, 0, 0) if lse is None else padded_strides(lse, 3)}


TRITON_TYPES = {"f16": "fp16", "bf16": "bf16", "f32": "fp32", "f64": "fp64", "i8": "i8", "i16": "i16", "i32": "i32",
                "i64": "i64", "bool": "i1", "f8e4m3": "fp8e4nv", "f8e5m2": "fp8e5"}
PARAM_TYPES = {"i32": "i64", "f32": "fp32", "bool": "i1"}  # a build cannot see an int's value: every int is i64


def argument_types(plan: KernelPlan) -> dict[str, str]:
    """Triton's signature type of every runtime parameter of the plan's kernels, as its JIT would type the
    arguments the launchers pass (ints as i64): what an AOT build compiles for."""
    spec = plan.spec
    q = "*" + TRITON_TYPES[spec.q.dtype]
    lse = "*fp32" if spec.returns_lse else q  # without lse, out stands in for its pointer
    types = {"q_ptr": q, "k_ptr": "*" + TRITON_TYPES[spec.k.dtype], "v_ptr": "*" + TRITON_TYPES[spec.v.dtype],
             "out_ptr": q, "lse_ptr": lse, "ws_out_ptr": "*fp32", "ws_lse_ptr": "*fp32", "summary_ptr": "*i8",
             "err_ptr": "*i64"}
    types.update({names.param(p.name): PARAM_TYPES[p.dtype] for p in spec.params})
    types.update({names.tensor(t.name): "*" + TRITON_TYPES[t.dtype] for t in spec.inputs})
    return _IntsByDefault(types)


def backward_argument_types(plan: KernelPlan, dq_kernel: bool) -> dict[str, str]:
    """argument_types of the backward kernels' parameters: dQ accumulates in float32 by atomics, unless the
    `dq_kernel` writes it; the input tables' gradients are float32."""
    types = argument_types(plan)
    q = types["q_ptr"]
    types.update(do_ptr=q, dlse_ptr="*fp32", delta_ptr="*fp32", dq_ptr=q if dq_kernel else "*fp32",
                 dk_ptr=types["k_ptr"], dv_ptr=types["v_ptr"])
    types.update({names.gradient(t.name): "*fp32" for t in plan.spec.inputs if dtype_kind(t.dtype) == "float"})
    return types


class _IntsByDefault(dict):
    """Every parameter not named (sizes, strides, launch scalars) is an i64."""

    def __missing__(self, name: str) -> str:
        return "i64"
