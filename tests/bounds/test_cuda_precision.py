"""Bounds on CUDA need IEEE float32: building a bound graph there turns TensorFloat-32 off (runs without a GPU:
the flags exist in every torch build)."""

from __future__ import annotations

import pytest
import torch

from bounds import require_ieee_float32


@pytest.fixture()
def tf32_flags():
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def test_a_cuda_device_turns_tf32_off_for_convolutions_and_matmuls(tf32_flags):
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
    require_ieee_float32("cuda:0")
    assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
    assert torch.backends.cudnn.conv.fp32_precision != "tf32"  # the per-operator view agrees


def test_the_cpu_leaves_the_flags_alone(tf32_flags):
    torch.backends.cudnn.allow_tf32 = True
    require_ieee_float32(torch.device("cpu"))
    assert torch.backends.cudnn.allow_tf32
