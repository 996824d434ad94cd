"""Output folders written whole or not at all (`attnc compile -o DIR`, either backend): the build writes into a
fresh folder beside DIR, which replaces DIR only when the build succeeded; a failed or interrupted build
removes it, so it never leaves a half-written DIR (or an empty one) behind."""
from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from ..errors import AttncError


def check_output(out: Path, replaceable: Callable[[Path], bool]) -> None:
    """Refuse `-o out` before any work when its parent is missing, or when it exists and is neither empty nor
    something `replaceable` recognizes (an earlier build: never overwrite another folder)."""
    if not out.parent.is_dir():
        raise AttncError(f"-o {out}: the folder {out.parent} does not exist; create it first")
    if out.exists() and not (out.is_dir() and (not any(out.iterdir()) or replaceable(out))):
        raise AttncError(f"-o {out}: exists and is not an attnc AOT artifact; pick another folder or remove it")


@contextmanager
def staged_folder(out: str | os.PathLike[str], replaceable: Callable[[Path], bool]) -> Iterator[Path]:
    """A new folder beside `out` to build in; moved to `out` when the block ends without an exception (replacing
    an earlier build there), removed when it raises."""
    out = Path(out)
    check_output(out, replaceable)
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".building", dir=out.parent))
    except OSError as err:
        raise AttncError(f"-o {out}: cannot write in {out.parent} ({err.strerror or err})") from None
    try:
        yield staging
        _move_into_place(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _move_into_place(staging: Path, out: Path) -> None:
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
        os.replace(out, old / "artifact")
        os.replace(staging, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, out)
