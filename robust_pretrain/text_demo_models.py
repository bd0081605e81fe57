"""Make the shipped text demo encoders: ``python -m robust_pretrain.text_demo_models`` (``make pretrain-demo-text``).

From the provider's unlabelled text only (38 158 tweets + 1 097 plot summaries): one front end (8 000-token
vocabulary, max_length 40, 32-dim PPMI + SVD table) shared by every kind, then per kind
(robust_pretrain.demo.TEXT_DEMO_KINDS): "text-pca" (the floor, fitted in closed form), "text-lipschitz" (the
Lipschitz conv body, MoCo on squared distances) and "text-nonrobust" (plain conv + ReLU, cosine InfoNCE).
The checkpoints go to robust_pretrain/assets/demo_<kind>.safetensors + .json. A few minutes on one CPU core.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from robust_pretrain.demo import TEXT_DEMO_KINDS, demo_checkpoint_path, text_demo_config
from robust_pretrain.text_data import load_provider_corpus
from robust_pretrain.text_train import TextPretrainConfig, fit_text_input, pretrain_text

TEXT_DEMO_EPOCHS = 3

DESCRIPTIONS = {
    "text-pca": "text demo floor: mean-pooled token embeddings -> PCA (orthonormal rows, L = 1/sqrt(max_length))",
    "text-lipschitz": "text demo encoder: Lipschitz by construction ((1,3) AOL convs + MaxMin, mean pooling, "
    "spectral-norm dense), MoCo with InfoNCE on squared feature distances",
    "text-nonrobust": "text demo baseline: (1,3) convs + ReLU, mean pooling, dense; cosine InfoNCE, no constraint",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Make the text demo encoders into robust_pretrain/assets/.")
    parser.add_argument("--kinds", nargs="+", choices=TEXT_DEMO_KINDS, default=list(TEXT_DEMO_KINDS),
                        help="which text demo encoders to make")
    parser.add_argument("--epochs", type=int, default=TEXT_DEMO_EPOCHS, help="epochs per trained encoder")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for torch")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    provider = load_provider_corpus()
    print(f"fitting the front end (vocabulary, PPMI + SVD embeddings) on {len(provider)} provider texts", flush=True)
    text = fit_text_input(provider.texts)
    for kind in args.kinds:
        print(f"making {kind}: {DESCRIPTIONS[kind]}", flush=True)
        config = TextPretrainConfig(encoder=text_demo_config(kind), epochs=args.epochs, model_id=f"demo-{kind}",
                                    description=DESCRIPTIONS[kind] + "; provider text (tweets + plot summaries)")
        result = pretrain_text(config, demo_checkpoint_path(kind), provider, text, progress=not args.no_progress)
        print(json.dumps({"kind": kind, "checkpoint": str(demo_checkpoint_path(kind)),
                          "lipschitz_upper": result.metadata.lipschitz_upper, "history": result.history,
                          "train_seconds": round(result.train_seconds, 1)}), flush=True)
    print(json.dumps({"total_wall_seconds": round(time.perf_counter() - started, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
