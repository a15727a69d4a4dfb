"""The plain rollout worker (no Ray): one generation engine with versioned in-place weight updates.

This module owns turning chat-message prompts plus images into :class:`~trainer.core.batch.RolloutBatch`
rows (docs/design.md step 2) and the worker's half of weight sync (step 6): the request checks,
seeds and batching every backend shares, and the version it holds. The backends themselves (vLLM,
transformers) are services/rollout/engines.py; the Ray pool is services/rollout/pool.py, which hosts
one worker per actor and calls :meth:`RolloutWorker.serve` with the pool's current weights.

A broadcast handle (``nccl``/``gloo``) is received even at the version held (every member takes
part in every broadcast); a worker that Ray restarted after one raises
:class:`~trainer.core.weights.StaleWeights` and the pool resubmits with the same version by the
object store.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from services.follower import catch_up
from services.rollout.engines import Engine, HfEngine, VllmEngine
from services.rollout.types import (
    ERR_IMAGE_TOKEN_MISMATCH,
    ERR_INVALID_REQUEST,
    ERR_MISSING_IMAGE,
    Backend,
    RolloutRequest,
    RolloutResult,
    Sample,
    SamplingSpec,
    count_image_items,
    load_images,
)
from trainer.core.batch import RolloutBatch
from trainer.core.config import ModelConfig, RolloutConfig
from trainer.core.modeling import load_processor, processor_pixels
from trainer.core.weights import BROADCAST_TRANSPORTS, WeightsHandle, digest
from trainer.transport.object_store import fetch_blob, resolve_image_refs


def worker_kwargs_from_config(
    rollout: RolloutConfig,
    model: ModelConfig,
    *,
    seed: int = 0,
    initial_version: int = 0,
    max_images_per_prompt: int = 1,
    model_path: str | Path | None = None,
) -> dict[str, Any]:
    """:class:`RolloutWorker` arguments from ``RolloutConfig`` and ``ModelConfig``.

    ``model_path`` overrides ``model.path`` (e.g. with the resolved ``demo://`` folder). The pixel
    limits come from ``model`` only (:func:`~trainer.core.modeling.processor_pixels`): the one
    source that every processor call shares.
    """
    pixels = processor_pixels(model, str(model_path or model.path))
    return dict(
        model_path=str(model_path or model.path),
        backend=rollout.backend,
        dtype=model.dtype,
        min_pixels=pixels[0],
        max_pixels=pixels[1],
        max_model_len=rollout.max_model_len,
        max_images_per_prompt=max_images_per_prompt,
        tensor_parallel_size=rollout.tensor_parallel_size,
        gpu_memory_utilization=rollout.gpu_memory_utilization,
        enforce_eager=rollout.enforce_eager,
        cpu_kvcache_space_gb=rollout.cpu_kvcache_space_gb,
        seed=seed,
        initial_version=initial_version,
        trust_remote_code=model.trust_remote_code,
    )


class RolloutWorker:
    """One generation engine (vLLM or transformers) with versioned in-place weight updates.

    Construct from plain values or from config models (:meth:`from_config`). ``weight_version``
    is the version of the weights the engine holds (``initial_version`` for the model folder).
    ``get_timeout_s`` bounds fetching a request's images and a weights blob from the object store.
    """

    def __init__(
        self,
        model_path: str | Path,
        *,
        backend: Backend = "vllm",
        dtype: str = "bfloat16",
        min_pixels: int = 56 * 56,
        max_pixels: int = 1280 * 28 * 28,
        max_model_len: int = 8192,
        max_images_per_prompt: int = 1,
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.6,
        enforce_eager: bool = False,
        cpu_kvcache_space_gb: int = 1,
        seed: int = 0,
        initial_version: int = 0,
        trust_remote_code: bool = False,
        get_timeout_s: float = 900.0,
    ) -> None:
        if backend not in ("vllm", "hf"):
            raise ValueError(f"backend must be 'vllm' or 'hf', got {backend!r}")
        self.model_path = str(model_path)
        self.backend: Backend = backend
        self.max_model_len = max_model_len
        self.max_images_per_prompt = max_images_per_prompt
        self.weight_version = int(initial_version)
        self.get_timeout_s = get_timeout_s
        self.weight_sync_seconds: list[float] = []
        self.processor = load_processor(
            self.model_path, min_pixels=min_pixels, max_pixels=max_pixels, trust_remote_code=trust_remote_code
        )
        self.tokenizer = self.processor.tokenizer
        t0 = time.perf_counter()
        self.engine: Engine
        if backend == "vllm":
            self.engine = VllmEngine(
                self.model_path,
                dtype=dtype,
                min_pixels=min_pixels,
                max_pixels=max_pixels,
                max_model_len=max_model_len,
                max_images_per_prompt=max_images_per_prompt,
                tensor_parallel_size=tensor_parallel_size,
                gpu_memory_utilization=gpu_memory_utilization,
                enforce_eager=enforce_eager,
                cpu_kvcache_space_gb=cpu_kvcache_space_gb,
                seed=seed,
                trust_remote_code=trust_remote_code,
            )
        else:
            self.engine = HfEngine(
                self.model_path,
                processor=self.processor,
                dtype=dtype,
                max_model_len=max_model_len,
                trust_remote_code=trust_remote_code,
            )
        self.start_seconds = time.perf_counter() - t0
        #: Processes that receive a weight broadcast (vLLM: one per tensor-parallel rank).
        self.weight_group_ranks = self.engine.weight_group_ranks

    @classmethod
    def from_config(
        cls,
        rollout: RolloutConfig,
        model: ModelConfig,
        *,
        seed: int = 0,
        initial_version: int = 0,
        max_images_per_prompt: int = 1,
        model_path: str | Path | None = None,
    ) -> RolloutWorker:
        """From ``RolloutConfig`` and ``ModelConfig`` (see :func:`worker_kwargs_from_config`)."""
        return cls(
            **worker_kwargs_from_config(
                rollout,
                model,
                seed=seed,
                initial_version=initial_version,
                max_images_per_prompt=max_images_per_prompt,
                model_path=model_path,
            )
        )

    # ---- generation --------------------------------------------------------------------------

    def prompt_text(self, messages: Sequence[dict[str, Any]]) -> str:
        return self.processor.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)

    def _prepare(self, request: RolloutRequest, images: list[Image.Image] | None) -> tuple[str, list[Image.Image]]:
        """Prompt text and decoded images, or raise ValueError whose message names the cause."""
        if images is None:
            try:
                images = load_images(request.images)
            except (OSError, ValueError) as e:
                raise ValueError(f"{ERR_MISSING_IMAGE}: {e}") from None
        placeholders = count_image_items(request.messages)
        if placeholders != len(images):
            raise ValueError(
                f"{ERR_IMAGE_TOKEN_MISMATCH}: the messages hold {placeholders} image item(s) but "
                f"{len(images)} image(s) were given"
            )
        if len(images) > self.max_images_per_prompt:
            raise ValueError(
                f"{ERR_INVALID_REQUEST}: {len(images)} images exceed max_images_per_prompt={self.max_images_per_prompt}"
            )
        try:
            text = self.prompt_text(request.messages)
        except Exception as e:  # a malformed message list: the template raises
            raise ValueError(f"{ERR_INVALID_REQUEST}: chat template failed: {e}") from None
        return text, images

    def generate(
        self,
        requests: Sequence[RolloutRequest],
        sampling: SamplingSpec,
        *,
        request_offset: int = 0,
        images: Sequence[list[Image.Image] | None | BaseException] | None = None,
    ) -> RolloutResult:
        """Sample ``sampling.n`` responses for each request.

        ``request_offset``: global index of ``requests[0]`` (seeds, group ids). ``images``: images
        already decoded by the caller (the actor resolves ObjectRefs), or an exception per
        request whose images could not be fetched.
        """
        t0 = time.perf_counter()
        errors: dict[int, str] = {}
        prepared: dict[int, tuple[str, list[Image.Image]]] = {}
        for i, request in enumerate(requests):
            pre = None if images is None else images[i]
            if isinstance(pre, BaseException):
                errors[i] = f"{ERR_MISSING_IMAGE}: {type(pre).__name__}: {pre}"
                continue
            try:
                prepared[i] = self._prepare(request, pre)
            except ValueError as e:
                errors[i] = str(e)
        samples = self.engine.sample(prepared, sampling, request_offset, errors)
        batch = self._to_batch(requests, samples, request_offset)
        return RolloutResult(
            batch=batch,
            errors={request_offset + i: e for i, e in errors.items()},
            weight_version=self.weight_version,
            num_requests=len(requests),
            seconds=time.perf_counter() - t0,
        )

    def _to_batch(
        self, requests: Sequence[RolloutRequest], samples: dict[int, list[Sample]], request_offset: int
    ) -> RolloutBatch | None:
        rows = [(i, s) for i in sorted(samples) for s in samples[i]]
        if not rows:
            return None
        return RolloutBatch.from_sequences(
            [s.prompt_ids for _, s in rows],
            [s.response_ids for _, s in rows],
            [s.logp for _, s in rows],
            group_ids=[request_offset + i for i, _ in rows],
            row_ids=[requests[i].row_id for i, _ in rows],
            weight_version=self.weight_version,
            image_refs=[list(requests[i].images) for i, _ in rows],
            answers=[requests[i].answer for i, _ in rows],
            epochs=[requests[i].epoch for i, _ in rows],
            response_text=[s.text for _, s in rows],
            finish_reasons=[s.finish_reason for _, s in rows],
            pad_token_id=int(self.tokenizer.pad_token_id or 0),
        )

    def serve(
        self,
        requests: Sequence[RolloutRequest],
        sampling: SamplingSpec,
        request_offset: int = 0,
        handle: WeightsHandle | None = None,
    ) -> RolloutResult:
        """What the pool calls: catch up to the pool's ``handle``, fetch the requests' images, generate.

        A request whose images cannot be fetched (a lost or freed ref, a missing file) gets an error;
        the others are served.
        """
        catch_up(self, handle)
        images: list[list[Image.Image] | None | BaseException] = []
        for request in requests:
            try:
                (items,) = resolve_image_refs([request.images], self.get_timeout_s)
                images.append(load_images(items))
            except Exception as e:  # this request only
                images.append(e)
        return self.generate(requests, sampling, request_offset=request_offset, images=images)

    # ---- weights -----------------------------------------------------------------------------

    def receive_weights(self, handle: WeightsHandle, blob: bytes | None = None) -> int:
        """Load the weights of ``handle`` (version ``handle.version``) in place; returns the version.

        ``blob`` is the safetensors blob of an ``object_store`` handle (the actor fetches it from
        ``handle.ref``); the other transports need none. A handle of the version already held is a
        no-op, except a broadcast (``nccl``/``gloo``), which every group member must receive.
        """
        broadcast = handle.transport in BROADCAST_TRANSPORTS
        if handle.version == self.weight_version and not broadcast:
            return self.weight_version
        if handle.transport not in ("object_store", "cuda_ipc", *BROADCAST_TRANSPORTS):
            raise NotImplementedError(f"weight transport {handle.transport!r} is not implemented")
        t0 = time.perf_counter()
        if handle.transport == "object_store":
            if blob is None:
                raise ValueError("an object_store handle needs its blob (receive() fetches handle.ref)")
            if digest(blob) != handle.digest:
                raise ValueError(f"weights blob of version {handle.version} does not match its handle's digest")
        self.engine.load(handle, blob)
        self.weight_version = int(handle.version)
        self.weight_sync_seconds.append(time.perf_counter() - t0)
        return self.weight_version

    def held_version(self) -> int:
        return self.weight_version

    def receive(self, handle: WeightsHandle) -> int:
        """:meth:`receive_weights` with an object_store handle's blob fetched from ``handle.ref``."""
        if handle.version == self.weight_version and handle.transport not in BROADCAST_TRANSPORTS:
            return self.weight_version
        blob = fetch_blob(handle, self.get_timeout_s) if handle.transport == "object_store" else None
        return self.receive_weights(handle, blob)

    def join_weight_group(
        self, group_id: str, host: str, port: int, first_rank: int, world_size: int, backend: str, timeout_s: float
    ) -> list[int]:
        """Join the learner's weight-broadcast group as ranks ``first_rank..+weight_group_ranks`` (collective).

        vLLM: each engine worker (one per tensor-parallel rank) joins in its own process; hf: this process.
        Returns the pids of the joined processes.
        """
        return self.engine.join_weight_group(group_id, host, port, first_rank, world_size, backend, timeout_s)

    def describe(self) -> dict[str, Any]:
        return {
            "weight_version": self.weight_version,
            "start_seconds": self.start_seconds,
            "backend": self.backend,
            "weight_group_ranks": self.weight_group_ranks,
            "vision_block": self.engine.block_mode,
        }

    # ---- lifecycle ---------------------------------------------------------------------------

    def shutdown(self) -> None:
        """Stop the engine and free its memory (idempotent)."""
        self.engine.shutdown()

    def __enter__(self) -> RolloutWorker:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()
