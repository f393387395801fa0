"""Run megatron-core (the reference the Megatron-Core converter tests compare against) on CPU with gloo.

megatron-core 0.16.1 builds, runs and saves a GPTModel on CPU once these CUDA assumptions are neutralised;
`cpu_shims()` does exactly that and nothing else:

- rotary embeddings move `inv_freq` to `torch.cuda.current_device()` on the first forward
  -> current_device() answers "cpu";
- attention forks the CUDA RNG tracker around its dropout (CUDA generator state we do not have)
  -> fork() is a no-op context; harmless because every test model has attention dropout 0;
- the dist_checkpointing saver calls torch.cuda.synchronize() before writing
  -> a no-op (there is no device work to wait for on CPU);
- with tied embeddings and PP > 1, the model moves the last stage's copy of the embedding with `.cuda()` before
  the all-reduce that makes it equal to the first stage's -> Tensor.cuda() returns the tensor itself.

`dist_checkpointing.save` starts a saver subprocess that re-imports the main module, so a script using this
must keep its work under `if __name__ == "__main__":` (pytest's entry point already does).
The functions below build tiny LLaMA-family GPTModels the way Megatron-LM's `model_provider` does for
`--use-mcore-models`, save them as Megatron-LM does (`--ckpt-format torch` rank files, `torch_dist` through
`dist_checkpointing.save`), load them back with megatron-core's own loaders, and run megatron-core's forward.
"""
from __future__ import annotations

import argparse
import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch


@contextlib.contextmanager
def cpu_shims():
    from megatron.core.tensor_parallel import random as mcore_random
    saved = (torch.cuda.current_device, torch.cuda.synchronize, mcore_random.CudaRNGStatesTracker.fork,
             torch.Tensor.cuda)

    @contextlib.contextmanager
    def no_fork(self, name=None):
        yield

    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.synchronize = lambda *args, **kwargs: None
    mcore_random.CudaRNGStatesTracker.fork = no_fork
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    try:
        yield
    finally:
        (torch.cuda.current_device, torch.cuda.synchronize, mcore_random.CudaRNGStatesTracker.fork,
         torch.Tensor.cuda) = saved


@dataclass(frozen=True)
class McoreModel:
    """A tiny LLaMA-family model as megatron-core sees it (the HF side is built from the same numbers)."""
    name: str
    hidden: int = 64
    heads: int = 8
    groups: int = 4
    ffn: int = 96
    layers: int = 4
    vocab: int = 100                # real vocabulary (HF rows); Megatron pads to 128 x TP
    rope_theta: float = 500000.0
    rope_scaling: bool = False      # Llama 3.1: megatron-core's fixed llama3 scaling, factor 8
    qkv_bias: bool = False          # Qwen2
    tied: bool = False
    eps: float = 1e-5
    max_positions: int = 128


def padded_vocab(vocab: int, tp: int, divisible_by: int = 128) -> int:
    return -(-vocab // (divisible_by * tp)) * divisible_by * tp


def transformer_config(m: McoreModel, tp: int, pp: int):
    from megatron.core.transformer.transformer_config import TransformerConfig
    return TransformerConfig(
        num_layers=m.layers, hidden_size=m.hidden, ffn_hidden_size=m.ffn, num_attention_heads=m.heads,
        num_query_groups=m.groups, kv_channels=m.hidden // m.heads, normalization="RMSNorm", layernorm_epsilon=m.eps,
        gated_linear_unit=True, activation_func=torch.nn.functional.silu, add_bias_linear=False,
        add_qkv_bias=m.qkv_bias, bias_activation_fusion=False, masked_softmax_fusion=False,
        persist_layer_norm=False, bias_dropout_fusion=False, apply_rope_fusion=False, gradient_accumulation_fusion=False,
        attention_dropout=0.0, hidden_dropout=0.0, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        use_cpu_initialization=True, params_dtype=torch.float32, pipeline_dtype=torch.float32, init_method_std=0.15)


def init_parallel(tp: int, pp: int, rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    from megatron.core import parallel_state
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)


def build_model(m: McoreModel, tp: int, pp: int, seed: int = 0):
    """GPTModel with the local (non-Transformer-Engine) spec; every weight random, norms and biases too."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    config = transformer_config(m, tp, pp)
    model = GPTModel(config, get_gpt_layer_local_spec(normalization="RMSNorm"), vocab_size=padded_vocab(m.vocab, tp),
                     max_sequence_length=m.max_positions, pre_process=parallel_state.is_pipeline_first_stage(),
                     post_process=parallel_state.is_pipeline_last_stage(),
                     share_embeddings_and_output_weights=m.tied, position_embedding_type="rope",
                     rotary_base=m.rope_theta, rope_scaling=m.rope_scaling, rope_scaling_factor=8.0)
    gen = torch.Generator().manual_seed(seed * 1000 + parallel_state.get_tensor_model_parallel_rank() * 10
                                        + parallel_state.get_pipeline_model_parallel_rank())
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "layer_norm" in name or "layernorm" in name:
                param.copy_(0.5 + torch.rand(param.shape, generator=gen))
            else:
                param.copy_(torch.randn(param.shape, generator=gen) * (0.1 if name.endswith("bias") else 0.15))
        _make_replicas_equal(model)
    return model.eval()


def _make_replicas_equal(model) -> None:
    """Norms are replicated over TP ranks (and a tied head's embedding copy lives on the last stage); broadcast
    them as Megatron's initialisation would, so every rank holds the same values."""
    from megatron.core import parallel_state
    tp_group = parallel_state.get_tensor_model_parallel_group()
    tp_src = torch.distributed.get_global_rank(tp_group, 0)
    for name, param in model.named_parameters():
        if not getattr(param, "tensor_model_parallel", False):
            torch.distributed.broadcast(param.data, tp_src, group=tp_group)
    if model.share_embeddings_and_output_weights and parallel_state.get_pipeline_model_parallel_world_size() > 1:
        weight = model.shared_embedding_or_output_weight()
        torch.distributed.all_reduce(weight.data if parallel_state.is_pipeline_first_stage() else weight.data.zero_(),
                                     group=parallel_state.get_embedding_group())


def megatron_args(m: McoreModel, tp: int, pp: int) -> argparse.Namespace:
    """The args Megatron-LM pickles into a checkpoint of such a run (the fields converters read)."""
    return argparse.Namespace(
        num_layers=m.layers, hidden_size=m.hidden, ffn_hidden_size=m.ffn, num_attention_heads=m.heads,
        group_query_attention=m.groups != m.heads, num_query_groups=m.groups, kv_channels=m.hidden // m.heads,
        max_position_embeddings=m.max_positions, seq_length=m.max_positions, norm_epsilon=m.eps,
        normalization="RMSNorm", swiglu=True, add_bias_linear=False, add_qkv_bias=m.qkv_bias,
        position_embedding_type="rope", rotary_base=int(m.rope_theta), use_rope_scaling=m.rope_scaling,
        rope_scaling_factor=8.0, untie_embeddings_and_output_weights=not m.tied,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, padded_vocab_size=padded_vocab(m.vocab, tp),
        vocab_size=m.vocab, make_vocab_size_divisible_by=128, params_dtype=torch.float32, use_mcore_models=True,
        ckpt_format="torch", iteration=10)


def rank_folder(tp_rank: int, pp_rank: int, pp: int) -> str:
    return f"mp_rank_{tp_rank:02d}" if pp == 1 else f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"


def save_torch(model, m: McoreModel, root: Path, tp: int, pp: int, iteration: int = 10) -> None:
    """`--ckpt-format torch` as megatron/training/checkpointing.py writes it: one state_dict per rank."""
    from megatron.core import parallel_state
    t, p = parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_pipeline_model_parallel_rank()
    folder = root / f"iter_{iteration:07d}" / rank_folder(t, p, pp)
    folder.mkdir(parents=True, exist_ok=True)
    state = {"args": megatron_args(m, tp, pp), "checkpoint_version": 3.0, "iteration": iteration,
             "model": model.state_dict_for_save_checkpoint()}
    torch.save(state, folder / "model_optim_rng.pt")
    torch.distributed.barrier()
    if torch.distributed.get_rank() == 0:
        (root / "latest_checkpointed_iteration.txt").write_text(str(iteration))


def save_torch_dist(model, m: McoreModel, root: Path, tp: int, pp: int, iteration: int = 10) -> None:
    """`--ckpt-format torch_dist`: megatron-core's dist_checkpointing.save of the model's sharded state dict, with
    the common (non-tensor) state Megatron-LM adds."""
    from megatron.core import dist_checkpointing
    folder = root / f"iter_{iteration:07d}"
    if torch.distributed.get_rank() == 0:
        folder.mkdir(parents=True, exist_ok=True)
    torch.distributed.barrier()
    args = megatron_args(m, tp, pp)
    args.ckpt_format = "torch_dist"
    state = {"model": model.sharded_state_dict(), "args": args, "checkpoint_version": 3.0, "iteration": iteration}
    dist_checkpointing.save(state, str(folder))
    torch.distributed.barrier()
    if torch.distributed.get_rank() == 0:
        (root / "latest_checkpointed_iteration.txt").write_text(str(iteration))


def load_torch(model, folder: Path, tp: int, pp: int) -> None:
    """What Megatron-LM's load_checkpoint does for `--ckpt-format torch`: load_state_dict(strict=True)."""
    from megatron.core import parallel_state
    t, p = parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_pipeline_model_parallel_rank()
    state = torch.load(folder / rank_folder(t, p, pp) / "model_optim_rng.pt", weights_only=False)
    model.load_state_dict(state["model"], strict=True)


def load_torch_dist(model, folder: Path) -> None:
    """What Megatron-LM's load_checkpoint does for torch_dist (it registers megatron-core's safe globals first,
    so that common.pt's argparse.Namespace loads with weights_only)."""
    from megatron.core import dist_checkpointing
    from megatron.core.safe_globals import register_safe_globals
    register_safe_globals()
    state = dist_checkpointing.load({"model": model.sharded_state_dict()}, str(folder))
    model.load_state_dict(state["model"], strict=True)


def forward_logits(model, tokens: torch.Tensor, m: McoreModel) -> torch.Tensor | None:
    """megatron-core's own forward over the pipeline (stage by stage through gloo); the full-vocabulary logits
    [batch, seq, vocab] on the last stage's TP rank 0, None elsewhere."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region
    seq = tokens.shape[1]
    position_ids = torch.arange(seq).unsqueeze(0).expand_as(tokens)
    mask = torch.ones(1, 1, seq, seq, dtype=torch.bool).triu(1)  # True = masked
    pp_group = parallel_state.get_pipeline_model_parallel_group()
    pp_rank, pp_size = parallel_state.get_pipeline_model_parallel_rank(), parallel_state.get_pipeline_model_parallel_world_size()
    hidden_shape = (seq, tokens.shape[0], m.hidden)
    with torch.no_grad():
        if pp_rank > 0:
            received = torch.empty(hidden_shape)
            torch.distributed.recv(received, torch.distributed.get_global_rank(pp_group, pp_rank - 1))
            model.set_input_tensor(received)
        out = model(tokens, position_ids, mask)
        if pp_rank < pp_size - 1:
            torch.distributed.send(out.contiguous(), torch.distributed.get_global_rank(pp_group, pp_rank + 1))
            return None
    logits = out  # GPTModel returns [batch, seq, vocab/TP] (the lm head is column-parallel, not gathered)
    logits = gather_from_tensor_model_parallel_region(logits)
    if parallel_state.get_tensor_model_parallel_rank() != 0:
        return None
    return logits[..., :m.vocab]
