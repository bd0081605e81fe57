"""EncoderServicer: translates between reaas.v1 messages and the served encoder, and nothing else.

Each RPC: validate (validation.py) → compute (encoder_host.py, which calls bounds/) → encode (the shared
codec). Precise exceptions become gRPC statuses here, at the edge, and only here. The methods are coroutines on
the serving loop (serving_loop.py): tensor work runs on the batcher's worker or the compute pool, database reads on
the io pool, and the call waits for them suspended.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import AsyncIterator

import grpc
import numpy as np
import torch

import bounds
from reaas.v1 import encoder_service_pb2 as pb
from reaas.v1 import encoder_service_pb2_grpc as pb_grpc
from reaas_client.wire import IMAGE_DTYPES, as_numpy, encode_tensor
from reaas_server.batcher import ForwardBatcher, RadiusBatcher
from reaas_server.compute import BackgroundCompute
from reaas_server.config import ServerConfig
from reaas_server.encoder_host import BoundCost, ServedEncoder
from reaas_server.interceptors import CHARGE_WHERE_COMPUTED, CURRENT_CALLER, abort, image_count, still_wanted
from reaas_server.ledger import LedgerUnavailable, SqlLedger
from reaas_server.quotas import QuotaBook
from reaas_server.validation import (
    TOKEN_IDS_FIELD,
    ImageSpec,
    RequestError,
    TokenSpec,
    decode_feature_radii,
    decode_images,
    decode_token_ids,
    feature_dtype,
    input_field,
    require_field,
)
from robust_pretrain.text_input import TextInput

log = logging.getLogger(__name__)

#: TextInputInfo.threat_model: what a radius certifies for a text encoder (the proto's header says it at length)
TEXT_THREAT_MODEL = (
    "l2 in embedding space over the whole [max_length x embed_dim] embedding matrix (padding included); rows of the "
    "embedding table have unit l2 norm, so substituting token a by b moves it by ||E[a] - E[b]||_2 <= 2 and "
    "substitutions are covered as embedding distances; insertions and deletions are not covered"
)


class EncoderServicer(pb_grpc.EncoderServiceServicer):
    def __init__(self, encoder: ServedEncoder, config: ServerConfig, ledger: SqlLedger, quotas: QuotaBook,
                 compute: BackgroundCompute, io: BackgroundCompute, batcher: ForwardBatcher | None,
                 bound_costs: tuple[BoundCost, ...] = (), radius_batcher: RadiusBatcher | None = None) -> None:
        self._encoder = encoder
        self._io = io  # database reads (GetUsage, the open-access re-check): off the loop
        self._config = config
        self._ledger = ledger
        self._quotas = quotas
        self._bound_costs = bound_costs
        self._compute = compute
        self._batcher = batcher
        self._radius_batcher = radius_batcher
        meta = encoder.metadata
        self._spec = ImageSpec(
            input_shape=tuple(meta.input_shape),
            value_min=float(meta.value_range[0]),
            value_max=float(meta.value_range[1]),
            max_batch_size=config.max_batch_size,
        )
        text = encoder.text
        self._tokens = None if text is None else TokenSpec(
            vocab_size=text.vocabulary.size,
            max_length=text.vocabulary.max_length,
            pad_id=text.vocabulary.pad_id,
            max_batch_size=config.max_batch_size,
        )
        self._bounds_offered = tuple(bounds.BOUNDS_OFFERED) if config.mode == "reaas" else ()
        self._default_bound = config.default_bound or bounds.DEFAULT_BOUND
        if config.mode == "reaas" and self._default_bound not in self._bounds_offered:
            raise ValueError(f"default bound {self._default_bound!r} is not one of {self._bounds_offered}")

    # -- descriptions -------------------------------------------------------------------------------------
    async def GetEncoderInfo(self, request, context):
        open_access = self._ledger.has_keys_known()
        if open_access is None:
            async with _status_on_error(context):
                open_access = await self._io.run(self._ledger.has_keys)
        return self._encoder_info(not open_access)

    def _encoder_info(self, open_access: bool) -> pb.EncoderInfo:
        meta = self._encoder.metadata
        text = self._encoder.text
        text_input = None if text is None else pb.TextInputInfo(
            vocab_size=text.vocabulary.size, max_length=text.vocabulary.max_length, embed_dim=text.embed_dim,
            pad_id=text.vocabulary.pad_id, unk_id=text.vocabulary.unk_id, threat_model=TEXT_THREAT_MODEL)
        return pb.EncoderInfo(
            modality=self._encoder.modality,
            text_input=text_input,
            input_shape=list(meta.input_shape),
            accepted_dtypes=list(IMAGE_DTYPES),
            value_min=self._spec.value_min,
            value_max=self._spec.value_max,
            normalization=meta.normalization,
            feature_dim=meta.feature_dim,
            model_id=meta.model_id,
            model_sha256=meta.sha256,
            lipschitz_upper=meta.lipschitz_upper,
            f2i_perturb_offered=self._config.mode == "reaas",
            mode=self._config.mode,
            max_batch_size=self._config.max_batch_size,
            description=meta.description,
            bounds_offered=list(self._bounds_offered),
            default_bound=self._default_bound if self._bounds_offered else "",
            max_message_bytes=self._config.max_message_bytes,
            device=str(self._encoder.device),
            open_access=open_access,
            max_calls_per_key=self._config.max_calls_per_key,
            max_feature_radius=self._encoder.max_feature_radius,
            bound_costs=[
                pb.BoundCost(name=c.name, description=c.description, closed_form=c.closed_form,
                             seconds_per_image=c.seconds_per_image, cost_measured=c.probe_images > 0,
                             probe_images=c.probe_images)
                for c in self._bound_costs
            ],
        )

    async def GetUsage(self, request, context):
        caller = CURRENT_CALLER.get()  # set by the account interceptor, which always runs before this
        async with _status_on_error(context):
            return await self._io.run(self._usage_report, caller)

    def _usage_report(self, caller) -> pb.UsageReport:
        rpcs = [pb.RpcUsage(rpc=t.rpc, calls=t.calls, queries=t.queries, request_bytes=t.request_bytes,
                            response_bytes=t.response_bytes) for t in self._ledger.totals(caller.name)]
        report = pb.UsageReport(key_name=caller.name, rpcs=rpcs, total_queries=sum(u.queries for u in rpcs),
                                max_concurrent_calls=(caller.key and caller.key.max_concurrent_calls)
                                or self._config.max_calls_per_key)
        quota = self._quotas.status(caller.key)
        if quota is not None:
            report.quota_queries, report.quota_period_seconds = quota.limit, quota.period_s
            report.quota_used, report.quota_remaining = quota.used, quota.remaining
            report.quota_resets_at_unix = quota.resets_at
        return report

    async def GetVocabulary(self, request, context):
        async with _status_on_error(context):
            vocabulary = self._text_only("GetVocabulary").vocabulary
            return pb.VocabularyResponse(tokens=list(vocabulary.tokens), token_pattern=vocabulary.pattern,
                                         lowercase=vocabulary.lowercase, max_length=vocabulary.max_length,
                                         pad_id=vocabulary.pad_id, unk_id=vocabulary.unk_id)

    # -- inputs -------------------------------------------------------------------------------------------
    def _text_only(self, rpc: str) -> TextInput:
        if self._encoder.text is None:
            raise RequestError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"{rpc} is for text encoders; this one reads images (EncoderInfo.modality \"image\"): send images "
                "to Feature / F2IPerturb",
            )
        return self._encoder.text

    def _input_field(self, request: pb.FeatureRequest | pb.F2IPerturbRequest) -> str:
        return input_field(request, text=self._tokens is not None)

    def _decoded_inputs(self, request: pb.FeatureRequest | pb.F2IPerturbRequest, field: str) -> torch.Tensor:
        """The request's validated images [batch, C, H, W] float32, or token ids [batch, max_length] int64 (padded),
        on the CPU."""
        if field == "token_ids":
            return decode_token_ids(request.token_ids, self._tokens)
        return decode_images(request.images, self._spec)

    def _encoder_inputs(self, inputs: torch.Tensor, field: str) -> torch.Tensor:
        """What the model reads: the images as they are, token ids embedded into embedding matrices
        [batch, embed_dim, 1, max_length] (on the serving device)."""
        return self._encoder.embed(inputs) if field == "token_ids" else inputs

    def _embed_response(self, request: pb.EmbedRequest, context) -> pb.EmbedResponse:
        self._text_only("Embed")
        require_field(request, "token_ids", TOKEN_IDS_FIELD)
        embeddings = self._encoder.embed(decode_token_ids(request.token_ids, self._tokens))
        return pb.EmbedResponse(embeddings=encode_tensor(embeddings))

    async def Embed(self, request, context):
        async with _status_on_error(context):
            return await self._compute.run(self._embed_response, request, context)

    # -- features -----------------------------------------------------------------------------------------
    def _shares_a_pass(self, request: pb.FeatureRequest) -> bool:
        """Only small requests gain from sharing a pass; one of forward_chunk_size images or more is a full pass
        already, and queueing it would make every small request behind it wait for the whole of it."""
        return self._batcher is not None and image_count(request) < self._config.forward_chunk_size

    def _feature_parts(self, request: pb.FeatureRequest, context):
        """(decode, reply, still_wanted) of one request: the tensor work, wherever it runs. Asked on the loop: the
        reply charges the answer where it is made (interceptors.CHARGE_WHERE_COMPUTED, a context variable)."""
        field = self._input_field(request)
        reply_dtype = feature_dtype(request.feature_dtype)
        charge = CHARGE_WHERE_COMPUTED.get()

        def decode() -> tuple[torch.Tensor]:
            return (self._encoder_inputs(self._decoded_inputs(request, field), field),)

        def reply(features: np.ndarray | torch.Tensor) -> pb.FeatureResponse:
            # numpy on the batcher's path (its rows come as arrays; batcher.feature_rows says why)
            response = pb.FeatureResponse(features=encode_tensor(as_numpy(features).astype(reply_dtype, copy=False)))
            if charge is not None:
                charge(request, response)
            return response

        return decode, reply, still_wanted(context)

    def _own_feature_response(self, decode, reply, wanted) -> pb.FeatureResponse:
        """On a compute thread (compute.py): decode, forward chunk by chunk, encode (and charge)."""
        (images,) = decode()
        features = self._encoder.features(images, chunk_size=self._config.forward_chunk_size, still_wanted=wanted)
        return _answered(None if features is None else reply(features))

    async def _feature_response(self, request: pb.FeatureRequest, context) -> pb.FeatureResponse:
        """Small requests share the batcher's passes (its worker decodes, runs, encodes and charges every waiting
        request while the calls are suspended: one hand-off, one ledger commit and one wake-up of the loop per
        pass, not per call); a request of a full pass or more runs on its own compute thread."""
        decode, reply, wanted = self._feature_parts(request, context)
        if self._shares_a_pass(request):
            return _answered(await self._batcher.answer(decode, image_count(request), reply, wanted))
        return await self._compute.run(self._own_feature_response, decode, reply, wanted)

    async def Feature(self, request, context):
        async with _status_on_error(context):
            return await self._feature_response(request, context)

    async def StreamFeatures(self, request_iterator, context) -> AsyncIterator[pb.FeatureResponse]:
        """Pipelined two deep: a message is computed (on the batcher's worker or the compute pool) while the next one
        is received and parsed, and each reply leaves as soon as it is ready, in the requests' order, also while
        the client has not sent the next message yet. It pays where the forward pass decides (one stream of 256-image
        messages to the non-robust CNN: 37-41k against 28-30k images/s sequential, measured on the thread-pool
        server) and costs nothing where the transport decides."""
        async with _status_on_error(context):
            pending: collections.deque[asyncio.Task] = collections.deque()
            requests = aiter(request_iterator)
            next_request: asyncio.Future | None = None
            try:
                while True:
                    if next_request is None:  # read in a task, so that a finished reply need not wait for it
                        next_request = asyncio.ensure_future(_next_message(requests))
                    if pending and not next_request.done():
                        await asyncio.wait((next_request, pending[0]), return_when=asyncio.FIRST_COMPLETED)
                        if not next_request.done():
                            yield pending.popleft().result()
                            continue
                    reading, next_request = next_request, None
                    try:
                        request = await reading
                    except Exception:  # this message was refused (a quota): the ones before it are answered first
                        while pending:
                            yield await pending.popleft()
                        raise
                    finally:
                        # no cycle frame -> task -> its error -> traceback -> frame, which would keep this frame's
                        # messages (12.8 MB each at 4 096 images) until the cyclic collector ran: peak RSS 4x idle
                        del reading
                    if request is _END_OF_STREAM:
                        break
                    pending.append(asyncio.ensure_future(self._feature_response(request, context)))
                    # a message of several passes is computed alone: two in flight would double its memory
                    alone = image_count(request) > self._config.forward_chunk_size
                    while pending and (len(pending) >= STREAM_PIPELINE_DEPTH or pending[0].done() or alone):
                        yield await pending.popleft()
                while pending:
                    yield await pending.popleft()
            finally:
                if next_request is not None:
                    pending.append(next_request)
                _drop(pending)  # the stream ended early: work not started is dropped

    # -- image-space radii --------------------------------------------------------------------------------
    def _f2i_response(self, request: pb.F2IPerturbRequest, wanted) -> pb.F2IPerturbResponse:
        """On a compute thread; `wanted` is the call's still_wanted check, made on the loop."""
        if self._config.mode != "reaas":
            raise RequestError(
                grpc.StatusCode.UNIMPLEMENTED,
                "F2IPerturb is not offered: this is a standard encoder service (SEaaS, --mode seaas) that "
                "serves features only; certify by smoothing in image space, or use a REaaS deployment",
            )
        bound = request.bound or self._default_bound
        if bound not in self._bounds_offered:
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"unknown bound {_quoted(bound)}; this server offers {', '.join(self._bounds_offered)}",
            )
        field = self._input_field(request)
        inputs = self._decoded_inputs(request, field)
        feature_radii = decode_feature_radii(request.feature_radii, inputs.shape[0], self._encoder.max_feature_radius)
        images = self._encoder_inputs(inputs, field)
        # a closed-form bound is a division (nothing to share) and a request of a full chunk is a full search
        shared = (self._radius_batcher is not None and bound not in bounds.CLOSED_FORM_BOUNDS
                  and images.shape[0] < self._config.f2i_chunk_size)
        result = (self._radius_batcher.image_radii(images, feature_radii, bound, wanted) if shared else
                  self._encoder.image_radii(
                      images, feature_radii, bound=bound, chunk_size=self._config.f2i_chunk_size,
                      memory_budget_bytes=self._config.f2i_memory_budget_per_search,
                      still_wanted=wanted))
        if result is None:
            raise RequestError(grpc.StatusCode.CANCELLED, "the call was cancelled or its deadline passed")
        radii = [
            pb.ImageRadius(image_radius=float(r), bound=name, search_steps=int(s))
            for r, name, s in zip(
                result.image_radius.tolist(), result.bound, result.search_steps.tolist(), strict=True
            )
        ]
        return pb.F2IPerturbResponse(radii=radii)

    async def F2IPerturb(self, request, context):
        async with _status_on_error(context):
            return await self._compute.run(self._f2i_response, request, still_wanted(context))

    async def StreamF2IPerturb(self, request_iterator, context):
        async with _status_on_error(context):
            async for request in request_iterator:
                yield await self._compute.run(self._f2i_response, request, still_wanted(context))


STREAM_PIPELINE_DEPTH = 2  # a stream's messages in work at once: one computed while the next arrives


_END_OF_STREAM = object()


async def _next_message(requests):
    """The stream's next message, or _END_OF_STREAM: the end is a value, not a StopAsyncIteration kept by the reading
    task (an error kept by a task holds the frames it passed through, and with them their messages)."""
    try:
        return await anext(requests)
    except StopAsyncIteration:
        return _END_OF_STREAM


def _drop(tasks: collections.deque[asyncio.Future]) -> None:
    """Cancel a stream's unfinished work (and its pending read); an error of work already finished is taken (nobody
    will answer it), so asyncio does not log it as never retrieved."""
    for task in tasks:
        if not task.cancel() and not task.cancelled():
            task.exception()


def _answered(response: pb.FeatureResponse | None) -> pb.FeatureResponse:
    if response is None:
        raise RequestError(grpc.StatusCode.CANCELLED, "the call was cancelled or its deadline passed")
    return response


def _quoted(text: str, limit: int = 64) -> str:
    """`text` for an error message, cut to `limit` characters: a client's string must not make the status details
    outgrow what the client accepts in metadata (16 KiB)."""
    return repr(text) if len(text) <= limit else f"{text[:limit]!r}… ({len(text)} characters)"


@contextlib.asynccontextmanager
async def _status_on_error(context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
    """RequestError → its status; anything unexpected → INTERNAL (logged). The server stays up either way."""
    try:
        yield
    except grpc.aio.AbortError:
        raise  # a status is already on its way: grpc.aio requires its AbortError to pass untouched
    except RequestError as error:
        await abort(context, error.code, error.message)
    except LedgerUnavailable as error:  # the database is down or locked: another replica may answer
        await abort(context, grpc.StatusCode.UNAVAILABLE, str(error))
    except Exception as error:
        log.exception("internal error while serving a request")
        await abort(context, grpc.StatusCode.INTERNAL, f"internal server error: {type(error).__name__}: {error}")
