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
    if tmp.is_file():
        os.chmod(tmp, 0o666 & ~current_umask())  # some writers (safetensors) create 0600 files
    os.replace(tmp, path)


def current_umask() -> int:
    """The process umask (reading it means setting it, so it is set straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


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
    """Without a log file, log to stderr. With one (a workflow job), send the whole process's stderr there:
    our log lines, third-party warnings and progress bars, and any traceback, so the terminal shows only
    Snakemake's progress and the job's one-line result (see `terminal`)."""
    if log_path:
        _stderr_to(log_path)
        # progress bars of huggingface_hub, transformers and datasets go to the log at most every 30 s
        os.environ.setdefault("TQDM_MININTERVAL", "30")
    handler = logging.StreamHandler(sys.stderr)
    # the processes of a distributed job (torchrun sets RANK) share its log: each line says whose it is
    rank = f" [rank {os.environ['RANK']}]" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s{rank} %(name)s %(message)s", handlers=[handler],
                        force=True)
    logging.captureWarnings(True)  # warnings.warn lines become log lines with a time and a source
    return logging.getLogger("saescale")


_TERMINAL: Any = None


def _stderr_to(log_path: str) -> None:
    """Point file descriptor 2 at the log (appending), keeping a copy of the terminal's stderr for `terminal`.
    At the descriptor level, so that C extensions and libraries that cached sys.stderr follow too."""
    global _TERMINAL
    Path(log_path).parent.mkdir(parents=True, exist_ok=True)
    sys.stderr.flush()
    if _TERMINAL is None:
        _TERMINAL = os.fdopen(os.dup(2), "w", buffering=1)
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666)
    os.dup2(fd, 2)
    os.close(fd)
    sys.stderr = os.fdopen(2, "w", buffering=1, closefd=False)


def terminal() -> Any:
    """Where a job's one-line result goes: the terminal's stderr (before `setup_logging` redirected it)."""
    return _TERMINAL or sys.stderr
