"""EncoderClient: a thin typed client over the generated reaas.v1 stubs, with per-input query accounting.

Image and text encoders share the methods: ``features`` / ``f2i_perturb`` / ``stream_features`` take images, or,
for a text encoder, token ids (``token_ids=``, [batch, length] integers, length <= max_length); ``embed`` and
``vocabulary`` serve text only. Every image (or token sequence) sent is recorded in a QueryLedger under its input
id, with its share of the request and response bytes, so a pipeline can state exactly what each certified input cost. Several server addresses are spread
with gRPC's own ``round_robin`` policy. A replica lost mid-call costs no result (``retry``): a unary call that
fails with UNAVAILABLE is sent again, a stream resumes on a new call from its first unanswered batch, and either
is recorded in the ledger once, when answered. Each call, its retries included, carries a deadline.
"""

from __future__ import annotations

import ipaddress
import json
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, TypeAlias

import grpc
import numpy as np

from reaas.v1 import encoder_service_pb2 as pb
from reaas.v1 import encoder_service_pb2_grpc as pb_grpc
from reaas_client.ledger import UNLABELLED, QueryLedger
from reaas_client.replies import EncoderInfo, F2IReply, UsageReport
from reaas_client.retry import RetryPolicy, UnansweredRequests
from reaas_client.tls import ClientTls
from reaas_client.wire import as_numpy, decode_tensor, encode_tensor

if TYPE_CHECKING:
    import torch

    from robust_pretrain.text_input import Vocabulary

API_KEY_HEADER = "x-api-key"
_MESSAGE_HEADROOM = 0.9  # leave room for the message's non-pixel fields

# torch is optional (a light client has none): a torch tensor is accepted wherever an array is (wire.as_numpy)
ImageBatch: TypeAlias = "np.ndarray | torch.Tensor"
#: token ids [batch, length] of any integer dtype (a LongTensor from Vocabulary.encode, an int array); they travel
#: as INT32
TokenIdBatch: TypeAlias = "np.ndarray | torch.Tensor"
#: which request field a batch travels in
InputKind = Literal["images", "token_ids"]


class ServiceError(RuntimeError):
    """A call the server (or the channel) refused; ``code`` is the gRPC status, ``details`` its message."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


def _service_config() -> str:
    # No gRPC retryPolicy: it keeps a copy of a request only up to its retry buffer (256 KiB per call) and never
    # retries a stream after its first reply, so the client re-sends itself (retry.py). gRPC's transparent
    # retries, of calls that never reached a server, stay on.
    return json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})


def channel_target(addresses: str | Sequence[str]) -> str:
    """One gRPC target for one address, or an ``ipv4:``/``ipv6:`` list that round_robin spreads over."""
    if isinstance(addresses, str):
        addresses = [a for a in addresses.split(",") if a]
    if not addresses:
        raise ValueError("no server address given")
    if len(addresses) == 1:
        return addresses[0]
    families = set()
    for address in addresses:
        host = address.rsplit(":", 1)[0].strip("[]")
        try:
            families.add(ipaddress.ip_address(host).version)
        except ValueError:
            raise ValueError(
                f"several addresses must be IP literals (host:port), got {address!r}; for a DNS name that "
                "resolves to several replicas pass that one name"
            ) from None
    if len(families) != 1:
        raise ValueError("several addresses must all be IPv4 or all IPv6")
    return f"ipv{families.pop()}:" + ",".join(addresses)


def _ids_for(input_ids: Sequence[str] | None, count: int) -> list[str]:
    if input_ids is None:
        return [UNLABELLED] * count
    ids = [str(i) for i in input_ids]
    if len(ids) != count:
        raise ValueError(f"{len(ids)} input ids for {count} images; give one id per image")
    return ids


def _token_id_array(token_ids: TokenIdBatch) -> np.ndarray:
    """Token ids as the int32 array they travel as. Shape and vocabulary range are the server's to check (one
    validation, one message); here only what int32 cannot carry is refused."""
    array = as_numpy(token_ids)
    if not np.issubdtype(array.dtype, np.integer):
        raise TypeError(f"token ids must be integers (e.g. Vocabulary.encode's int64), got dtype {array.dtype}")
    info = np.iinfo(np.int32)
    if array.size and (array.min() < info.min or array.max() > info.max):
        raise ValueError(f"token ids outside int32 ([{array.min()}, {array.max()}]) are no vocabulary's ids")
    return array.astype(np.int32, copy=False)


def _batch_array(images: ImageBatch | None, token_ids: TokenIdBatch | None) -> tuple[np.ndarray, InputKind]:
    """The one batch a call sends, as an array, and the field it travels in."""
    if (images is None) == (token_ids is None):
        raise ValueError("give exactly one of images and token_ids")
    if token_ids is not None:
        return _token_id_array(token_ids), "token_ids"
    return as_numpy(images), "images"


def _service_error(error: grpc.RpcError, tries: int) -> ServiceError:
    details = error.details() or ""
    if error.code() == grpc.StatusCode.UNAVAILABLE:
        details += f" (no replica answered: {tries} tries)"
    elif RetryPolicy.retryable(error):
        details += f" (still busy after {tries} tries)"
    return ServiceError(error.code(), details)


FEATURE_DTYPES = {"float32": pb.FLOAT32, "float16": pb.FLOAT16}  # what FeatureRequest.feature_dtype offers


def _feature_dtype(name: str) -> int:
    if name not in FEATURE_DTYPES:
        raise ValueError(f"feature_dtype must be one of {', '.join(FEATURE_DTYPES)}, got {name!r}")
    return FEATURE_DTYPES[name]


def _decoded_features(reply: pb.FeatureResponse) -> np.ndarray:
    """float32 [batch, D] whatever dtype the features travelled in (float16 widens exactly)."""
    return decode_tensor(reply.features, name="features").astype(np.float32, copy=False)


@dataclass(frozen=True)
class _StreamedBatch:
    """One StreamFeatures request with what the ledger records for it once it is answered."""

    request: pb.FeatureRequest
    input_ids: list[str]
    request_bytes: int

    @classmethod
    def encode(cls, inputs: ImageBatch | TokenIdBatch, input_ids: Sequence[str] | None, feature_dtype: int,
               kind: InputKind = "images") -> _StreamedBatch:
        array = _token_id_array(inputs) if kind == "token_ids" else as_numpy(inputs)
        request = pb.FeatureRequest(feature_dtype=feature_dtype, **{kind: encode_tensor(array)})
        return cls(request, _ids_for(input_ids, len(array)), request.ByteSize())


class EncoderClient:
    """Typed access to one REaaS / SEaaS deployment (one or several replicas). Use as a context manager."""

    def __init__(
        self,
        addresses: str | Sequence[str],
        *,
        api_key: str | None = None,
        timeout_s: float = 60.0,
        ledger: QueryLedger | None = None,
        max_message_bytes: int = 64 * 1024 * 1024,
        max_attempts: int = 4,
        tls: ClientTls | None = None,
    ) -> None:
        """``max_attempts``: tries in a row that get no answer before a call (or a stream) fails with
        ServiceError, each failed one followed by a 0.1 s backoff that doubles up to 2 s (RetryPolicy).
        ``tls``: None for an insecure channel (loopback; the API key travels in clear text), else TLS with the
        given roots and, for mutual TLS, client certificate; a server whose certificate fails them is UNAVAILABLE."""
        self.ledger = ledger if ledger is not None else QueryLedger()
        self.timeout_s = timeout_s
        self.retry = RetryPolicy(max_attempts=max_attempts)
        self._metadata = ((API_KEY_HEADER, api_key),) if api_key else ()
        if isinstance(addresses, str):
            addresses = [a for a in addresses.split(",") if a]
        options = [
            ("grpc.service_config", _service_config()),
            ("grpc.enable_retries", 1),
            ("grpc.max_receive_message_length", -1),
            ("grpc.max_send_message_length", max_message_bytes),
        ]
        target = channel_target(addresses)
        if tls is None:
            self._channel = grpc.insecure_channel(target, options=options)
        else:
            if (name := tls.name_override(addresses)) is not None:
                options.append(("grpc.ssl_target_name_override", name))
            self._channel = grpc.secure_channel(target, tls.channel_credentials(), options=options)
        self._stub = pb_grpc.EncoderServiceStub(self._channel)
        self._info: EncoderInfo | None = None
        self._vocabulary: Vocabulary | None = None

    # -- lifecycle ----------------------------------------------------------------------------------------
    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> EncoderClient:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _call(self, method, request):
        """One unary call, re-sent after UNAVAILABLE per ``self.retry``, all tries within ``timeout_s``.

        Sound to re-send: every unary RPC of reaas.v1 is idempotent (GetEncoderInfo, GetVocabulary and GetUsage
        read; Feature, F2IPerturb and Embed are deterministic), so the answer is the one the lost replica would have
        given.
        """
        deadline = time.monotonic() + self.timeout_s
        failures = 0
        while True:
            try:
                return method(request, timeout=max(deadline - time.monotonic(), 0.0), metadata=self._metadata)
            except grpc.RpcError as error:
                failures += 1
                backoff = self.retry.wait_s(error, failures)
                if not self.retry.another_try(error, failures, deadline - backoff):
                    raise _service_error(error, failures) from error
                time.sleep(backoff)

    # -- RPCs ---------------------------------------------------------------------------------------------
    def info(self) -> EncoderInfo:
        """The served encoder's description (cached; costs no queries)."""
        if self._info is None:
            self._info = EncoderInfo.from_proto(
                self._call(self._stub.GetEncoderInfo, pb.EncoderInfoRequest())
            )
        return self._info

    def usage(self) -> UsageReport:
        """The server's count of what it served this API key (costs no queries)."""
        return UsageReport.from_proto(self._call(self._stub.GetUsage, pb.UsageRequest()))

    def _chunk_size(self, images: np.ndarray) -> int:
        info = self.info()
        per_image = max(1, images[0].nbytes if len(images) else 1)
        by_bytes = int(min(info.max_message_bytes, 2**31) * _MESSAGE_HEADROOM) // per_image
        return max(1, min(info.max_batch_size, by_bytes))

    def vocabulary(self) -> Vocabulary:
        """A text encoder's vocabulary and tokenizer, as the provider uses them (cached; costs no queries), so
        ``vocabulary().encode(texts)`` gives the token ids the provider would. ServiceError FAILED_PRECONDITION on
        an image encoder."""
        if self._vocabulary is None:
            # imported here: the text front end is robust_pretrain's, and image clients never need it
            from robust_pretrain.text_input import Vocabulary

            reply = self._call(self._stub.GetVocabulary, pb.VocabularyRequest())
            if (reply.pad_id, reply.unk_id) != (Vocabulary.pad_id, Vocabulary.unk_id):
                raise ValueError(f"the server's pad/unk ids {reply.pad_id}/{reply.unk_id} are not "
                                 f"{Vocabulary.pad_id}/{Vocabulary.unk_id}, the only ones Vocabulary knows")
            self._vocabulary = Vocabulary(tokens=tuple(reply.tokens), max_length=int(reply.max_length),
                                          pattern=reply.token_pattern, lowercase=reply.lowercase)
        return self._vocabulary

    def embed(self, token_ids: TokenIdBatch, *, input_ids: Sequence[str] | None = None) -> torch.Tensor:
        """Embedding matrices [batch, embed_dim, 1, max_length] float32 of token ids [batch, length] (length <=
        max_length; shorter rows are padded with pad_id by the server): the exact input the text encoder reads,
        e.g. to add SEaaS-SC's noise to. Each sequence is one query (recorded as "Embed")."""
        import torch  # SEaaS-SC's noise is torch's: the certify extra, not the light client

        array = _token_id_array(token_ids)
        ids = _ids_for(input_ids, len(array))
        step = self._chunk_size(array)
        parts = []
        for start in range(0, len(array), step):
            request = pb.EmbedRequest(token_ids=encode_tensor(array[start : start + step]))
            reply = self._call(self._stub.Embed, request)
            self.ledger.record("Embed", ids[start : start + step], request.ByteSize(), reply.ByteSize())
            parts.append(torch.from_numpy(decode_tensor(reply.embeddings, name="embeddings").astype(np.float32)))
        if not parts:
            return torch.zeros((0, *self.info().input_shape), dtype=torch.float32)
        return torch.cat(parts)

    def features(self, images: ImageBatch | None = None, *, token_ids: TokenIdBatch | None = None,
                 input_ids: Sequence[str] | None = None, feature_dtype: str = "float32") -> np.ndarray:
        """f(x) for images [batch, C, H, W] (float32/float16 in the declared range, or uint8) → [batch, D] float32;
        for a text encoder, either its embedding matrices as ``images`` or ``token_ids`` [batch, length] (exactly
        one of the two).

        Batches larger than the server's limit are split; each image or sequence costs one query.
        ``feature_dtype="float16"`` halves the reply's bytes and rounds each feature to float16 on the server.
        """
        wire_features = _feature_dtype(feature_dtype)
        array, kind = _batch_array(images, token_ids)
        ids = _ids_for(input_ids, len(array))
        step = self._chunk_size(array)
        parts = []
        for start in range(0, len(array), step):
            request = pb.FeatureRequest(feature_dtype=wire_features,
                                        **{kind: encode_tensor(array[start : start + step])})
            reply = self._call(self._stub.Feature, request)
            self.ledger.record("Feature", ids[start : start + step], request.ByteSize(), reply.ByteSize())
            parts.append(_decoded_features(reply))
        return np.concatenate(parts) if parts else np.zeros((0, self.info().feature_dim), np.float32)

    def stream_features(
        self,
        batches: Iterable[tuple[ImageBatch | TokenIdBatch, Sequence[str] | None]],
        *,
        timeout_s: float | None = None,
        feature_dtype: str = "float32",
        inputs: InputKind = "images",
    ) -> Iterator[np.ndarray]:
        """Features of each batch over a StreamFeatures call, in order, one float32 array per batch (travelling as
        ``feature_dtype``, see ``features``). ``inputs="token_ids"``: every batch is token ids [batch, length] for a
        text encoder instead of images.

        Batches are produced lazily: gRPC's flow control pulls the next one only as the server keeps up, so a
        generator of 10^5 noisy images never sits in memory at once. ``timeout_s`` is the deadline of the
        *whole* stream (default: the client's ``timeout_s``); give long streams a long one.

        A replica lost mid-stream (UNAVAILABLE) costs no result: a new call, which round_robin sends to a live
        replica, re-sends the unanswered batches and goes on (up to ``max_attempts`` calls in a row that answer
        nothing). Feature is deterministic, so the arrays are those of an undisturbed stream, and each batch is
        recorded in the ledger once, when answered. Only the batches sent and not yet answered are kept.
        """
        deadline = time.monotonic() + (self.timeout_s if timeout_s is None else timeout_s)
        wire_features = _feature_dtype(feature_dtype)
        if inputs not in ("images", "token_ids"):
            raise ValueError(f"inputs must be 'images' or 'token_ids', got {inputs!r}")
        unanswered = UnansweredRequests(_StreamedBatch.encode(batch, ids, wire_features, inputs)
                                        for batch, ids in batches)
        failures = 0
        while True:
            requests = (batch.request for batch in unanswered.resend_then_pull())
            responses = self._stub.StreamFeatures(
                requests, timeout=max(deadline - time.monotonic(), 0.0), metadata=self._metadata
            )
            try:
                for reply in responses:
                    batch = unanswered.answered()
                    failures = 0
                    self.ledger.record("StreamFeatures", batch.input_ids, batch.request_bytes, reply.ByteSize())
                    yield _decoded_features(reply)
                return
            except grpc.RpcError as error:
                if unanswered.source_error is not None:
                    raise unanswered.source_error from error  # the batches' generator failed, not the service
                failures += 1
                backoff = self.retry.wait_s(error, failures)
                if not self.retry.another_try(error, failures, deadline - backoff):
                    raise _service_error(error, failures) from error
            finally:
                responses.cancel()  # a consumer that stops early stops the server's work too
            time.sleep(backoff)

    def f2i_perturb(
        self,
        images: ImageBatch | None = None,
        feature_radii: Sequence[float] | np.ndarray | torch.Tensor | None = None,
        *,
        token_ids: TokenIdBatch | None = None,
        input_ids: Sequence[str] | None = None,
        bound: str = "",
    ) -> F2IReply:
        """Image-space certified radius R per image from its feature-space radius R_F (REaaS only); for a text
        encoder, per sequence given as ``token_ids`` [batch, length] or as embedding matrices in ``images``.

        Guarantee (the server's): ||f(x + d) - f(x)||_2 < R_F for every ||d||_2 < R (for text: d an l2 perturbation
        of the whole embedding matrix). Each image or sequence is one query.
        """
        if feature_radii is None:
            raise ValueError("give feature_radii: one R_F per image or sequence")
        array, kind = _batch_array(images, token_ids)
        # float64 end to end: torch.as_tensor would round a Python list to float32 before it is sent
        radii = as_numpy(feature_radii).astype(np.float64).reshape(-1)
        if len(radii) != len(array):
            raise ValueError(f"{len(radii)} feature radii for {len(array)} images; give one R_F per image")
        limit = self.info().max_feature_radius
        if limit > 0:  # beyond it R_F certifies nothing more; a smaller R_F never gives a larger R, so still sound
            radii = np.minimum(radii, limit)
        ids = _ids_for(input_ids, len(array))
        step = self._chunk_size(array)
        parts = []
        for start in range(0, len(array), step):
            request = pb.F2IPerturbRequest(
                feature_radii=radii[start : start + step].tolist(),
                bound=bound,
                **{kind: encode_tensor(array[start : start + step])},
            )
            reply = self._call(self._stub.F2IPerturb, request)
            self.ledger.record("F2IPerturb", ids[start : start + step], request.ByteSize(), reply.ByteSize())
            parts.append(F2IReply.from_proto(reply))
        return F2IReply.concatenate(parts)
