"""Outputs are written whole or not at all, and with the user's umask (not the 0600 some writers use)."""

from __future__ import annotations

import os
import stat

import pytest

from saescale.files import replace_when_done, write_json_atomic
from saescale.sae.model import SparseAutoencoder


@pytest.fixture(params=[0o022, 0o027, 0o002])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_sae_weights_and_json_follow_the_umask(tmp_path, umask):
    sae = SparseAutoencoder(8, 16, "topk", 2)
    sae.save(tmp_path / "w.safetensors")
    write_json_atomic(tmp_path / "cfg.json", {"a": 1})
    assert mode(tmp_path / "w.safetensors") == 0o666 & ~umask
    assert mode(tmp_path / "cfg.json") == 0o666 & ~umask


def test_a_failed_block_leaves_the_old_file_untouched(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("complete")
    with pytest.raises(RuntimeError), replace_when_done(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert target.read_text() == "complete"
