"""The workflow's torch-free GPU probe against fake torch builds and device trees, and against torch here."""

from pathlib import Path

import pytest
import torch

from saescale.hardware import gpu_present, torch_build

VERSION = """from typing import Optional
__version__ = '2.13.0+{tag}'
cuda: Optional[str] = {cuda}
hip: Optional[str] = {hip}
"""


def fake_torch(tmp_path: Path, cuda=None, hip=None) -> Path:
    d = tmp_path / "torch"
    d.mkdir()
    (d / "version.py").write_text(VERSION.format(tag="x", cuda=repr(cuda), hip=repr(hip)))
    return d


def fake_root(tmp_path: Path, *nodes: str) -> Path:
    root = tmp_path / "root"
    (root / "dev").mkdir(parents=True)
    for node in nodes:
        (root / "dev" / node).touch()
    return root


def test_build_record_is_read_from_version_py(tmp_path):
    assert torch_build(fake_torch(tmp_path, cuda="12.4")) == {"cuda": "12.4", "hip": None}
    assert torch_build(tmp_path / "missing") == {"cuda": None, "hip": None}


@pytest.mark.parametrize("cuda, hip, nodes, env, expected", [
    ("12.4", None, ["nvidia0", "nvidiactl"], {}, True),
    ("12.4", None, ["nvidiactl"], {}, False),  # the control node alone is no device
    ("12.4", None, ["nvidia0"], {"CUDA_VISIBLE_DEVICES": ""}, False),
    ("12.4", None, ["nvidia0"], {"CUDA_VISIBLE_DEVICES": "-1"}, False),
    ("12.4", None, ["nvidia0"], {"CUDA_VISIBLE_DEVICES": "1"}, True),
    (None, None, ["nvidia0"], {}, False),  # a CPU build of torch cannot use the GPU
    (None, "6.2", ["kfd"], {}, True),
    (None, "6.2", ["kfd"], {"HIP_VISIBLE_DEVICES": ""}, False),
])
def test_gpu_is_present_only_for_a_gpu_build_with_a_visible_device(tmp_path, cuda, hip, nodes, env, expected):
    assert gpu_present(fake_torch(tmp_path, cuda, hip), fake_root(tmp_path, *nodes), env) is expected


def test_agrees_with_torch_on_this_machine():
    assert gpu_present() == torch.cuda.is_available()
