"""A K-quant mix like a real Q4_K_M file (Q4_K, Q5_K, Q6_K, Q5_0, Q4_0, Q8_0 matrices, fused
projections whose parts differ): loaded bit for bit as transformers' GGUF reader dequantizes
it, and run on the blocks as close to the dequantized float32 model as the int8 rounding of
the activations allows."""

from __future__ import annotations

import gguf
import pytest
import torch

from bench.perplexity import logits_of
from rillm.config import EngineConfig
from rillm.engine.llm_engine import LLMEngine
from rillm.kernels import kernel_vectorized
from rillm.loader import load_gguf
from rillm.model.linear import Dense, GGUFBlocksMethod, Linear
from tests.loader.gguf_files import TOKENS, write_tiny_gguf
from tests.loader.test_gguf_loader import _assert_same_weights, _transformers_reference
from tests.loader.tiny_models import hf_state_dict, tiny_config, tiny_model

T = gguf.GGMLQuantizationType
MIX = {  # K-quants need rows of 256 inputs; every fused projection mixes two formats
    "q_proj.weight": T.Q4_K,
    "k_proj.weight": T.Q5_K,
    "v_proj.weight": T.Q6_K,
    "o_proj.weight": T.Q5_0,
    "gate_proj.weight": T.Q4_0,
    "up_proj.weight": T.Q4_K,
    "down_proj.weight": T.Q6_K,
    "lm_head.weight": T.Q8_0,
    "embed_tokens.weight": T.Q4_1,
}


@pytest.fixture(scope="module")
def kquant_file(tmp_path_factory):
    hf_config = tiny_config("llama", len(TOKENS), hidden_size=256, intermediate_size=512,
                            head_dim=64, tie_word_embeddings=False,
                            max_position_embeddings=512)
    model = tiny_model(hf_config)
    with torch.no_grad():  # weights of a trained model's scale: logits of a few units
        for parameter in model.parameters():
            if parameter.dim() == 2:
                parameter.mul_(0.2 / parameter.shape[1] ** 0.5 / 0.5)
    path = tmp_path_factory.mktemp("kquant") / "mix.gguf"
    return write_tiny_gguf(path, "llama", hf_config, hf_state_dict(model), qtypes=MIX)


def test_a_kquant_mix_loads_as_transformers_dequantizes_it(kquant_file):
    loaded = load_gguf(kquant_file)
    _assert_same_weights(loaded.weights, hf_state_dict(_transformers_reference(str(kquant_file))))
    types = {name.rsplit(".", 2)[-2] + ".weight": b.type_name
             for name, b in loaded.quantized.items()}
    assert types == {suffix: t.name for suffix, t in MIX.items()}


@pytest.fixture(scope="module")
def engines(kquant_file):
    def make(**options):
        return LLMEngine(EngineConfig(model=str(kquant_file), num_kv_blocks=64, block_size=16,
                                      max_model_len=512, **options))
    return make(), make(quantization="none")


def test_the_blocks_run_close_to_the_dequantized_model(engines):
    blocks, exact = engines
    matrices = {type(m.method) for m in blocks.runner.model.modules() if isinstance(m, Linear)}
    if kernel_vectorized("gguf_linear"):
        # Every matrix on its blocks; the lm_head's 262 rows are not groups of 16: dense.
        assert matrices == {GGUFBlocksMethod, Dense}
        assert isinstance(blocks.runner.model.lm_head.method, Dense)
        assert blocks.kernels.fused_decode  # fused layers with mixed-format parts
    tokens = torch.randint(3, len(TOKENS), (200,), generator=torch.Generator().manual_seed(0))
    reference = logits_of(exact, tokens.tolist(), 64).float()
    for chunk in (64, 1):  # paged prefill, then a token a step (fused decode layers)
        got = logits_of(blocks, tokens.tolist(), chunk).float()
        error = (got - reference).norm(dim=-1) / reference.norm(dim=-1)
        assert error.max() < 0.03, (chunk, error.max())  # measured 1.3%
        agree = (got.argmax(-1) == reference.argmax(-1)).float().mean()
        assert agree > 0.9, (chunk, agree)
