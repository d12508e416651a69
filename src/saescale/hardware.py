"""Whether this machine has a GPU torch can use, answered without importing torch.

The workflow asks once per `snakemake` start, to give GPU rules `resources: gpu=1`; `import torch` there
cost ~1 s of every start, dry runs included. Reading torch's build record and the driver's device nodes
answers the same question in microseconds. `torch.cuda.is_available()` stays the authority inside jobs
(`saescale.subject.pick_device`); a driver that exposes devices torch then refuses only makes a job fall back
to the CPU.
"""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path


def torch_build(torch_dir: Path | None = None) -> dict[str, str | None]:
    """The accelerator versions torch was built for ({"cuda": "12.4", "hip": None}), from torch/version.py."""
    if torch_dir is None:
        spec = importlib.util.find_spec("torch")
        if spec is None or spec.origin is None:
            return {"cuda": None, "hip": None}
        torch_dir = Path(spec.origin).parent
    try:
        text = (torch_dir / "version.py").read_text()
    except OSError:
        return {"cuda": None, "hip": None}
    out: dict[str, str | None] = {}
    for name in ("cuda", "hip"):
        match = re.search(rf"^{name}\s*(?::[^=]*)?=\s*['\"]([^'\"]+)['\"]", text, re.M)
        out[name] = match[1] if match else None
    return out


def gpu_present(torch_dir: Path | None = None, root: Path = Path("/"),
                environ: dict[str, str] | None = None) -> bool:
    """True when torch is a CUDA (or ROCm) build and the driver exposes a device that CUDA_VISIBLE_DEVICES
    (or HIP_VISIBLE_DEVICES) does not hide."""
    env = os.environ if environ is None else environ
    build = torch_build(torch_dir)
    if build["cuda"]:
        hidden = env.get("CUDA_VISIBLE_DEVICES")
        nodes = list((root / "dev").glob("nvidia[0-9]*"))
    elif build["hip"]:
        hidden = env.get("HIP_VISIBLE_DEVICES", env.get("CUDA_VISIBLE_DEVICES"))
        nodes = [root / "dev/kfd"] if (root / "dev/kfd").exists() else []
    else:
        return False
    if hidden is not None and hidden.strip() in ("", "-1"):
        return False
    return bool(nodes)
