"""Files that appear whole or not at all.

A writer that is killed half-way must not leave a file that readers take for complete.
`atomic_path` hands out a temporary sibling (`<name>.partial`) to write to and moves it
onto the real name only when the writing finished; `write_text_atomic` does that for
text. `replace_path` is the final move, also for directories (a checkpoint step).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

PARTIAL_SUFFIX = ".partial"


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def replace_path(src: str | Path, dst: str | Path) -> Path:
    """Move `src` onto `dst`, replacing a file or a whole directory there."""
    src, dst = Path(src), Path(dst)
    if src.is_dir() and dst.exists():
        _remove(dst)  # os.replace cannot put a directory over a non-empty one
    src.replace(dst)
    return dst


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of `path` to write (a file or a directory); on a clean
    exit it replaces `path`, on an exception it is removed and `path` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + PARTIAL_SUFFIX)
    _remove(tmp)  # left by a writer that was killed
    try:
        yield tmp
    except BaseException:
        _remove(tmp)
        raise
    replace_path(tmp, path)


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write `text` (UTF-8) to `path` so that readers see the old file or the new one."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)
