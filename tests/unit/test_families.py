"""The model seam (trainer/core/families.py): each family's adapter against transformers' own configs
and models, and a model type no adapter covers refused before anything starts.

The forward check builds a tiny random-weight Qwen3-VL (16-px patches) from its config and scores a
prompt with an image through ``model_inputs`` + ``token_logprobs``: the log-probs equal the model's
own forward, which computes its m-RoPE positions itself from ``mm_token_type_ids``.
"""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from trainer.core.families import FAMILIES, UnsupportedModel, family_for_type, family_of, family_of_folder

#: (config class, family, image pad id, vision tokens, patch px) as transformers 5.19 defines them.
CASES = [
    ("Qwen2VLConfig", "qwen2_vl", 151655, [151652, 151653, 151655, 151656], 14),
    ("Qwen2_5_VLConfig", "qwen2_5_vl", 151655, [151652, 151653, 151655, 151656], 14),
    ("Qwen3VLConfig", "qwen3_vl", 151655, [151652, 151653, 151655, 151656], 16),
    ("Qwen3VLMoeConfig", "qwen3_vl_moe", 151655, [151652, 151653, 151655, 151656], 16),
    ("Qwen3_5Config", "qwen3_5", 248056, [248053, 248054, 248056, 248057], 16),
    ("Qwen3_5MoeConfig", "qwen3_5", 248056, [248053, 248054, 248056, 248057], 16),
]


@pytest.mark.parametrize("config_cls,name,image_id,vision_ids,patch", CASES, ids=[c[0] for c in CASES])
def test_each_family_reads_its_models_config(config_cls, name, image_id, vision_ids, patch):
    config = getattr(transformers, config_cls)()
    family = family_of(config)
    assert family is FAMILIES[name]
    assert family.image_token_id(config) == image_id
    assert family.vision_token_ids(config) == vision_ids
    assert family.patch_size(config) == patch and family.merge_size(config) == 2


def test_an_unsupported_model_type_names_the_type_and_the_families(tmp_path):
    with pytest.raises(
        UnsupportedModel,
        match=r"model_type 'llava' is not a supported model family \(supported: .*qwen2_5_vl.*qwen3_vl_moe",
    ):
        family_for_type("llava")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava"}))
    with pytest.raises(UnsupportedModel, match="'llava'"):
        family_of_folder(tmp_path)
    from trainer.core.config import resolve_config
    from trainer.rundir import check_model_paths

    cfg = resolve_config(overrides=[f"model.path={tmp_path}"])
    with pytest.raises(UnsupportedModel, match=rf"model.path={tmp_path}: model_type 'llava'"):
        check_model_paths(cfg)  # the driver calls it before Ray starts


def _tiny_qwen3_vl():
    config = transformers.Qwen3VLConfig(
        text_config=dict(
            vocab_size=160,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            rope_scaling={"rope_type": "default", "mrope_section": [2, 3, 3], "mrope_interleaved": True},
            max_position_embeddings=512,
        ),
        vision_config=dict(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            out_hidden_size=64,
            patch_size=16,
            spatial_merge_size=2,
            temporal_patch_size=2,
            num_position_embeddings=64,
            deepstack_visual_indexes=[0],
        ),
        image_token_id=150,
        video_token_id=151,
        vision_start_token_id=152,
        vision_end_token_id=153,
    )
    torch.manual_seed(0)
    return transformers.Qwen3VLForConditionalGeneration(config).eval()


def test_a_qwen3_vl_prompt_is_scored_as_the_models_own_forward_scores_it():
    from PIL import Image

    from trainer.core.batch import RolloutBatch
    from trainer.core.modeling import model_inputs, token_logprobs

    model = _tiny_qwen3_vl()
    family = family_of(model)
    assert family.name == "qwen3_vl" and family.vision_tower(model) is model.model.visual
    ip = transformers.Qwen2VLImageProcessor(
        patch_size=16, merge_size=2, temporal_patch_size=2, size={"shortest_edge": 32 * 32, "longest_edge": 64 * 64}
    )
    image = Image.new("RGB", (64, 32), (200, 30, 30))
    grid = ip(images=[image], return_tensors="pt")["image_grid_thw"]
    n_tokens = int(grid.prod()) // 4
    prompt = [1, 2, 152, *([150] * n_tokens), 153, 3, 4]
    batch = RolloutBatch.from_sequences(
        [prompt, prompt[:2] + prompt[2:]],
        [[10, 11, 12], [13, 14]],
        [[0.0] * 3, [0.0] * 2],
        group_ids=[0, 0],
        row_ids=[0, 0],
        weight_version=0,
        image_refs=[[], []],
        answers=["x", "x"],
        pad_token_id=0,
    )
    images = [[image], [image]]
    inputs = model_inputs(model, ip, batch, images)
    with torch.no_grad():
        logp, _ = token_logprobs(model, inputs, batch.response_ids, batch.response_mask)
        # The model's own way: positions from mm_token_type_ids inside forward.
        own = {k: v for k, v in inputs.items() if k != "position_ids"}
        own["mm_token_type_ids"] = (inputs["input_ids"] == 150).int()
        logits = model(**own).logits.float()
    width = batch.response_ids.shape[1]
    ref = torch.log_softmax(logits[:, -width - 1 : -1], dim=-1).gather(-1, batch.response_ids.unsqueeze(-1))[..., 0]
    ref = torch.where(batch.response_mask, ref, 0.0)
    assert torch.allclose(logp, ref, atol=1e-5), (logp - ref).abs().max()
    # And the positions matter: 1-D positions give other log-probs (the check can fail).
    mask = inputs["attention_mask"]
    plain = dict(inputs, position_ids=(mask.cumsum(-1) - 1).clamp(min=0).unsqueeze(0).expand(3, -1, -1))
    with torch.no_grad():
        flat = torch.log_softmax(model(**plain).logits.float()[:, -width - 1 : -1], dim=-1)
    flat = torch.where(batch.response_mask, flat.gather(-1, batch.response_ids.unsqueeze(-1))[..., 0], 0.0)
    assert (flat - ref).abs().max() > 1e-4


def test_mask_cells_are_the_authors_14_px_unless_auto_takes_the_models_patch(tmp_path):
    from trainer.core.config import ConfigError, resolve_config
    from trainer.core.families import mask_patch_size

    qwen3 = tmp_path / "qwen3"
    _tiny_qwen3_vl().config.save_pretrained(qwen3)
    qwen25 = tmp_path / "qwen25"
    transformers.Qwen2_5_VLConfig().save_pretrained(qwen25)
    for folder, patch in ((qwen3, 16), (qwen25, 14)):
        cfg = resolve_config(overrides=[f"model.path={folder}"])
        assert cfg.corruption.patch_size == 14 and mask_patch_size(cfg.corruption.patch_size, cfg.model) == 14
        cfg = resolve_config(overrides=[f"model.path={folder}", "corruption.patch_size=auto"])
        assert mask_patch_size(cfg.corruption.patch_size, cfg.model) == patch
    for bad in ("0", "big"):
        with pytest.raises(ConfigError, match="corruption.patch_size"):
            resolve_config(overrides=[f"corruption.patch_size={bad}"])
