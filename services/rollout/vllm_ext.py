"""vLLM worker extension for the rollout engine: exact in-place weight sync and tempered log-probs.

This module owns everything papo does *inside* a vLLM worker process. vLLM imports it by
qualified name (engine arg ``worker_extension_cls="services.rollout.vllm_ext.PapoWorkerExtension"``)
before it loads the model, and mixes :class:`PapoWorkerExtension` into its worker class, so the
methods below are reachable through ``LLM.collective_rpc("papo_...")``.

Two facts about vLLM (0.32, docs/cpu-stack.md "vLLM on CPU") shape it:

* **Stale prepacked GEMM weights.** On CPU, vLLM's ``dispatch_cpu_unquantized_gemm`` repacks
  every linear layer's weight into an sgl-kernel/oneDNN layout at load time and (for linear
  layers) *drops* the original parameter. An in-place ``load_weights`` afterwards writes into
  parameters that the GEMMs no longer read: log-probs come out up to 1.3 nats wrong while the
  engine runs happily. Importing this module on a CPU platform replaces the dispatch with plain
  ``torch.nn.functional.linear`` on the live parameter, so a reload is seen by the very next
  forward. (On GPU nothing is patched: CUDA GEMMs read the parameters directly.)
* **Which distribution the log-probs come from.** vLLM's default ``logprobs_mode="raw_logprobs"``
  returns ``log_softmax(logits)`` of the *untempered* model, taken before temperature, top-p and
  the allowed-token whitelist. PAPO's ``old_logp``/``masked_logp`` are ``log_softmax(logits / T)``
  over the full vocabulary (docs/algorithm.md; ``trainer.core.modeling.token_logprobs``). We get exactly that
  by folding ``1 / T`` into the model's ``LogitsProcessor.scale`` and sampling at temperature 1:
  the sampled distribution is unchanged (temperature is applied before top-p in vLLM too) and
  the raw log-probs become the tempered, unfiltered ones the learner computes.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

from trainer.core.weights import handle_from_dict
from trainer.transport.broadcast import join_weight_group, receive_broadcast
from trainer.transport.cuda_ipc import open_cuda_ipc

logger = logging.getLogger(__name__)


def _plain_cpu_gemm_dispatch(layer: torch.nn.Module, remove_weight: bool) -> None:
    """Replacement of vLLM's CPU GEMM dispatch: F.linear on the live weight, never prepacked.

    ``remove_weight`` is ignored on purpose: the parameter must survive so that
    ``load_weights`` can write into it. Non-2-D weights (conv, MoE experts) keep vLLM's own
    handling, which does not repack the tensors our models reload.
    """
    weight = getattr(layer, "weight", None)
    if weight is not None and weight.ndim != 2 and not weight.is_meta:
        _ORIGINAL_DISPATCH(layer, remove_weight)  # type: ignore[misc]
        return
    layer.cpu_linear = torch.nn.functional.linear


_ORIGINAL_DISPATCH: Any = None


def _patch_cpu_gemm_dispatch() -> bool:
    """Install :func:`_plain_cpu_gemm_dispatch` in this process when vLLM runs on CPU."""
    global _ORIGINAL_DISPATCH
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return False
    from vllm.model_executor.layers import utils as layer_utils

    if layer_utils.dispatch_cpu_unquantized_gemm is _plain_cpu_gemm_dispatch:
        return True
    _ORIGINAL_DISPATCH = layer_utils.dispatch_cpu_unquantized_gemm
    # linear.py and vocab_parallel_embedding.py import the function at call time from this
    # module, so replacing the module attribute reaches every layer built afterwards.
    layer_utils.dispatch_cpu_unquantized_gemm = _plain_cpu_gemm_dispatch
    return True


# vLLM resolves worker_extension_cls (importing this module) in the worker process before the
# model is built, which is exactly when the patch must be in place.
CPU_GEMM_PATCHED = _patch_cpu_gemm_dispatch()


class PapoWorkerExtension:
    """Methods mixed into vLLM's worker class; call them with ``llm.collective_rpc(name, args)``."""

    def _papo_model(self) -> torch.nn.Module:
        return self.model_runner.model  # type: ignore[attr-defined]

    def papo_load_weights(self, path: str) -> dict[str, Any]:
        """Load HF-named tensors from the safetensors file ``path`` into the running model.

        The names are those of ``model.safetensors`` (``trainer.core.weights.pack_state_dict``); the
        model's own ``load_weights`` maps them to vLLM's fused parameters. Returns the number of
        tensors read and of vLLM parameters written, so the caller can reject a partial load.
        """
        from safetensors.torch import load_file

        state = load_file(path, device="cpu")
        model = self._papo_model()
        loaded = model.load_weights(weights=iter(state.items()))
        # load_weights copies into the existing parameters; make sure the copies land before the
        # next forward on asynchronous devices.
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        num_params = sum(1 for _ in model.parameters())
        return {
            "num_tensors": len(state),
            "num_loaded": len(loaded) if loaded is not None else -1,
            "num_params": num_params,
        }

    def papo_load_weights_ipc(self, handle: dict[str, Any]) -> dict[str, Any]:
        """Load a ``cuda_ipc`` weights handle (as :func:`trainer.core.weights.handle_to_dict` gives it: plain
        values survive vLLM's msgpack RPC): open the learner's GPU buckets in this worker and feed
        their views to the model's ``load_weights`` (device-to-device copies).
        """
        state = open_cuda_ipc(handle_from_dict(handle))
        model = self._papo_model()
        loaded = model.load_weights(weights=iter(state.items()))
        torch.cuda.synchronize()  # the copies must land before the learner may free its buckets
        num_tensors = len(state)
        del state
        return {
            "num_tensors": num_tensors,
            "num_loaded": len(loaded) if loaded is not None else -1,
            "num_params": sum(1 for _ in model.parameters()),
        }

    def papo_join_weight_group(
        self, group_id: str, host: str, port: int, first_rank: int, world_size: int, backend: str, timeout_s: float
    ) -> int:
        """Join the learner's weight-broadcast group as rank ``first_rank`` + this worker's rank; returns the pid."""
        device = getattr(self, "device", None) if backend == "nccl" else None
        join_weight_group(
            group_id,
            host,
            port,
            first_rank + int(getattr(self, "rank", 0)),
            world_size,
            backend,
            timeout_s,
            device=device,
        )
        return os.getpid()

    def papo_load_weights_broadcast(self, handle: dict[str, Any]) -> dict[str, Any]:
        """Receive an ``nccl``/``gloo`` broadcast (handle as plain values) and load it with ``load_weights``."""
        state = receive_broadcast(handle_from_dict(handle))
        model = self._papo_model()
        loaded = model.load_weights(weights=iter(state.items()))
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        num_tensors = len(state)
        del state
        return {
            "num_tensors": num_tensors,
            "num_loaded": len(loaded) if loaded is not None else -1,
            "num_params": sum(1 for _ in model.parameters()),
        }

    def papo_set_logit_temperature(self, temperature: float) -> int:
        """Divide the model's logits by ``temperature`` (see the module docstring).

        Returns how many ``LogitsProcessor`` modules were set; 0 means the model has none and the
        caller must not rely on tempered log-probs.
        """
        from vllm.model_executor.layers.logits_processor import LogitsProcessor

        if temperature <= 0:
            raise ValueError(f"logit temperature must be > 0, got {temperature}")
        count = 0
        for module in self._papo_model().modules():
            if isinstance(module, LogitsProcessor):
                if not hasattr(module, "_papo_base_scale"):
                    module._papo_base_scale = float(module.scale)
                module.scale = module._papo_base_scale / float(temperature)
                count += 1
        return count

    def papo_cpu_gemm_patched(self) -> bool:
        """Whether this worker's linear layers read their live weights (CPU patch active or GPU)."""
        from vllm.platforms import current_platform

        return CPU_GEMM_PATCHED or not current_platform.is_cpu()
