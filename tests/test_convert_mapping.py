import pytest
import torch

from vppo_megatron.convert import mapping
from vppo_megatron.families import qwen2_5_vl

DIMS = mapping.AttentionDims(num_heads=4, num_kv_heads=2, head_dim=3)


def _qkv(hidden=5):
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(4 * 3, hidden, generator=generator)
    k = torch.randn(2 * 3, hidden, generator=generator)
    v = torch.randn(2 * 3, hidden, generator=generator)
    return q, k, v


def test_qkv_fusion_orders_rows_per_kv_group():
    q, k, v = _qkv()
    rule = mapping.Rule("x", ("q", "k", "v"), kind="qkv", tp_dim=0)
    fused = mapping.fuse(rule, [q, k, v], DIMS)
    # group 0: q heads 0-1 (rows 0-5), k_0 (3 rows), v_0 (3 rows); then group 1
    torch.testing.assert_close(fused[0:6], q[0:6])
    torch.testing.assert_close(fused[6:9], k[0:3])
    torch.testing.assert_close(fused[9:12], v[0:3])
    torch.testing.assert_close(fused[12:18], q[6:12])
    assert [torch.equal(a, b) for a, b in zip(mapping.split(rule, fused, DIMS), [q, k, v])] == [True] * 3
    # TP=2 splits whole KV groups: rank 1 holds group 1's q heads, k and v
    torch.testing.assert_close(mapping.shard(rule, fused, 1, 2), fused[12:24])


def test_gate_up_tp_shards_hold_matching_gate_and_up_halves():
    gate, up = torch.arange(8.0).view(4, 2), 100 + torch.arange(8.0).view(4, 2)
    rule = mapping.Rule("fc1", ("g", "u"), kind="gate_up", tp_dim=0)
    full = mapping.fuse(rule, [gate, up], DIMS)
    shards = [mapping.shard(rule, full, r, 2) for r in range(2)]
    torch.testing.assert_close(shards[1], torch.cat([gate[2:], up[2:]]))
    torch.testing.assert_close(mapping.unshard(rule, shards), full)


def test_row_parallel_and_replicated():
    w = torch.arange(12.0).view(3, 4)
    row = mapping.Rule("proj", ("o",), tp_dim=1)
    torch.testing.assert_close(mapping.shard(row, w, 1, 2), w[:, 2:])
    torch.testing.assert_close(mapping.unshard(row, [mapping.shard(row, w, r, 2) for r in range(2)]), w)
    assert mapping.shard(mapping.Rule("norm", ("n",)), w, 1, 2) is w
    with pytest.raises(ValueError, match="does not split into 3"):
        mapping.shard(row, w, 0, 3)


def test_family_table_round_trips_and_names_every_gap():
    rules = mapping.expand_rules(qwen2_5_vl.rules("local", ["patch_embed.proj.weight"]), num_layers=2)
    generator = torch.Generator().manual_seed(1)
    hf = {}
    for r in rules:
        for name in r.hf:
            rows = 12 if "q_proj" in name else 6 if ("k_proj" in name or "v_proj" in name) else 4
            hf[name] = torch.randn(rows, 5, generator=generator) if "weight" in name else torch.randn(rows)
    megatron = mapping.hf_to_megatron(hf, rules, DIMS)
    assert "language_model.decoder.layers.1.self_attention.linear_qkv.weight" in megatron
    assert "vision.patch_embed.proj.weight" in megatron
    back = mapping.megatron_to_hf(megatron, rules, DIMS)
    assert back.keys() == hf.keys() and all(torch.equal(back[k], hf[k]) for k in hf)
    extra = dict(hf, **{"model.layers.0.self_attn.rotary.inv_freq": torch.zeros(1)})
    with pytest.raises(KeyError, match="names no rule maps: model.layers.N.self_attn.rotary.inv_freq"):
        mapping.hf_to_megatron(extra, rules, DIMS)
    missing = {k: v for k, v in hf.items() if k != "lm_head.weight"}
    with pytest.raises(KeyError, match="1 expected names missing: lm_head.weight"):
        mapping.hf_to_megatron(missing, rules, DIMS)


def test_te_spec_renames_only_the_norms():
    local = {r.megatron for r in qwen2_5_vl.rules("local", [])}
    te = {r.megatron for r in qwen2_5_vl.rules("transformer_engine", [])}
    assert local - te == {
        "language_model.decoder.layers.{i}.input_layernorm.weight",
        "language_model.decoder.layers.{i}.pre_mlp_layernorm.weight",
    }
    assert te - local == {
        "language_model.decoder.layers.{i}.self_attention.linear_qkv.layer_norm_weight",
        "language_model.decoder.layers.{i}.mlp.linear_fc1.layer_norm_weight",
    }


@pytest.mark.parametrize("tp", [1, 2])
def test_load_shard_writes_exactly_the_shard_of_the_fusion_in_place(tp):
    # the actor's weight loading writes each rank's slice straight into the parameter: the same values as
    # shard(fuse(...)) for every rule kind (qkv weight and bias, gate_up, column, row, replicated), bf16 -> fp32
    q, k, v = (t.to(torch.bfloat16) for t in _qkv())
    gate, up = torch.randn(4, 5).to(torch.bfloat16), torch.randn(4, 5).to(torch.bfloat16)
    cases = [
        (mapping.Rule("qkv", ("q", "k", "v"), kind="qkv", tp_dim=0), [q, k, v]),
        (mapping.Rule("qkv_bias", ("q", "k", "v"), kind="qkv", tp_dim=0), [q[:, 0], k[:, 0], v[:, 0]]),
        (mapping.Rule("fc1", ("g", "u"), kind="gate_up", tp_dim=0), [gate, up]),
        (mapping.Rule("column", ("c",), tp_dim=0), [gate]),
        (mapping.Rule("row", ("o",), tp_dim=1), [q[:, :4]]),
        (mapping.Rule("norm", ("n",)), [q[0]]),
    ]
    for rule, hf in cases:
        for rank in range(tp):
            expected = mapping.shard(rule, mapping.fuse(rule, hf, DIMS), rank, tp).float()
            out = torch.full_like(expected, float("nan"))
            mapping.load_shard(rule, hf, DIMS, out, rank, tp)
            assert torch.equal(out, expected), (rule.megatron, rank)
    with pytest.raises(ValueError, match="checkpoint gives shape"):
        mapping.load_shard(cases[2][0], [gate, up], DIMS, torch.empty(7, 5), 0, 1)
    with pytest.raises(ValueError, match="does not split into 3"):
        mapping.load_shard(cases[4][0], [q[:, :4]], DIMS, torch.empty(12, 1), 0, 3)
