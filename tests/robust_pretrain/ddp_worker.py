"""Run by test_distributed under torchrun: trains on tiny data and records this process's weights' hash."""

import hashlib
import os
import sys
from pathlib import Path

import torch

from robust_pretrain import EncoderConfig, ImageSet
from robust_pretrain.checkpoint import encoder_weights_bytes
from robust_pretrain.train import PretrainConfig, pretrain

out_dir = Path(sys.argv[1])
generator = torch.Generator().manual_seed(0)
images = torch.rand(96, 1, 12, 12, generator=generator)
data = ImageSet(images, torch.zeros(96, dtype=torch.long), "noise", 1)
encoder = EncoderConfig(
    arch="small_cnn", input_shape=(1, 12, 12), feature_dim=8, widths=(4, 8), hidden_dim=16
)
config = PretrainConfig(
    encoder=encoder,
    out_dir=str(out_dir),
    epochs=2,
    batch_size=32,
    queue_size=64,
    spectral_weight=0.1,
    probe_every=0,
    device="cpu",
)
result = pretrain(config, data, progress=False)
digest = hashlib.sha256(encoder_weights_bytes(result.encoder)).hexdigest()
(out_dir / f"rank{os.environ['RANK']}-of-{os.environ['WORLD_SIZE']}.sha256").write_text(digest)
