"""How one HF tensor (or a few) is laid out over Megatron's tensor-parallel (TP) ranks.

A model family (llama2.py, bloom.py) is an explicit table of `Param`s: which Megatron tensor(s) hold which HF
tensor(s), and the `Layout` that splits/merges them. Drivers (megatron_to_hf.py, hf_to_megatron.py) only ever
call the three methods of a layout, so every reshape in the project is in this file and in the table rows.

    rank_shapes(hf_shapes, dims, tp) -> shapes of the Megatron tensors on one TP rank (all ranks are equal)
    merge(per_rank, dims)            -> HF tensors from [rank0 tensors, rank1 tensors, ...]
    split(hf, dims, tp)              -> [rank0 tensors, rank1 tensors, ...] from the HF tensors
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

Shape = tuple[int, ...]


@dataclass
class ModelDims:
    """Architecture numbers shared by both directions; every field is checked against the tensor shapes."""
    hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_query_groups: int           # == num_attention_heads for MHA and BLOOM; 8 for LLaMA2-70B
    head_dim: int
    ffn_hidden_size: int
    hf_vocab_size: int              # rows of the HF embedding / lm_head
    megatron_vocab_size: int        # rows over all TP ranks in Megatron (padded)
    new_token_rows: int = 0         # HF -> Megatron only: EXTRA_VOCAB_SIZE rows appended after the HF rows
    norm_epsilon: float = 1e-5
    rope_theta: float = 10000.0
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    qkv_bias: bool = False          # Qwen2: bias on q, k, v (not on o_proj or the MLP)
    rope_scaling: dict | None = None  # HF's rope_scaling (Llama 3.1: rope_type llama3), None = plain RoPE
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None

    def special_tokens(self) -> dict:
        return {"bos_token_id": self.bos_token_id, "eos_token_id": self.eos_token_id,
                "pad_token_id": self.pad_token_id}

    def megatron_architecture_args(self) -> dict:
        """The Megatron args both families share (each family adds its own, the driver adds parallelism)."""
        return {"num_layers": self.num_layers, "hidden_size": self.hidden_size,
                "ffn_hidden_size": self.ffn_hidden_size, "num_attention_heads": self.num_attention_heads,
                "kv_channels": self.head_dim,
                "group_query_attention": self.num_query_groups != self.num_attention_heads,
                "num_query_groups": self.num_query_groups, "max_position_embeddings": self.max_position_embeddings,
                "seq_length": self.max_position_embeddings, "add_position_embedding": False,
                "norm_epsilon": self.norm_epsilon, "layernorm_epsilon": self.norm_epsilon,
                "untie_embeddings_and_output_weights": not self.tie_word_embeddings, **self.special_tokens()}

    def tensor_parallel_problems(self, tp: int) -> list[str]:
        """Why these dims cannot be split over `tp` ranks (empty when they can)."""
        problems = []
        for what, value in [("attention heads", self.num_attention_heads),
                            ("query groups (KV heads)", self.num_query_groups),
                            ("FFN hidden size", self.ffn_hidden_size),
                            ("padded vocabulary", self.megatron_vocab_size)]:
            if value % tp:
                problems.append(f"TP={tp} does not divide the {value} {what}")
        return problems


class LayoutError(ValueError):
    """A shape that does not fit a layout; the caller adds the tensor name and file."""


def _divide(value: int, parts: int, what: str) -> int:
    if value % parts:
        raise LayoutError(f"{what} {value} is not divisible by TP={parts}")
    return value // parts


class Replicated:
    """Every rank holds the whole tensor: norms, BLOOM's row-parallel biases."""

    def rank_shapes(self, hf_shapes: Sequence[Shape], dims: ModelDims, tp: int) -> list[Shape]:
        return list(hf_shapes)

    def merge(self, per_rank: Sequence[Sequence[torch.Tensor]], dims: ModelDims) -> list[torch.Tensor]:
        return list(per_rank[0])

    def split(self, hf: Sequence[torch.Tensor], dims: ModelDims, tp: int) -> list[list[torch.Tensor]]:
        return [list(hf) for _ in range(tp)]


class Split:
    """Each rank holds a contiguous slice along `dim`: dim 0 = column-parallel (output features),
    dim 1 = row-parallel (input features). Several tensors in one Param are split independently."""

    def __init__(self, dim: int):
        self.dim = dim

    def rank_shapes(self, hf_shapes: Sequence[Shape], dims: ModelDims, tp: int) -> list[Shape]:
        shapes = []
        for shape in hf_shapes:
            shape = list(shape)
            shape[self.dim] = _divide(shape[self.dim], tp, f"dimension {self.dim} of size")
            shapes.append(tuple(shape))
        return shapes

    def merge(self, per_rank: Sequence[Sequence[torch.Tensor]], dims: ModelDims) -> list[torch.Tensor]:
        return [torch.cat([rank[i] for rank in per_rank], dim=self.dim) for i in range(len(per_rank[0]))]

    def split(self, hf: Sequence[torch.Tensor], dims: ModelDims, tp: int) -> list[list[torch.Tensor]]:
        chunks = [t.chunk(tp, dim=self.dim) for t in hf]
        return [[c[r] for c in chunks] for r in range(tp)]


class VocabParallel:
    """Embedding / output layer: rows split over ranks after padding to `megatron_vocab_size`.

    Megatron -> HF drops the padding rows (everything after `hf_vocab_size`). HF -> Megatron appends
    `new_token_rows` rows for EXTRA_VOCAB_SIZE, initialised to the mean row so a new token starts as an
    "average" token rather than as noise, then zero rows up to the padded size (never indexed by a real token).
    """

    def rank_shapes(self, hf_shapes: Sequence[Shape], dims: ModelDims, tp: int) -> list[Shape]:
        (_, hidden), = hf_shapes
        return [(_divide(dims.megatron_vocab_size, tp, "padded vocabulary size"), hidden)]

    def merge(self, per_rank: Sequence[Sequence[torch.Tensor]], dims: ModelDims) -> list[torch.Tensor]:
        # Only the ranks that hold real rows are concatenated: the padding is never copied.
        rows_per_rank = per_rank[0][0].shape[0]
        needed = -(-dims.hf_vocab_size // rows_per_rank)
        full = torch.cat([rank[0] for rank in per_rank[:needed]], dim=0)
        return [full[:dims.hf_vocab_size]]

    def split(self, hf: Sequence[torch.Tensor], dims: ModelDims, tp: int) -> list[list[torch.Tensor]]:
        (weight,) = hf
        parts = [weight]
        if dims.new_token_rows:
            mean_row = weight.float().mean(dim=0, keepdim=True).to(weight.dtype)
            parts.append(mean_row.expand(dims.new_token_rows, -1))
        padding = dims.megatron_vocab_size - weight.shape[0] - dims.new_token_rows
        parts.append(weight.new_zeros(padding, weight.shape[1]))
        return [[chunk] for chunk in torch.cat(parts, dim=0).chunk(tp, dim=0)]


class GroupedQKV:
    """LLaMA's fused `query_key_value` (Megatron GQA layout, also right for MHA where groups == heads).

    Rows are grouped per query group: the group's heads/groups query heads, then its key head, then its
    value head, each `head_dim` rows. TP rank r holds groups [r*G/TP, (r+1)*G/TP). HF keeps q, k, v apart.
    The same layout holds for the weights ([rows, hidden]) and for Qwen2's q/k/v biases ([rows]).
    """

    def _group_rows(self, dims: ModelDims) -> tuple[int, int]:
        heads_per_group = dims.num_attention_heads // dims.num_query_groups
        return heads_per_group, heads_per_group + 2

    def rank_shapes(self, hf_shapes: Sequence[Shape], dims: ModelDims, tp: int) -> list[Shape]:
        groups = _divide(dims.num_query_groups, tp, "number of query groups")
        return [(groups * self._group_rows(dims)[1] * dims.head_dim, *hf_shapes[0][1:])]

    def merge(self, per_rank: Sequence[Sequence[torch.Tensor]], dims: ModelDims) -> list[torch.Tensor]:
        heads_per_group, rows_per_group = self._group_rows(dims)
        trailing = per_rank[0][0].shape[1:]
        grouped = torch.cat([rank[0].reshape(-1, rows_per_group, dims.head_dim, *trailing)
                             for rank in per_rank], dim=0)
        q, k, v = grouped.split([heads_per_group, 1, 1], dim=1)
        return [t.reshape(-1, *trailing) for t in (q, k, v)]

    def split(self, hf: Sequence[torch.Tensor], dims: ModelDims, tp: int) -> list[list[torch.Tensor]]:
        heads_per_group, _ = self._group_rows(dims)
        q, k, v = hf
        trailing = q.shape[1:]
        grouped = torch.cat([q.reshape(dims.num_query_groups, heads_per_group, dims.head_dim, *trailing),
                             k.reshape(dims.num_query_groups, 1, dims.head_dim, *trailing),
                             v.reshape(dims.num_query_groups, 1, dims.head_dim, *trailing)], dim=1)
        return [[chunk.reshape(-1, *trailing)] for chunk in grouped.chunk(tp, dim=0)]


class GroupedQueryAndKeyValue(GroupedQKV):
    """Read-only alias: Pai-Megatron-Patch's llama2-70b keeps `query` ([heads_r*head_dim, h]) and `key_value`
    (per group: key head then value head) as two tensors. Merged to the same HF q, k, v."""

    def rank_shapes(self, hf_shapes: Sequence[Shape], dims: ModelDims, tp: int) -> list[Shape]:
        heads = _divide(dims.num_attention_heads, tp, "number of attention heads")
        groups = _divide(dims.num_query_groups, tp, "number of query groups")
        return [(heads * dims.head_dim, dims.hidden_size), (2 * groups * dims.head_dim, dims.hidden_size)]

    def merge(self, per_rank: Sequence[Sequence[torch.Tensor]], dims: ModelDims) -> list[torch.Tensor]:
        q = torch.cat([rank[0] for rank in per_rank], dim=0)
        kv = torch.cat([rank[1].reshape(-1, 2, dims.head_dim, dims.hidden_size) for rank in per_rank], dim=0)
        k, v = kv.unbind(dim=1)
        return [q, k.reshape(-1, dims.hidden_size), v.reshape(-1, dims.hidden_size)]

    def split(self, hf, dims, tp):
        raise NotImplementedError("the separate query/key_value layout is read, never written")


class SwiGLUGateUp:
    """LLaMA's fused `dense_h_to_4h`: each rank holds [its gate slice; its up slice], so the halves must be
    separated per rank before concatenating across ranks (concatenating first would interleave them)."""

    def rank_shapes(self, hf_shapes: Sequence[Shape], dims: ModelDims, tp: int) -> list[Shape]:
        return [(2 * _divide(dims.ffn_hidden_size, tp, "FFN hidden size"), dims.hidden_size)]

    def merge(self, per_rank: Sequence[Sequence[torch.Tensor]], dims: ModelDims) -> list[torch.Tensor]:
        halves = [rank[0].chunk(2, dim=0) for rank in per_rank]
        return [torch.cat([h[0] for h in halves], dim=0), torch.cat([h[1] for h in halves], dim=0)]

    def split(self, hf: Sequence[torch.Tensor], dims: ModelDims, tp: int) -> list[list[torch.Tensor]]:
        gate, up = (t.chunk(tp, dim=0) for t in hf)
        return [[torch.cat([g, u], dim=0)] for g, u in zip(gate, up)]


REPLICATED = Replicated()
COLUMN = Split(dim=0)
ROW = Split(dim=1)
VOCAB = VocabParallel()


@dataclass(frozen=True)
class Param:
    """Megatron tensor name(s) <-> HF tensor name(s) and the layout between them.

    Layer params use names local to one layer (`self_attention.dense.weight`, `self_attn.o_proj.weight`);
    the drivers add `language_model.encoder.layers.{i}.` / the family's HF layer prefix.
    """
    megatron: tuple[str, ...]
    hf: tuple[str, ...]
    layout: object
