"""ServedEncoder: the loaded checkpoint on its device, with the two computations the service sells.

Loading goes through robust_pretrain's checkpoint format (safetensors + JSON sidecar with a sound Lipschitz
bound); the bound math is bounds' — this module only places tensors on the right device and chunks work.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

import bounds
from robust_pretrain import CheckpointMetadata, LoadedEncoder, load_checkpoint, load_demo_encoder
from robust_pretrain.text_input import TextInput


def pick_device(requested: str | None) -> torch.device:
    """CUDA when present (or as requested), CPU otherwise."""
    if requested:
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass(frozen=True)
class ImageRadii:
    """F2IPerturb's answer for a batch: certified radius, deciding bound and search steps per image."""

    image_radius: torch.Tensor  # [batch] float64
    bound: tuple[str, ...]
    search_steps: torch.Tensor  # [batch] int64

    def split(self, sizes: list[int]) -> list[ImageRadii]:
        """One ImageRadii per consecutive run of `sizes` images (a shared pass's answer, handed back per call)."""
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        return [ImageRadii(self.image_radius[s:s + n], self.bound[s:s + n], self.search_steps[s:s + n])
                for s, n in zip(starts, sizes, strict=True)]


@dataclass(frozen=True)
class BoundCost:
    """What one offered bound is and what one evaluation of it cost per image on this server (see the proto)."""

    name: str
    description: str
    closed_form: bool
    seconds_per_image: float  # 0.0 when not measured
    probe_images: int  # 0 when not measured


# cheapest first, so a start-up time cap leaves the expensive ones unmeasured rather than the cheap ones
_MEASURE_ORDER = ("lipschitz", "auto", "ibp", "crown", "crown_spectral", "local_lipschitz", "best_ibp", "best")


class ServedEncoder:
    """One encoder, read-only after construction, safe to call from many gRPC threads.

    ``text`` is a text encoder's front end (vocabulary and embedding table, the table on the serving device), None
    for an image encoder; a text encoder's ``model`` reads the embedding matrices ``embed`` makes."""

    def __init__(self, loaded: LoadedEncoder, device: torch.device) -> None:
        self.metadata: CheckpointMetadata = loaded.metadata
        self.device = device
        self.text: TextInput | None = None
        if loaded.text is not None:
            if tuple(loaded.text.input_shape) != tuple(self.metadata.input_shape):
                raise ValueError(f"text front end makes {loaded.text.input_shape} embedding matrices but the "
                                 f"encoder reads {tuple(self.metadata.input_shape)}")
            self.text = TextInput(loaded.text.vocabulary, loaded.text.embedding.to(device, torch.float32))
        elif getattr(self.metadata, "modality", "image") == "text":
            raise ValueError("a text checkpoint was loaded without its vocabulary and embedding table")
        # IEEE float32 on CUDA, before any request: a client certifies around the f(x) it is sent, so a TF32 forward
        # pass (~1e-3 off) would eat into its radius as surely as a TF32 bound would
        bounds.require_ieee_float32(device)
        self.model = loaded.model.to(device).eval()
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)
        self._bound_costs: dict[tuple, tuple[BoundCost, ...]] = {}

    @classmethod
    def load(cls, checkpoint: Path | None, device: str | None = None, *, demo_kind: str | None = None
             ) -> ServedEncoder:
        """`checkpoint`, else the shipped demo encoder `demo_kind` (its labelled stand-in while the asset is absent)."""
        if checkpoint is not None:
            loaded = load_checkpoint(checkpoint)
        else:
            loaded = load_demo_encoder() if demo_kind is None else load_demo_encoder(demo_kind)
        return cls(loaded, pick_device(device))

    @property
    def modality(self) -> str:
        """"text" when the encoder reads token sequences (through ``embed``), else "image"."""
        return "image" if self.text is None else "text"

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Token ids [batch, max_length] int64 → embedding matrices [batch, embed_dim, 1, max_length] float32 on
        the serving device: the exact input ``model`` reads for those sequences (a table lookup, no rounding)."""
        if self.text is None:
            raise ValueError("this encoder reads images; it has no token embedding")
        return self.text.embed(self._to_device(token_ids))

    @property
    def max_feature_radius(self) -> float:
        """lipschitz_upper x the diameter of the input box: no two valid inputs have features further apart, so a
        larger R_F certifies nothing more (F2IPerturb refuses it; the proto states the rule)."""
        low, high = (float(v) for v in self.metadata.value_range)
        diameter = math.sqrt(math.prod(self.metadata.input_shape)) * (high - low)
        limit = float(self.metadata.lipschitz_upper) * diameter
        return limit if math.isfinite(limit) else sys.float_info.max

    def probe_images(self, count: int) -> torch.Tensor:
        """`count` seeded uniform-noise images inside the declared value range, on the serving device."""
        low, high = (float(v) for v in self.metadata.value_range)
        generator = torch.Generator().manual_seed(0)
        images = low + (high - low) * torch.rand((count, *self.metadata.input_shape), generator=generator)
        return images.to(self.device)

    def _to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` on the serving device. A CPU tensor bound for CUDA goes through page-locked memory, so the copy
        is an asynchronous DMA the forward pass queues behind instead of a staged copy the host waits for."""
        if self.device.type == "cuda" and tensor.device.type == "cpu" and not tensor.is_pinned():
            tensor = tensor.pin_memory()
        return tensor.to(self.device, non_blocking=True)

    def measure_bound_costs(self, names: tuple[str, ...], *, probe_images: int = 2,
                            budget_s: float = 5.0) -> tuple[BoundCost, ...]:
        """One timed evaluation of each bound in `names` on `probe_images` in-range images at the radius where
        L·r = 0.5, cheapest bounds first; once `budget_s` seconds are spent, the rest stay unmeasured (a running
        evaluation is not interrupted). Returned in the order of `names`; measured once per encoder and settings
        (servers that share this encoder reuse the numbers)."""
        key = (names, probe_images, budget_s)
        if key not in self._bound_costs:
            self._bound_costs[key] = self._measure_bound_costs(names, probe_images, budget_s)
        return self._bound_costs[key]

    def _measure_bound_costs(self, names: tuple[str, ...], probe_images: int, budget_s: float
                             ) -> tuple[BoundCost, ...]:
        images = self.probe_images(probe_images)
        lipschitz = float(self.metadata.lipschitz_upper)
        radius = 0.5 / lipschitz if lipschitz > 0 else 1.0
        measured: dict[str, float] = {}
        spent = 0.0
        if self.device.type == "cuda":  # CUDA's lazy start-up (context, cuBLAS) is no bound's cost
            with torch.inference_mode():
                self.model(images)
            torch.cuda.synchronize(self.device)
        for name in sorted(names, key=lambda n: _MEASURE_ORDER.index(n) if n in _MEASURE_ORDER else len(names)):
            if spent >= budget_s:
                break
            start = time.perf_counter()
            bounds.evaluate_bound_once(self.model, images, radius, name, lipschitz_upper=lipschitz)
            if self.device.type == "cuda":  # kernels still queued belong to this bound's time
                torch.cuda.synchronize(self.device)
            elapsed = time.perf_counter() - start
            spent += elapsed
            measured[name] = elapsed / probe_images
        return tuple(
            BoundCost(name, bounds.BOUND_DESCRIPTIONS.get(name, ""), name in bounds.CLOSED_FORM_BOUNDS,
                      measured.get(name, 0.0), probe_images if name in measured else 0)
            for name in names
        )

    def features(self, images: torch.Tensor, *, chunk_size: int | None = None,
                 still_wanted: Callable[[], bool] = lambda: True) -> torch.Tensor | None:
        """f(images): [batch, C, H, W] float32 (CPU or serving device) → [batch, feature_dim] float32 on the CPU.

        Runs ``chunk_size`` images per forward pass (all at once when None) so that a 4 096-image request does not
        hold the activations of 4 096 images at once; returns None as soon as ``still_wanted()`` turns false
        between chunks (the caller gave up). On CUDA the chunks are queued without waiting for each other (their
        features stay on the device) and the one copy back to the CPU at the end is the only synchronisation.
        """
        step = chunk_size or images.shape[0]
        parts = []
        with torch.inference_mode():
            for start in range(0, images.shape[0], step):
                if not still_wanted():
                    return None
                chunk = self._to_device(images[start : start + step])
                parts.append(self.model(chunk).float())
        return (torch.cat(parts) if len(parts) > 1 else parts[0]).cpu()

    def image_radii(
        self,
        images: torch.Tensor,
        feature_radii: torch.Tensor,
        *,
        bound: str,
        chunk_size: int,
        memory_budget_bytes: int,
        still_wanted: Callable[[], bool] = lambda: True,
    ) -> ImageRadii | None:
        """Certified image-space radii, computed ``chunk_size`` images at a time.

        Returns None as soon as ``still_wanted()`` turns false (the caller gave up): it is polled between chunks
        and, inside the search, before and during every bound evaluation, so a cancelled or expired call stops
        spending compute within one step of a bound evaluation and no partial answer is kept.
        """
        radii, bound_names, steps = [], [], []
        for start in range(0, images.shape[0], chunk_size):
            if not still_wanted():
                return None
            try:
                result = bounds.f2i_radius(
                    self.model,
                    self._to_device(images[start : start + chunk_size]),
                    # the search keeps its bookkeeping on the CPU: radii sent to the device would only come back
                    feature_radii[start : start + chunk_size],
                    bound=bound,
                    lipschitz_upper=self.metadata.lipschitz_upper,
                    memory_budget_bytes=memory_budget_bytes,
                    should_stop=lambda: not still_wanted(),
                )
            except bounds.SearchCancelled:
                return None
            radii.append(result.image_radius.detach().double().cpu())
            bound_names.extend(result.bound)
            steps.append(result.search_steps.detach().long().cpu())
        return ImageRadii(torch.cat(radii), tuple(bound_names), torch.cat(steps))
