"""Fused Q/K/V and gate/up projections compute what the checkpoint's separate matrices do."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rillm.model.builder import build_model
from rillm.model.checkpoint import PACKED_MODULES


def test_fused_projections_equal_the_separate_matrices(default_loaded):
    config, weights = default_loaded.config, default_loaded.weights
    model = build_model(config, weights, torch.float32, torch.device("cpu"))
    assert set(PACKED_MODULES) == {"qkv_proj", "gate_up_proj"}
    x = torch.randn(7, config.hidden_size, generator=torch.Generator().manual_seed(0))
    layer = model.model.layers[5]
    prefix = "model.layers.5"
    q, k, v = layer.self_attn.qkv_proj(x).split(layer.self_attn.sizes, dim=-1)
    for got, name in ((q, "q_proj"), (k, "k_proj"), (v, "v_proj")):
        expected = F.linear(x, weights[f"{prefix}.self_attn.{name}.weight"])
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    gate, up = layer.mlp.gate_up_proj(x).chunk(2, dim=-1)
    torch.testing.assert_close(gate, F.linear(x, weights[f"{prefix}.mlp.gate_proj.weight"]),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(up, F.linear(x, weights[f"{prefix}.mlp.up_proj.weight"]),
                               rtol=1e-5, atol=1e-5)
