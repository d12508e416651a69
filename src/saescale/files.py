"""Writing outputs so that a killed job never leaves something a later run takes for complete."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Iterator


@contextlib.contextmanager
def replace_when_done(path: str | Path) -> Iterator[Path]:
    """Yield `<path>.tmp` to write to; it replaces `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    yield tmp
    os.replace(tmp, path)


def write_text_atomic(path: str | Path, text: str) -> None:
    with replace_when_done(path) as tmp:
        tmp.write_text(text)


def write_json_atomic(path: str | Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot serialize {type(obj).__name__} to JSON")


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


@contextlib.contextmanager
def atomic_dir(final: str | Path, keep_partial: bool = False) -> Iterator[Path]:
    """Yield a staging directory `<final>.partial`; rename it to `final` only if the block succeeds.

    With keep_partial the staging directory survives across calls, so a resumable writer can continue
    where a killed job stopped; otherwise it starts empty.
    """
    final = Path(final)
    partial = final.with_name(final.name + ".partial")
    if partial.exists() and not keep_partial:
        shutil.rmtree(partial)
    partial.parent.mkdir(parents=True, exist_ok=True)
    yield partial
    if final.exists():
        shutil.rmtree(final)
    os.replace(partial, final)


def file_digest(paths: list[str | Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(Path(p).read_bytes())
    return h.hexdigest()[:16]


def setup_logging(log_path: str | None) -> logging.Logger:
    """Log to stderr and, when the rule gives one, to its log file."""
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_path:
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_path, mode="a"))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", handlers=handlers, force=True)
    return logging.getLogger("saescale")
