"""The `attnc` command. Each subcommand is a `Command` in COMMANDS; each `--emit` form is one line of
EMITTERS, imported only when asked for, so `attnc check` never pulls in torch, Triton or TVM."""
from __future__ import annotations

import argparse
import difflib
import os
import shlex
import sys
from dataclasses import dataclass
from importlib import import_module
from typing import Callable

from rich.console import Console

from .version import __version__
from .errors import AttncError

# --emit NAME -> "module:function" turning a checked ir.Attention into text.
EMITTERS = {
    "ir": "attnc.ir:print_attention",
    "plan": "attnc.runtime.api:emit_plan",
    "triton": "attnc.runtime.api:emit_triton",
    "gluon": "attnc.runtime.api:emit_gluon",
}


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


def _out() -> Console:
    # soft_wrap: never break long lines (carets and keys must stay on one line); no markup: specs use [ ].
    return Console(soft_wrap=True, markup=False, highlight=False)


# ---------------------------------------------------------------- check


def _check_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("files", nargs="+", metavar="FILE", help=".attn spec files")


def _check(args: argparse.Namespace) -> int:
    from .dsl.parser import parse_file

    out, failed = _out(), False
    for path in args.files:
        try:
            specs = parse_file(path)
        except AttncError as e:
            print(e, file=sys.stderr)
            failed = True
            continue
        for spec in specs:
            out.print(f"OK  {path}:{spec.span.line if spec.span else 1}  {spec.name}  key {spec.key[:12]}")
    return 2 if failed else 0


# ---------------------------------------------------------------- show


def _show_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", metavar="FILE", help="an .attn spec file")
    p.add_argument("--name", help="the attention to show (default: every one in the file)")
    p.add_argument("--emit", choices=sorted(EMITTERS), default="ir", help="what to print (default: ir)")


def _specs_named(path: str, name: str | None) -> list:
    """The attentions of the file at `path`: all, or the one called `name`."""
    from .dsl.parser import parse_file

    specs = parse_file(path)
    if name is None:
        return specs
    chosen = [s for s in specs if s.name == name]
    if not chosen:
        close = difflib.get_close_matches(name, [s.name for s in specs], n=1)
        raise AttncError(f"{path} has no attention named '{name}'{f'; did you mean {close[0]!r}?' if close else ''}"
                         f"; it has: {', '.join(s.name for s in specs)}")
    return chosen


def _show(args: argparse.Namespace) -> int:
    specs = _specs_named(args.file, args.name)
    module, function = EMITTERS[args.emit].split(":")
    emit = getattr(import_module(module), function)
    _out().print("\n".join(emit(spec) for spec in specs), end="")
    return 0


# ---------------------------------------------------------------- explain


def _explain_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", metavar="FILE", help="an .attn spec file")
    p.add_argument("--name", help="the attention to explain (default: every one in the file)")
    p.add_argument("--shape", default="1,8,4096,4096,128", metavar="B,H,M,N,D",
                   help="the call to map tiles for (default: 1,8,4096,4096,128; the spec's `dims` win for D)")
    p.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                   help="a param's value (repeatable; default: the spec's default)")
    p.add_argument("--png", metavar="PATH", help="where to write the tile map (default: NAME-tiles.png)")


def _param_values(texts: list[str], spec) -> dict:
    values = {}
    for text in texts:
        name, _, value = text.partition("=")
        decl = spec.param(name.strip())
        if decl is None:
            known = [p.name for p in spec.params]
            close = difflib.get_close_matches(name.strip(), known, n=1)
            raise AttncError(f"--param {text}: attention {spec.name!r} has no param {name.strip()!r}"
                             f"{f'; did you mean {close[0]!r}?' if close else ''} (params: {', '.join(known) or 'none'})")
        try:
            values[decl.name] = {"i32": int, "f32": float, "bool": lambda s: {"true": True, "false": False}[s]}[
                decl.dtype](value.strip())
        except (KeyError, ValueError):
            raise AttncError(f"--param {text}: {decl.name} is {decl.dtype}; expected NAME=<"
                             f"{'true|false' if decl.dtype == 'bool' else decl.dtype}>") from None
    return values


def _explain(args: argparse.Namespace) -> int:
    from .explainer import explain_spec, parse_shape

    out, specs = _out(), _specs_named(args.file, args.name)
    if args.png and len(specs) > 1:
        raise AttncError(f"--png {args.png}: {args.file} has {len(specs)} attentions; pick one with --name")
    for spec in specs:
        result = explain_spec(spec, parse_shape(args.shape, spec), _param_values(args.param, spec))
        out.print(result.passes_text())
        out.print(result.summary())
        out.print(f"wrote {result.save_png(args.png or f'{spec.name}-tiles.png')}")
    return 0


# ---------------------------------------------------------------- cache


def _cache_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=("ls", "clear"), help="ls: list the compiled kernels; clear: delete them")


def _cache(args: argparse.Namespace) -> int:
    from .backends import cache

    out = _out()
    if args.action == "clear":
        out.print(f"removed {cache.clear()} kernel(s) from {cache.cache_root()}")
    elif entries := cache.list_entries():
        out.print(cache.entries_table(entries))
    else:
        out.print(f"no compiled kernels in {cache.cache_root()}")
    return 0


# ---------------------------------------------------------------- compile (ahead of time)


def _compile_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", metavar="FILE", help="an .attn spec file")
    p.add_argument("--name", action="append", help="an attention to build (repeatable; default: every one)")
    p.add_argument("--backend", choices=("triton", "tvm"), default="triton",
                   help="the kernel backend (default: triton)")
    p.add_argument("--arch", help="the GPU to build for, e.g. sm_90a (H100) or sm_80 (A100); tvm: gfx942 for rocm")
    p.add_argument("--target", help="tvm: cuda (default) or llvm (this CPU) artifacts; with --emit source also "
                                    "metal, rocm, opencl")
    p.add_argument("--emit", choices=("artifact", "source"), default="artifact",
                   help="tvm: a loadable artifact (default) or kernel source files")
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="the artifact folder to write")
    p.add_argument("--dims", action="append", default=[], metavar="D=128[,DV=128]",
                   help="head dims to build where the spec does not bind D (repeatable: one build each)")
    p.add_argument("--jobs", type=int, default=None, help="compiler processes (default: CPU count, at most 8)")


def _parse_head_dims(text: str) -> tuple[int, int | None]:
    values = {}
    for item in text.split(","):
        name, _, value = item.partition("=")
        if name.strip() not in ("D", "DV") or not value.strip().isdigit() or int(value) < 1:
            raise AttncError(f"--dims {text}: expected D=<int>[,DV=<int>], e.g. --dims D=128,DV=128 (bind other "
                             f"sizes with `dims` in the spec)")
        values[name.strip()] = int(value)
    if "D" not in values:
        raise AttncError(f"--dims {text}: D is missing, e.g. --dims D=128")
    return values["D"], values.get("DV")


def _compile_tvm(args: argparse.Namespace) -> int:
    from .backends.tvm.aot import compile_file
    from .backends.progress import kernel_bar

    with kernel_bar(f"building {args.output}") as progress:
        lines = compile_file(args.file, args.output, args.target or "cuda", args.arch, args.name,
                             [_parse_head_dims(t) for t in args.dims], args.emit, progress)
    for line in lines:
        _out().print(line)
    return 0


def _compile(args: argparse.Namespace) -> int:
    from .backends.triton.aot import compile_artifact
    from .backends.progress import kernel_bar

    if args.backend == "tvm":
        return _compile_tvm(args)
    if args.target not in (None, "cuda") or args.emit != "artifact":
        raise AttncError("--backend triton builds CUDA artifacts; --target and --emit source are for --backend tvm")
    if args.arch is None:
        raise AttncError("--arch: the GPU to build for is required with --backend triton, e.g. --arch sm_90a (H100)")
    head_dims = [_parse_head_dims(t) for t in args.dims]
    # Recorded in the manifest: the command that rebuilds this artifact (load's errors quote it).
    words = ["attnc", "compile", args.file, *(w for n in args.name or () for w in ("--name", n)), "--backend",
             args.backend, "--arch", args.arch, "-o", args.output, *(w for d in args.dims for w in ("--dims", d))]
    with kernel_bar(f"building {args.output}") as progress:
        summary = compile_artifact(args.file, args.output, args.arch, args.name, head_dims, args.jobs,
                                   " ".join(shlex.quote(w) for w in words), progress)
    out = _out()
    for line in summary.lines:
        out.print(line)
    out.print(f"wrote {summary.path} ({summary.files} files, {summary.size / 2**20:.1f} MiB) for "
              f"{summary.arch.name} with Triton {summary.triton}")
    return 0


def bench_arguments(p: argparse.ArgumentParser) -> None:
    """The benchmark's options; declared here so that building the
    CLI's parser never imports the benchmark and torch."""
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="cuda (default): against SDPA and FlexAttention; cpu: attnc's TVM kernels against torch's "
                        "CPU SDPA (fp32, B=1, H=8, dense and causal)")
    p.add_argument("--out", default="benchmarks/results", help="folder for the JSON and PNG files")
    p.add_argument("--only", default=None, help="regex: run only workloads whose name matches")
    p.add_argument("--quick", action="store_true", help="smaller sequence lengths (a smoke run)")
    p.add_argument("--backward", action="store_true",
                   help="time training steps, forward + backward (gradients of q, k, v): on cuda against SDPA "
                        "(cuDNN, FlashAttention-2) and compiled FlexAttention, on cpu against torch's SDPA")
    gpu = p.add_argument_group("--device cuda --backward")
    gpu.add_argument("--api", choices=("auto", "autograd", "backend"), default="auto",
                     help="how attnc runs: autograd (the compiled kernel and torch.autograd.grad), backend (the "
                          "Triton forward and backward kernels called directly), auto (autograd where the output "
                          "requires grad)")
    gpu.add_argument("--deterministic", action="store_true", help="attnc's backward without atomics")
    cpu = p.add_argument_group("--device cpu")
    cpu.add_argument("--threads", type=int, default=None,
                     help="threads for both libraries (default: TVM_NUM_THREADS, else torch's thread count)")
    cpu.add_argument("--seqs", default="512,1024,2048,4096", help="sequence lengths S = M = N (comma-separated)")
    cpu.add_argument("--dims", default="64,128", help="head dims (comma-separated)")
    cpu.add_argument("--rounds", type=int, default=7, help="alternating rounds per workload (median over them)")


def _bench(args: argparse.Namespace) -> int:
    if args.backward and args.device == "cuda":
        from .bench import backward as bench_backward

        return bench_backward.run(args)
    from . import bench

    return bench.run(args)


COMMANDS = (
    Command("check", "parse and check spec files; print each attention's name and key", _check_arguments, _check),
    Command("show", "print a spec in one of its forms (--emit)", _show_arguments, _show),
    Command("explain", "the plan after every pass, and a PNG map of the tiles the masks skip for one shape",
            _explain_arguments, _explain),
    Command("cache", "list or delete the compiled kernels (`attnc cache ls|clear`)", _cache_arguments, _cache),
    Command("compile", "build GPU kernels ahead of time, without a GPU, for `attnc.load(DIR)`", _compile_arguments,
            _compile),
    Command("bench", "benchmark side by side: GPU against SDPA (flash, cuDNN, efficient) and FlexAttention; "
                     "--device cpu against torch's CPU SDPA",
            bench_arguments, _bench),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="attnc", description="A compiler for attention.")
    parser.add_argument("--version", action="version", version=f"attnc {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in COMMANDS:
        p = sub.add_parser(command.name, help=command.help, description=command.help)
        command.add_arguments(p)
        p.set_defaults(run=command.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 success, 2 a user error (bad spec, bad arguments, missing file), 130 interrupted."""
    try:
        args = build_parser().parse_args(argv)
        return args.run(args)
    except AttncError as e:
        print(e, file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("attnc: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `attnc show ... | head`: the reader left; not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except SystemExit as e:  # argparse: usage errors (2) and --help (0)
        return 0 if e.code is None else e.code if isinstance(e.code, int) else 2
