"""``tutorials/06_distributed.py`` runs under torchrun with 2 gloo processes (few steps)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers.distributed import repo_env

pytestmark = [pytest.mark.slow, pytest.mark.notebook]

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tutorials" / "06_distributed.py"


def test_distributed_tutorial_under_torchrun(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd += [str(SCRIPT), "--steps", "3", "--batch-size", "16", "--out", str(tmp_path)]
    done = subprocess.run(
        cmd, cwd=ROOT, env=repo_env(), capture_output=True, text=True, timeout=180
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = [line for line in done.stdout.splitlines() if line.startswith("[")]
    assert len(lines) == 2, done.stdout
    assert lines[0].startswith("[DDP] 2 processes, 3 steps of 32 images")
    assert lines[1].startswith("[Lightning] 2 processes, 3 steps")
    assert all("parameters identical on all 2 ranks: True" in line for line in lines)
    ckpt = torch.load(tmp_path / "lightning.ckpt", weights_only=False)
    assert ckpt["optimizer_states"][0]["preconditioner"]["steps"] == 3
