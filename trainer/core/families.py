"""The model seam: what differs between vision-language model families, one adapter per family.

Everything papo needs to know about a model's architecture goes through :func:`family_of`: the
image/video/vision-boundary token ids (rollout blocks them, the forward counts image tokens), the
vision patch and merge sizes, the position ids the forward must be handed, and the vision tower's
module (freezing, ``learner.vision_lr``). Nothing outside this module branches on a model type.

Supported families share the Qwen-VL layout (``model.model.visual``, m-RoPE positions from
``model.model.get_rope_index``, the vision special tokens in the config): Qwen2-VL, Qwen2.5-VL,
Qwen3-VL (dense and MoE) and Qwen3.5 (dense and MoE). A config of another type fails naming its
type and these families.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch stays out of the import: the CLI checks model folders before loading it
    import torch


@dataclass(frozen=True)
class QwenVLFamily:
    """The Qwen-VL families: m-RoPE positions from ``get_rope_index``, the vision tower at
    ``model.model.visual``, images as ``<|vision_start|><|image_pad|>...<|vision_end|>``."""

    name: str
    model_types: tuple[str, ...]
    #: Some layers are recurrent (Qwen3.5's Gated DeltaNet): vLLM caches their state per prefix block
    #: only with chunked prefill, which papo turns off on CPU (services/rollout/engines.py).
    recurrent_layers: bool = False

    @staticmethod
    def _field(config: Any, name: str) -> int | None:
        value = getattr(config, name, None)
        if value is None and hasattr(config, "text_config"):
            value = getattr(config.text_config, name, None)
        return None if value is None else int(value)

    def image_token_id(self, config: Any) -> int:
        return int(self._field(config, "image_token_id"))  # type: ignore[arg-type]

    def video_token_id(self, config: Any) -> int:
        return int(self._field(config, "video_token_id"))  # type: ignore[arg-type]

    def vision_token_ids(self, config: Any) -> list[int]:
        """The vision special tokens (pads and boundaries): a policy must never sample them."""
        names = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
        return sorted({v for v in (self._field(config, n) for n in names) if v is not None})

    @staticmethod
    def merge_size(config: Any) -> int:
        """Patches per image token along each side (``spatial_merge_size``)."""
        return int(getattr(config.vision_config, "spatial_merge_size", 2))

    @staticmethod
    def patch_size(config: Any) -> int:
        """The vision patch in pixels (Qwen2/2.5-VL 14, Qwen3-VL and Qwen3.5 16)."""
        return int(config.vision_config.patch_size)

    @staticmethod
    def vision_tower(model: Any) -> torch.nn.Module:
        return model.model.visual

    def position_ids(
        self, model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, image_grid_thw: torch.Tensor
    ) -> torch.Tensor:
        """m-RoPE positions (3, N, L), computed explicitly: transformers computes them inside
        ``forward`` only when handed ``mm_token_type_ids`` and caches ``rope_deltas`` between calls."""
        cfg = model.config
        token_type = (input_ids == self.image_token_id(cfg)).int() + 2 * (input_ids == self.video_token_id(cfg)).int()
        position_ids, _ = model.model.get_rope_index(
            input_ids, mm_token_type_ids=token_type, image_grid_thw=image_grid_thw, attention_mask=attention_mask
        )
        return position_ids


FAMILIES: dict[str, QwenVLFamily] = {
    f.name: f
    for f in (
        QwenVLFamily("qwen2_vl", ("qwen2_vl",)),
        QwenVLFamily("qwen2_5_vl", ("qwen2_5_vl",)),
        QwenVLFamily("qwen3_vl", ("qwen3_vl",)),
        QwenVLFamily("qwen3_vl_moe", ("qwen3_vl_moe",)),
        QwenVLFamily("qwen3_5", ("qwen3_5", "qwen3_5_moe"), recurrent_layers=True),
    )
}
_BY_MODEL_TYPE = {t: f for f in FAMILIES.values() for t in f.model_types}


class UnsupportedModel(ValueError):
    """A model whose ``model_type`` no family adapter covers."""


def family_for_type(model_type: str | None) -> QwenVLFamily:
    """The adapter of a ``model_type``; raises :class:`UnsupportedModel` naming the supported types."""
    family = _BY_MODEL_TYPE.get(model_type or "")
    if family is None:
        supported = ", ".join(sorted(_BY_MODEL_TYPE))
        raise UnsupportedModel(f"model_type {model_type!r} is not a supported model family (supported: {supported})")
    return family


def family_of(config_or_model: Any) -> QwenVLFamily:
    """The adapter of a transformers config (or of a model, through its ``config``)."""
    config = getattr(config_or_model, "config", config_or_model)
    return family_for_type(getattr(config, "model_type", None))


def mask_patch_size(patch_size: int | str, model: Any) -> int:
    """``corruption.patch_size`` in pixels: an int as given (the authors mask 14-px cells for every
    family), or ``auto``: the vision patch of the job's model (``model``: its ``ModelConfig``)."""
    if patch_size != "auto":
        return int(patch_size)
    from transformers import AutoConfig  # lazy: only for auto

    config = AutoConfig.from_pretrained(str(model.path), trust_remote_code=bool(model.trust_remote_code))
    return family_of(config).patch_size(config)


def family_of_folder(path: str | Path) -> QwenVLFamily:
    """The adapter of a local model folder, from its ``config.json`` alone (no transformers import)."""
    return family_for_type(json.loads((Path(path) / "config.json").read_text()).get("model_type"))
