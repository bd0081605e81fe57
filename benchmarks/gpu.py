"""GPU throughput (tracker issue 13): what the service does per second when it serves on CUDA.

* Feature, images/s per batch size: in-process (ServedEncoder.features on CUDA, CPU tensors in and out as a request
  sees them, the server's forward chunk size), unary Feature and StreamFeatures over loopback gRPC against a
  ``reaas-server --device cuda`` child (the helpers of benchmarks.service_throughput).
* F2IPerturb, images/s per bound: every bound the server offers, a few digits per call.
* SEaaS-SC, samples/s: N noisy copies of one digit streamed through StreamFeatures by the SEaaS-SC sample source
  (reaas_client.StreamedImageSamples) at the server's max batch size.

Run: ``make bench-gpu`` (a few minutes on an H100/H200). Without CUDA it exits non-zero and writes nothing, so no
table that did not come from a GPU is ever committed.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch

from benchmarks.environment import machine_summary, markdown_table, write_results
from benchmarks.service_throughput import images_per_second, start_server_process
from reaas_client import EncoderClient, StreamedImageSamples
from reaas_server import ServedEncoder, ServerConfig
from robust_pretrain import load_embedded_mnist

BATCH_SIZES = (1, 32, 256, 1024, 4096)


def feature_rows(encoder: ServedEncoder, client: EncoderClient, args: argparse.Namespace) -> list[list[object]]:
    """[batch, in-process, unary, stream] images/s for each batch size."""
    generator = torch.Generator().manual_seed(0)
    chunk = ServerConfig().forward_chunk_size
    rows = []
    for batch in BATCH_SIZES:
        images = torch.rand((batch, *encoder.metadata.input_shape), generator=generator)
        as_numpy = images.numpy()
        local = images_per_second(lambda b=images: encoder.features(b, chunk_size=chunk).shape[0], args.seconds)
        unary = images_per_second(lambda a=as_numpy: client.features(a).shape[0], args.seconds)

        def stream(a=as_numpy) -> int:
            return sum(r.shape[0] for r in client.stream_features((a, None) for _ in range(args.stream_batches)))

        streamed = images_per_second(stream, args.seconds)
        rows.append([batch, f"{local:,.0f}", f"{unary:,.0f}", f"{streamed:,.0f}"])
        print(f"Feature batch {batch}: in-process {local:,.0f}/s unary {unary:,.0f}/s stream {streamed:,.0f}/s",
              flush=True)
    return rows


def f2i_rows(client: EncoderClient, digits: torch.Tensor, args: argparse.Namespace) -> list[list[object]]:
    """[bound, images per call, images/s, mean R, deciding bounds] for every bound the server offers."""
    images = digits[: args.f2i_batch].numpy()
    radii = np.full(len(images), args.f2i_radius)
    rows = []
    for bound in client.info().bounds_offered:
        reply = client.f2i_perturb(images, radii, bound=bound)
        rate = images_per_second(lambda b=bound: len(client.f2i_perturb(images, radii, bound=b).image_radius),
                                 args.seconds, min_rounds=1)
        rows.append([bound, len(images), f"{rate:,.1f}", f"{np.mean(reply.image_radius):.4f}",
                     ", ".join(sorted(set(reply.bound)))])
        print(f"F2IPerturb bound={bound}: {rate:,.1f} images/s", flush=True)
    return rows


def seaas_samples_per_second(client: EncoderClient, image: torch.Tensor, args: argparse.Namespace) -> float:
    """Noisy copies of `image` [C, H, W] per second through the SEaaS-SC sample source (N per round)."""
    info = client.info()
    source = StreamedImageSamples(client, image, "bench-gpu-seaas", args.sigma, info.max_batch_size,
                                  (info.value_min, info.value_max))
    generator = torch.Generator().manual_seed(0)
    rate = images_per_second(lambda: sum(f.shape[0] for f in source(args.seaas_samples, generator)), args.seconds,
                             min_rounds=1)
    print(f"SEaaS-SC: {rate:,.0f} samples/s", flush=True)
    return rate


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=2.0, help="measuring time per cell (default: %(default)s)")
    parser.add_argument("--demo-kind", default="spectral",
                        help="demo encoder to serve (default: %(default)s, the paper's CNN)")
    parser.add_argument("--stream-batches", type=int, default=16, help="batches per stream (default: %(default)s)")
    parser.add_argument("--f2i-batch", type=int, default=8, help="digits per F2IPerturb call (default: %(default)s)")
    parser.add_argument("--f2i-radius", type=float, default=0.5, help="R_F of every F2I digit (default: %(default)s)")
    parser.add_argument("--seaas-samples", type=int, default=100_000,
                        help="noisy copies per SEaaS-SC round, the paper's N (default: %(default)s)")
    parser.add_argument("--sigma", type=float, default=0.25, help="SEaaS-SC noise level (default: %(default)s)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit(f"bench-gpu needs CUDA and torch.cuda.is_available() is False here ({machine_summary()}); "
                 "nothing was written: benchmarks/results/gpu.md only ever comes from a run on a GPU")
    print(f"machine: {machine_summary()}", flush=True)

    encoder = ServedEncoder.load(None, "cuda", demo_kind=args.demo_kind)
    digits = load_embedded_mnist().downstream_test.images
    process, address = start_server_process(extra_args=("--device", "cuda", "--demo-kind", args.demo_kind))
    try:
        with EncoderClient(address, timeout_s=600) as client:
            info = client.info()
            if not info.device.startswith("cuda"):
                raise RuntimeError(f"the server child serves on {info.device!r}, not CUDA")
            features = feature_rows(encoder, client, args)
            f2i = f2i_rows(client, digits, args)
            seaas = seaas_samples_per_second(client, digits[0], args)
    finally:
        process.terminate()
        process.wait(timeout=30)

    meta = encoder.metadata
    body = (
        f"Loopback, `reaas-server --device cuda` in a subprocess serving the demo encoder `{meta.model_id}` "
        f"(input {list(meta.input_shape)}, float32 pixels) on {info.device} ({torch.cuda.get_device_name(0)}, "
        f"CUDA {torch.version.cuda}, IEEE float32: TF32 off), client in this process.\n\n"
        "## Features (images/s)\n\n"
        + markdown_table(["batch", "in-process (CUDA, CPU tensors in and out)", "Feature (unary)", "StreamFeatures"],
                         features)
        + f"\n\nStream: {args.stream_batches} batches per StreamFeatures call; in-process: forward chunks of "
        f"{ServerConfig().forward_chunk_size} images, as the server runs them.\n\n"
        f"## F2IPerturb (images/s, R_F = {args.f2i_radius}, the first {args.f2i_batch} test digits per call)\n\n"
        + markdown_table(["bound", "images per call", "images/s", "mean R", "deciding bounds"], f2i)
        + f"\n\n## SEaaS-SC (noisy images through StreamFeatures)\n\n{seaas:,.0f} samples/s: N = "
        f"{args.seaas_samples:,} copies of one digit at sigma = {args.sigma} per round, {info.max_batch_size} images "
        "per streamed request (the server's max batch size).\n"
    )
    path = write_results("gpu", "GPU throughput", body, make_target="bench-gpu")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
