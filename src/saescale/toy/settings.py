"""Settings of the toy feature-manifold study (Michaud et al., method §F.1), without torch: Snakemake lists
the study's curves while planning, and importing torch there cost 1.4 s of every dry run."""

from __future__ import annotations

import math

KINDS = ("circle", "sphere", "shell")
TOY_ARCHS = ("relu_dn", "jumprelu_tanh")
RADII = ("uniform", "volume")

DEFAULTS: dict = {  # the reduced study (toy/manifolds.py docstring); the paper's recipe is ToySpec's defaults
    "kinds": ["circle", "sphere", "shell"],
    "dims": {"sphere": [3, 6], "shell": [2, 3]},  # the circle is d = 2 by definition
    "archs": ["relu_dn"],
    "n": {"circle": [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64], "sphere": [2, 4, 8, 16, 32, 64, 128, 256],
          "shell": [1, 2, 3, 4, 6, 8, 12, 16, 24]},
    "steps": 2000,
    "batch": 512,
    "lr": 2e-2,
    "lr_decay": 0.5,
    "l1": 0.1,
    "tanh_c": 0.1,
    "tanh_lambda": 1.0,
    "seeds": 1,
    "seed": 0,
    "eval_samples": 1 << 16,
    "beta_range": [16, 256],  # the paper's [100, 10^4] (manifolds.PAPER_BETA_RANGE) needs n up to 10^4
    "circle_panels": [4, 8, 24],
    "device": "auto",
    "shell_radius": "uniform",
    "plateau_tol": 0.05,
}


def check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ValueError(f"toy.{key}: {message}")


def _positive_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _positive_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


def _key(s: dict, key: str, kind: str) -> str:
    return f"{key}.{kind}" if isinstance(s[key], dict) else key


def validate_settings(settings: dict) -> dict:
    """Settings merged over DEFAULTS, checked; a ValueError names the offending key."""
    unknown = set(settings) - set(DEFAULTS)
    check(not unknown, min(unknown) if unknown else "", f"unknown setting(s); known: {sorted(DEFAULTS)}")
    s = {**DEFAULTS, **settings}
    kinds = s["kinds"]
    check(isinstance(kinds, (list, tuple)) and all(k in KINDS for k in kinds), "kinds",
          f"each kind must be one of {list(KINDS)}, got {kinds!r}")
    dims = s["dims"]
    check(isinstance(dims, dict) and set(dims) <= set(KINDS), "dims", f"a mapping kind -> [d, ...], got {dims!r}")
    for kind in kinds:
        ds = [2] if kind == "circle" else dims.get(kind)
        check(isinstance(ds, (list, tuple)) and len(ds) > 0, f"dims.{kind}", "needs a non-empty list of d")
        check(all(isinstance(d, int) and d >= 2 for d in ds), f"dims.{kind}", f"every d must be an integer >= 2, "
              f"got {list(ds)}")
        check(kind != "circle" or list(dims.get("circle", [2])) == [2], "dims.circle", "the circle is d = 2")
    archs = s["archs"]
    check(isinstance(archs, (list, tuple)) and len(archs) > 0 and all(a in TOY_ARCHS for a in archs), "archs",
          f"a non-empty list of {list(TOY_ARCHS)}, got {archs!r}")
    for kind in kinds:
        grid, key = s["n"].get(kind) if isinstance(s["n"], dict) else s["n"], _key(s, "n", kind)
        check(isinstance(grid, (list, tuple)) and len(grid) > 0, key, "the n grid is empty")
        check(all(_positive_int(n) for n in grid), key, f"every n must be a positive integer, got {list(grid)}")
        seeds = s["seeds"].get(kind) if isinstance(s["seeds"], dict) else s["seeds"]
        check(_positive_int(seeds), _key(s, "seeds", kind), f"must be a positive integer, got {seeds!r}")
    for key in ("steps", "batch", "eval_samples"):
        check(_positive_int(s[key]), key, f"must be a positive integer, got {s[key]!r}")
    for key in ("lr", "l1", "tanh_c", "tanh_lambda", "plateau_tol"):
        check(_positive_num(s[key]), key, f"must be a positive number, got {s[key]!r}")
    check(isinstance(s["seed"], int) and not isinstance(s["seed"], bool), "seed", f"an integer, got {s['seed']!r}")
    br = s["beta_range"]
    check(isinstance(br, (list, tuple)) and len(br) == 2 and all(_positive_num(v) for v in br) and br[0] < br[1],
          "beta_range", f"needs [n_min, n_max] with 0 < n_min < n_max, got {br!r}")
    cp = s["circle_panels"]
    check(isinstance(cp, (list, tuple)) and all(_positive_int(n) for n in cp), "circle_panels",
          f"a list of positive n, got {cp!r}")
    check(s["shell_radius"] in RADII, "shell_radius", f"one of {list(RADII)}, got {s['shell_radius']!r}")
    check(s["device"] == "auto" or isinstance(s["device"], str), "device", f"'auto', 'cpu' or 'cuda[:i]', "
          f"got {s['device']!r}")
    return s


def study_curves(settings: dict) -> list[tuple[str, int, str]]:
    """Every (kind, d, arch) curve the settings ask for."""
    s = validate_settings(settings)
    return [(kind, d, arch) for arch in s["archs"] for kind in s["kinds"]
            for d in ([2] if kind == "circle" else s["dims"][kind])]
