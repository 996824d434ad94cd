"""Where a warm start's first call goes: tests/test_warm_start.py's first call (causal GQA, a kernel already in the
disk cache) in a fresh process under cProfile, after one process that fills the cache. Prints the wall time and
the functions with the most cumulative time, and the imports that took longest (-X importtime), so the part of
the GPU's 0.6 s (H100, session 7; target 0.3 s) that is not the kernel can be named.

    python3 benchmarks/warm_start_profile.py [--device cuda|cpu] [--top 25]"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from test_warm_start import FIRST_CALL  # noqa: E402

PROFILED = """
import cProfile, pstats, sys
import torch  # before the profile, as the first call's timer starts after it
profile = cProfile.Profile()
profile.enable()
exec(compile(sys.argv.pop(1), "<first call>", "exec"))
profile.disable()
pstats.Stats(profile, stream=sys.stderr).sort_stats("cumulative").print_stats(int(sys.argv[-1]))
"""


def run(code: str, device: str, top: int, env: dict, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *flags, "-c", code, FIRST_CALL, device, "infer", str(top)], env=env,
                          capture_output=True, text=True, timeout=600)


def import_times(stderr: str) -> dict[str, int]:
    """-X importtime's report: module (indented by depth) -> cumulative microseconds."""
    times = {}
    for line in stderr.splitlines():
        if line.startswith("import time:") and "cumulative" not in line:
            _, cumulative, name = line.split("|")
            times[name.rstrip()] = int(cumulative)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp())
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PYTHONDONTWRITEBYTECODE")}
    env.update(PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]), ATTNC_CACHE_DIR=str(folder / "c"),
               TRITON_CACHE_DIR=str(folder / "t"), PYTHONPYCACHEPREFIX=str(folder / "b"))
    first_call = [sys.executable, "-c", FIRST_CALL, args.device, "infer"]
    cold = subprocess.run(first_call, env=env, capture_output=True, text=True, timeout=600)
    warm = subprocess.run(first_call, env=env, capture_output=True, text=True, timeout=600)
    print("cold:", cold.stdout.strip().splitlines()[-1:], "\nwarm:", warm.stdout.strip().splitlines()[-1:])
    profiled = run(PROFILED, args.device, args.top, env)
    print("\n".join(profiled.stderr.splitlines()[:args.top + 12]))
    imports = import_times(run(PROFILED, args.device, 0, env, "-X", "importtime").stderr)
    torch_only = {name.strip() for name in import_times(subprocess.run([sys.executable, "-X", "importtime", "-c", "import torch"], env=env,
                                             capture_output=True, text=True, timeout=600).stderr)}
    rows = [(cumulative, name) for name, cumulative in imports.items() if name.strip() not in torch_only]
    print("\nslowest imports after torch's (cumulative us):")
    for cumulative, name in sorted(rows, reverse=True)[:args.top]:
        print(f"{cumulative:>10}  {name}")


if __name__ == "__main__":
    main()
