"""build_model: a checkpoint's tensors in, the module tree for its architecture out."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from rillm.arch_config import ModelArchConfig
from rillm.attention import PagedAttention
from rillm.kernels.plan import TORCH_ONLY, KernelPlan, LinearKernel
from rillm.loader.gguf_blocks import GGUFBlocks
from rillm.model.checkpoint import Checkpoint
from rillm.model.gemma3 import Gemma3ForCausalLM
from rillm.model.llama import LlamaForCausalLM
from rillm.model.parallel import WHOLE, Shard

CausalLM = LlamaForCausalLM | Gemma3ForCausalLM


def build_model(
    config: ModelArchConfig,
    weights: Mapping[str, torch.Tensor],
    dtype: torch.dtype,
    device: torch.device,
    plan: KernelPlan | None = None,
    attention: PagedAttention | None = None,
    quantized: Mapping[str, GGUFBlocks] | None = None,
    shard: Shard = WHOLE,
) -> CausalLM:
    """The model, every module built from its tensors. `dtype`: the activations' and the dense
    weights'. `plan`: the kernels to run (PyTorch only by default); with `plan.linear` other
    than dense, every projection whose matrices are all in `quantized` (a GGUF file's blocks
    by Hugging Face name) keeps them. `weights` holds every tensor in any case (float, CPU).
    `attention`: the backends the runner builds metadata with (by default the plan's, for
    blocks of 16). `shard`: the tensor-parallel rank to build (its heads and MLP slice)."""
    plan = plan or TORCH_ONLY
    attention = attention or PagedAttention.for_plan(plan, 16, dtype, device,
                                                     config.sliding_window)
    kernel = plan.linear if quantized else LinearKernel.DENSE
    if shard.parallel and config.architecture == "gemma3":
        raise ValueError("tensor parallelism runs the Llama family (Llama, Mistral, Qwen2, "
                         "Qwen3, SmolLM2); not gemma3 yet")
    checkpoint = Checkpoint(config.architecture, weights, dtype, device, kernel, quantized,
                            shard)
    if config.tie_word_embeddings:  # the embedding serves; a saved copy goes unused
        checkpoint.skip("lm_head.weight")
    model_class = Gemma3ForCausalLM if config.architecture == "gemma3" else LlamaForCausalLM
    model: CausalLM = model_class(config, checkpoint, plan, attention)
    checkpoint.finish()
    return model.eval()
