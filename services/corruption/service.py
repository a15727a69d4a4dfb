"""The corruption service: a plain class (no Ray) that masks a prompt's images with the configured
strategy, one seed per image from :func:`trainer.core.corruption.mask_seed` (docs/design.md step 2),
and :meth:`CorruptionService.mask_flat`, the batch body that each corruption pool actor runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from trainer.core.corruption import (
    DEFAULT_MAX_PIXELS,
    DEFAULT_NOISE_STD,
    DEFAULT_PATCH_SIZE,
    DEFAULT_PROB,
    DEFAULT_STRATEGY,
    CorruptionParams,
    ImageLike,
    get_strategy,
    mask_seed,
)

#: Per prompt in one pool call: (run_seed, row_id, epoch, number of images, has precomputed).
Layout = tuple[int, int, int, int, bool]


class CorruptionService:
    """Masks the images of prompts with one configured strategy; no Ray needed.

    ``mask_prompt`` derives one seed per image with ``mask_seed``; the n rollouts of the prompt
    share the result, so call it once per prompt, not once per rollout.
    """

    def __init__(
        self,
        strategy: str = DEFAULT_STRATEGY,
        patch_size: int = DEFAULT_PATCH_SIZE,
        prob: float = DEFAULT_PROB,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        noise_std: float = DEFAULT_NOISE_STD,
    ) -> None:
        self.strategy_name = strategy
        self.strategy = get_strategy(strategy)
        self.params = CorruptionParams(patch_size=patch_size, prob=prob, max_pixels=max_pixels, noise_std=noise_std)

    def mask_prompt(
        self,
        images: Sequence[ImageLike],
        run_seed: int,
        row_id: int,
        epoch: int,
        precomputed: Sequence[Any] | None = None,
    ) -> list[ImageLike]:
        """The masked images of one prompt, in order."""
        if precomputed is not None and len(precomputed) != len(images):
            raise ValueError(f"row {row_id}: {len(precomputed)} precomputed masked images for {len(images)} images")
        out = []
        for index, image in enumerate(images):
            seed = mask_seed(run_seed, row_id, epoch, index)
            extra = precomputed[index] if precomputed is not None else None
            out.append(self.strategy(image, seed, self.params, extra))
        return out

    def mask_flat(self, layout: Sequence[Layout], *flat: Any) -> Any:
        """Masked images of all prompts in ``layout``, flattened, in order (one pool call).

        Images travel as top-level positional arguments so Ray resolves their ObjectRefs before the
        call (refs nested in a list would arrive unresolved).

        ``flat`` holds, prompt after prompt, its images and then (if it has them) its
        precomputed values. With exactly one image the bare image is returned, as Ray expects
        for ``num_returns=1``.
        """
        out: list[ImageLike] = []
        position = 0
        for run_seed, row_id, epoch, count, has_precomputed in layout:
            images = flat[position : position + count]
            position += count
            precomputed = None
            if has_precomputed:
                precomputed = flat[position : position + count]
                position += count
            out.extend(self.mask_prompt(images, run_seed, row_id, epoch, precomputed))
        return out[0] if len(out) == 1 else out


@dataclass(frozen=True)
class MaskRequest:
    """One prompt to mask: its images (ObjectRefs or values) and its seed key.

    ``precomputed`` holds the row's ``images_masked`` values (or ObjectRefs of them) for the
    ``precomputed`` strategy, one per image; leave it None otherwise.
    """

    images: Sequence[Any]
    run_seed: int
    row_id: int
    epoch: int
    precomputed: Sequence[Any] | None = None
