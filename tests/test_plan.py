import pytest

from llmdrop.errors import LlmdropError
from llmdrop.planning.plan import DropPlan, parse_layers, select

IMP = {  # 6 layers; attn is least important at 4, 5; mlp at 1, 3; block at 2
    "attn": [0.9, 0.5, 0.4, 0.3, 0.1, 0.05],
    "mlp": [0.8, 0.02, 0.6, 0.03, 0.7, 0.2],
    "block": [0.95, 0.5, 0.01, 0.4, 0.3, 0.35],
}


def test_parse_layers_ranges_and_dedup():
    assert parse_layers("3,5,20-23,5") == [3, 5, 20, 21, 22, 23]
    assert parse_layers("") == [] and parse_layers(None) == []


@pytest.mark.parametrize("text", ["3,x", "5-2", "1-", "a-b"])
def test_parse_layers_rejects_garbage(text):
    with pytest.raises(LlmdropError, match="bad layer list"):
        parse_layers(text)


def test_parse_layers_out_of_range():
    with pytest.raises(LlmdropError, match="layer 30 is out of range: the model has layers 0-29"):
        parse_layers("1,30", 30)


def test_select_by_count_picks_lowest():
    plan = select(IMP, attn=2, mlp=2)
    assert (plan.attn, plan.mlp, plan.blocks) == ([4, 5], [1, 3], [])


def test_select_blocks_first_then_sublayers_elsewhere():
    plan = select(IMP, blocks=1, attn=2)
    assert plan.blocks == [2]
    assert plan.attn == [4, 5]
    plan = select(IMP, block_layers=[4, 5], attn=2)  # the lowest attentions are gone with their blocks
    assert plan.blocks == [4, 5] and plan.attn == [2, 3]


def test_select_joint_ranks_attn_and_mlp_together():
    plan = select(IMP, joint=3)  # 0.02 mlp1, 0.03 mlp3, 0.05 attn5
    assert plan.mlp == [1, 3] and plan.attn == [5]


def test_layer_losing_both_sublayers_becomes_a_block():
    plan = DropPlan(6, attn=[1, 2], mlp=[2, 3])
    assert (plan.blocks, plan.attn, plan.mlp) == ([2], [1], [3])
    assert plan.layer_map() == {0: 0, 1: 1, 3: 2, 4: 3, 5: 4}
    assert plan.exported_sublayers() == ([1], [2])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"attn": 7}, "cannot drop 7 attention sublayers: only 6 are left"),
        ({"blocks": 6}, "removes all 6 layers"),
        ({"attn": -1}, "--attn must be >= 0"),
        ({}, "nothing to drop"),
        ({"joint": 13}, "cannot drop 13 sublayers jointly: only 12"),
    ],
)
def test_impossible_requests(kwargs, message):
    with pytest.raises(LlmdropError, match=message):
        select(IMP, **kwargs)


def test_plan_index_out_of_range():
    with pytest.raises(LlmdropError, match="attn layer 6 is out of range"):
        DropPlan(6, attn=[6])


def test_with_absent_parts_adds_an_exports_own_drops():
    plan = DropPlan(6, blocks=[1], attn=[2], mlp=[])
    merged = plan.with_absent_parts({"attn": [1, 4], "mlp": [5]})
    assert (merged.blocks, merged.attn, merged.mlp) == ([1], [2, 4], [5])  # a removed block needs nothing more
    assert plan.with_absent_parts({"attn": [], "mlp": []}) is plan
