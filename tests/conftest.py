"""Shared pytest set-up: quiet, deterministic, CPU-friendly."""

import torch

torch.manual_seed(0)
