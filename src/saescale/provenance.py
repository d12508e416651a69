"""Code versions for rerun triggers. Snakemake does not track code imported from a package
(notes/snakemake.md section 0.7), so each rule carries a hash of the sources it runs as a param: a code
change reruns its stage and what depends on it, and nothing else.
"""

from __future__ import annotations

import ast
import functools
import hashlib
from pathlib import Path

PKG = Path(__file__).parent
SHARED_MODULES = ("config.py", "files.py", "paths.py")  # every stage runs through these
# What extraction and training run, for their rules' rerun hashes and for the code version a resumed
# partial store or checkpoint must match (cmd_extract, cmd_train): one list, so the two never drift.
EXTRACT_MODULES = ("store.py", "subject.py")
TRAIN_MODULES = ("sae", "store.py", "loader.py", "integrity.py", "normalize.py")


@functools.lru_cache(maxsize=4)
def _functions(source: str) -> dict[str, tuple[str, frozenset[str]]]:
    """Top-level functions: name -> (source, names used in its code; words in strings do not count).
    Cached: every rule asks about the same cli.py, and parsing it 22 times was half of a dry-run's time."""
    return {node.name: (ast.get_source_segment(source, node),
                        frozenset(n.id for n in ast.walk(node) if isinstance(n, ast.Name)))
            for node in ast.parse(source).body if isinstance(node, ast.FunctionDef)}


def cli_source(stage: str, source: str | None = None) -> str:
    """The source of `saescale <stage>`: cmd_<stage> in cli.py and the cli helpers it uses, transitively.
    Hashing this rather than all of cli.py keeps an edit to one command from rerunning every stage."""
    functions = _functions((PKG / "cli.py").read_text() if source is None else source)
    if f"cmd_{stage}" not in functions:
        raise ValueError(f"saescale.cli has no cmd_{stage}")
    todo, seen = [f"cmd_{stage}"], set()
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo += [f for f in functions[name][1] if f in functions]
    return "".join(functions[name][0] for name in sorted(seen))


def code_version(stage: str, *modules: str) -> str:
    """Hash of what a rule runs: its CLI command (cli_source) plus the package `modules` (files or
    folders; .py and .html files) and the shared modules."""
    h = hashlib.sha256(cli_source(stage).encode())
    for mod in SHARED_MODULES + modules:
        p = PKG / mod
        for f in sorted(f for f in p.rglob("*") if f.suffix in (".py", ".html")) if p.is_dir() else [p]:
            h.update(f.read_bytes())
    return h.hexdigest()[:12]
