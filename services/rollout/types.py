"""What the rollout pool's callers exchange with it: sampling specs, requests, results, per-request errors.

This module owns the plain data of generation (docs/design.md step 2) and the request checks that
every backend shares: counting image items, classifying an engine's validation error into one of
the ``ERR_*`` causes, the vision tokens that must never be sampled, and decoding images.

**Seeds.** With ``SamplingSpec.seed`` set, request ``i`` of a call samples with seed
``seed + i * n`` (vLLM gives its k-th sample ``+ k``), whichever worker serves it.

**Errors.** A request that cannot be served yields an entry in :attr:`RolloutResult.errors`
(request index -> message starting with one of the ``ERR_*`` causes); the other requests are
served. Only the engine itself failing raises.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from PIL import Image

from trainer.core.batch import RolloutBatch
from trainer.core.families import family_of

Backend = Literal["vllm", "hf"]

# Causes of per-request errors; every message starts with one of them.
ERR_PROMPT_TOO_LONG = "prompt_too_long"
ERR_MISSING_IMAGE = "missing_image"
ERR_IMAGE_TOKEN_MISMATCH = "image_token_mismatch"
ERR_INVALID_REQUEST = "invalid_request"


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

    ``images`` holds PIL images (or image file paths) for a plain ``RolloutWorker``, ObjectRefs of
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
class Sample:
    """One sampled response of one request, as a backend returns it."""

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
    """The model family's vision special tokens (trainer/core/families.py): never sampled."""
    return family_of(model_config).vision_token_ids(model_config)


def load_images(images: Sequence[Any]) -> list[Image.Image]:
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
