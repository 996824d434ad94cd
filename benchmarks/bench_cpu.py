"""attnc's TVM CPU kernels side by side with torch's CPU SDPA: `attnc bench --device cpu` under its old name.

    python benchmarks/bench_cpu.py [--threads N] [--seqs 512,1024,2048,4096] [--dims 64,128] [--rounds 7]
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this checkout's attnc, whatever an editable install points at

from attnc.cli import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main(["bench", "--device", "cpu", "--out", str(ROOT / "benchmarks" / "results"), *sys.argv[1:]]))
