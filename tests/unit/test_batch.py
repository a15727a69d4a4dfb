"""RolloutBatch: padding layout, selection, splitting, concatenation and validation."""

from __future__ import annotations

import pytest
import torch

from trainer.core.batch import RolloutBatch


def make_batch(prompts=((5, 6, 7), (8, 9)), responses=((1, 2), (3,), (4, 4, 4), ()), n=2, pad=0):
    rows = len(responses)
    prompt_ids = [prompts[i // n] for i in range(rows)]
    logp = [[-0.1 * (j + 1) for j in range(len(r))] for r in responses]
    return RolloutBatch.from_sequences(
        prompt_ids,
        responses,
        logp,
        group_ids=[i // n for i in range(rows)],
        row_ids=[10 + i // n for i in range(rows)],
        weight_version=3,
        image_refs=[[f"img{i // n}"] for i in range(rows)],
        answers=[f"a{i // n}" for i in range(rows)],
        pad_token_id=pad,
    )


def test_from_sequences_pads_prompt_left_and_response_right():
    b = make_batch(pad=99)
    assert b.prompt_ids.tolist() == [[5, 6, 7], [5, 6, 7], [99, 8, 9], [99, 8, 9]]
    assert b.prompt_mask.tolist()[2] == [False, True, True]
    assert b.response_ids.tolist() == [[1, 2, 99], [3, 99, 99], [4, 4, 4], [99, 99, 99]]
    assert b.response_lengths.tolist() == [2, 1, 3, 0]
    assert b.num_response_tokens == 6
    assert torch.allclose(b.rollout_logp[0], torch.tensor([-0.1, -0.2, 0.0]))
    assert b.input_ids.shape == (4, 6) and b.attention_mask.dtype == torch.long
    assert b.attention_mask[2].tolist() == [0, 1, 1, 1, 1, 1]
    assert b.weight_versions == {3}


def test_select_and_split_keep_rows_and_trim_padding():
    b = make_batch()
    s = b.select([2, 3])
    assert s.row_ids.tolist() == [11, 11] and s.image_refs == [["img1"], ["img1"]]
    assert s.prompt_ids.shape == (2, 2)  # the unused left padding column is trimmed
    assert s.response_ids.shape == (2, 3)
    first = b.select([1])
    assert first.response_ids.tolist() == [[3]]
    parts = b.split(3)
    assert [len(p) for p in parts] == [3, 1]
    assert torch.equal(RolloutBatch.concat(parts).response_ids, b.response_ids)


def test_concat_repads_and_keeps_later_fields():
    a = make_batch(prompts=((5,), (6,)), responses=((1,), (1,), (2,), (2,)))
    a.rewards = torch.tensor([1.0, 0.0, 1.0, 1.0])
    b = make_batch()
    b.rewards = torch.zeros(4)
    c = RolloutBatch.concat([a, b])
    assert len(c) == 8 and c.prompt_ids.shape == (8, 3) and c.response_ids.shape == (8, 3)
    assert c.prompt_ids[0].tolist() == [0, 0, 5] and c.prompt_mask[0].tolist() == [False, False, True]
    assert c.response_mask[0].tolist() == [True, False, False]
    assert c.rewards.tolist() == [1.0, 0.0, 1.0, 1.0, 0, 0, 0, 0]
    with pytest.raises(ValueError, match="rewards is set in some batches"):
        RolloutBatch.concat([a, make_batch()])


def test_groups_shard_and_renumber():
    b = make_batch()
    assert [g.tolist() for g in b.groups()] == [[0, 1], [2, 3]]
    assert b.shard(1, 2).row_ids.tolist() == [11, 11]
    with pytest.raises(ValueError, match="do not split evenly"):
        b.shard(0, 3)
    c = RolloutBatch.concat([b, b])
    with pytest.raises(ValueError, match="contiguous"):
        c.groups()
    assert c.renumber_groups().group_ids.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]


def test_validation_names_the_field():
    b = make_batch()
    with pytest.raises(ValueError, match=r"RolloutBatch.old_logp has shape \(4, 2\), expected \(4, 3\)"):
        b.old_logp = torch.zeros(4, 2)
        b.validate()
    b.old_logp = None
    with pytest.raises(ValueError, match="answers has 3 entries for 4 rows"):
        b.answers = ["x"] * 3
        b.validate()
    with pytest.raises(ValueError, match="2 response tokens but 1 rollout log-probs"):
        RolloutBatch.from_sequences(
            [[1]], [[1, 2]], [[0.0]], group_ids=[0], row_ids=[0], weight_version=0, image_refs=[[]], answers=["a"]
        )
    with pytest.raises(ValueError, match="missing old_logp, advantages"):
        make_batch().require("old_logp", "advantages")


def test_chunks_renumbered_with_an_offset_stay_distinct_groups():
    # DAPO keeps groups from several tries, each numbered from 0: a group kept last in one try and
    # first in the next may share an id; offsets keep them apart.
    a = make_batch().select([2, 3])  # group 1 of try 1
    b = make_batch().select([2, 3, 0, 1])  # groups 1 and 0 of try 2
    c = RolloutBatch.concat([a.renumber_groups(0), b.renumber_groups(len(a.groups()))])
    assert c.group_ids.tolist() == [0, 0, 1, 1, 2, 2] and len(c.groups()) == 3
    with pytest.raises(ValueError, match="not a boolean mask"):
        make_batch().select(torch.tensor([True, False, True, False]))
