"""The pinned working set imports and works together (the traps seen on this project:
torchvision ops missing for a mismatched torch, prefect failing with a newer fastapi)."""

import subprocess
import sys

import pytest


@pytest.mark.slow
def test_pinned_dependencies_import_and_cooperate():
    code = """
import torch, torchvision
from torchvision.ops import nms
boxes = torch.tensor([[0., 0., 10., 10.], [1., 1., 10., 10.], [20., 20., 30., 30.]])
print(nms(boxes, torch.tensor([0.9, 0.8, 0.7]), 0.5).tolist())
import open_clip, faiss, zarr, webdataset, transformers, av
from prefect.testing.utilities import prefect_test_harness  # imports prefect's server API
print(int(zarr.__version__.split('.')[0]))
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=240)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["[0,", "2]", "3"]
