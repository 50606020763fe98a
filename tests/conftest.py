import os
import tempfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("BOUNDFLOW_SHARED", ROOT.parent / "shared"))

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
# compiled Relax modules go to a fresh folder per test session, not the user's cache
os.environ.setdefault("BOUNDFLOW_CACHE", tempfile.mkdtemp(prefix="boundflow-cache-"))


def shared_path(*parts: str) -> Path:
    """A path under ../shared, or skip the test saying why."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"shared test data not found at {path} (set BOUNDFLOW_SHARED to its folder)")
    return path
