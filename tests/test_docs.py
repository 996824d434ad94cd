"""Every code block of README.md and docs/*.md runs as written, on the CPU, as a new user would run it.

```python blocks run in a fresh interpreter each (so each must define its own inputs); ```bash blocks run in
bash with `attnc`, `python` and `python3` meaning this checkout; ```attn blocks must parse. Each runs in a
temporary folder that links examples/ and shares one kernel cache with the others, without TRITON_INTERPRET
(attnc.compile picks TVM for CPU tensors there, as it does for a user). A block that cannot run here is marked
in the markdown, on the line before it, with `<!-- doc-test: skip (the reason) -->`.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

import attnc

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
RUN = ("python", "bash", "attn")  # the languages whose blocks run; others (text, json, ...) are shown only
_FENCE = re.compile(r"^```(\w*)\s*$")
_SKIP = re.compile(r"^<!--\s*doc-test:\s*skip\s*\((.+)\)\s*-->$")


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # of the opening fence, 1-based
    language: str
    code: str
    skip: str | None  # the reason given in the markdown

    @property
    def id(self) -> str:
        return f"{self.path.name}:{self.line}"


def blocks_of(path: Path) -> list[Block]:
    """The fenced blocks of a markdown file, each with the skip marker of the line before it (blank lines
    between them allowed)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    found, n = [], 0
    while n < len(lines):
        fence = _FENCE.match(lines[n])
        if fence is None:
            n += 1
            continue
        end = next((m for m in range(n + 1, len(lines)) if lines[m].startswith("```")), None)
        assert end is not None, f"{path.name}:{n + 1}: a code block that is never closed"
        before = next((lines[m].strip() for m in range(n - 1, -1, -1) if lines[m].strip()), "")
        skip = _SKIP.match(before)
        found.append(Block(path, n + 1, fence.group(1), "\n".join(lines[n + 1:end]) + "\n",
                           skip.group(1) if skip else None))
        n = end + 1
    return found


BLOCKS = [b for path in DOCS for b in blocks_of(path)]
RUNNABLE = [b for b in BLOCKS if b.language in RUN]


def test_every_block_is_tagged_and_few_are_skipped():
    untagged = [b.id for b in BLOCKS if not b.language]
    assert not untagged, f"code blocks without a language (python, bash, attn, text): {untagged}"
    skipped = [b for b in RUNNABLE if b.skip]
    assert len(skipped) <= 3, [f"{b.id}: {b.skip}" for b in skipped]
    assert {b.language for b in RUNNABLE} == set(RUN)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> tuple[Path, dict]:
    """A scratch folder with examples/ linked, a bin/ where attnc and python run this checkout's attnc, and the
    environment for the blocks: one kernel cache for all, no Triton interpreter."""
    home = tmp_path_factory.mktemp("docs")
    (home / "examples").symlink_to(ROOT / "examples")
    bin_dir = home / "bin"
    bin_dir.mkdir()
    for name, command in (("attnc", f'"{sys.executable}" -m attnc'), ("python", f'"{sys.executable}"'),
                          ("python3", f'"{sys.executable}"')):
        script = bin_dir / name
        script.write_text(f'#!/bin/sh\nexec {command} "$@"\n')
        script.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}", ATTNC_CACHE_DIR=str(home / "cache"),
               PYTHONPATH=os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])]), MPLBACKEND="Agg")
    return home, env


@pytest.mark.parametrize("block", RUNNABLE, ids=[b.id for b in RUNNABLE])
def test_block_runs(block: Block, workspace):
    if block.skip:
        pytest.skip(block.skip)
    if block.language == "attn":
        specs = attnc.parse(block.code, filename=block.id)
        assert specs and all(s.key for s in specs)
        return
    home, env = workspace
    command = [sys.executable, "-c", block.code] if block.language == "python" else \
        ["bash", "-euo", "pipefail", "-c", block.code]
    result = subprocess.run(command, cwd=home, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, (f"{block.id} ({block.language}) exited {result.returncode}\n{block.code}\n"
                                    f"--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}")
