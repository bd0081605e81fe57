"""REaaS-SC runs h where its feature-space noise is drawn: moved there once, never the caller's h itself."""

from __future__ import annotations

from torch import nn

from reaas_client.pipelines import SmoothingConfig, _on_smoothing_device


def test_a_head_already_on_the_smoothing_device_is_used_as_it_is():
    head = nn.Linear(4, 3)
    assert _on_smoothing_device(head, SmoothingConfig(sigma=0.5, device="cpu")) is head


def test_a_head_elsewhere_is_copied_there_and_the_callers_head_stays_put():
    # "meta" stands in for a CUDA device on a machine without one: any device other than the head's
    head = nn.Linear(4, 3)
    moved = _on_smoothing_device(head, SmoothingConfig(sigma=0.5, device="meta"))
    assert moved is not head
    assert next(moved.parameters()).device.type == "meta"
    assert next(head.parameters()).device.type == "cpu"
