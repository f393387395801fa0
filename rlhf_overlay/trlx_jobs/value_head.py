"""Value-head reward models: a causal-LM trunk plus one linear head that gives each text a scalar score.

The library behind `make rm-bloom` / `make rm-gptj` (trained by rlhf_overlay.trlx_jobs.reward_model), used by trlx PPO
(the reward), `make eval-rm`, and the seed's reward_model_bloom.py overlay. It never imports trlx.

    from rlhf_overlay.trlx_jobs.value_head import RewardScorer, load_reward_model
    model, tokenizer, meta = load_reward_model("runs/rm-bloom-<time>/reward_model")
    scores = RewardScorer(model, tokenizer, max_length=meta["max_length"]).score(prompts, responses)

A saved reward model is a folder: the trunk in HF format + its tokenizer, value_head.safetensors (the head's
weight) and reward_model.json (format, base model, max_length, separator, eval accuracy). The score is read at the
last non-pad token; every text ends with the eos token (appended when missing), so the score is read on it.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

from rlhf_overlay.errors import ConfigError
from rlhf_overlay.trlx_jobs.common import write_json

RM_FORMAT = "rlhf-overlay/value-head-reward-model/1"
VALUE_HEAD_FILE = "value_head.safetensors"
META_FILE = "reward_model.json"


def join_prompt_response(prompt: str, response: str, separator: str = "\n") -> str:
    """The one text layout used to train and to score (PPO scores `prompt + separator + generated`)."""
    if not prompt:
        return response
    if prompt.endswith(separator) or response.startswith(separator):
        return prompt + response
    return prompt + separator + response


def prepare_tokenizer(tokenizer):
    """pad falls back to eos (GPT-J/LLaMA tokenizers have none); right padding, left truncation."""
    if tokenizer.eos_token is None:
        raise ConfigError(f"tokenizer of {tokenizer.name_or_path} has no eos token; the score is read on the eos "
                          f"appended to each text, so give the tokenizer an eos_token")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    tokenizer.truncation_side = "left"
    return tokenizer


def encode_texts(tokenizer, texts: Sequence[str], max_length: int) -> list[list[int]]:
    """Token ids ending with eos, at most max_length long (the start of a too-long text is cut)."""
    eos = tokenizer.eos_token_id
    out = []
    for ids in tokenizer(list(texts), add_special_tokens=True)["input_ids"]:
        if not ids or ids[-1] != eos:
            ids = ids + [eos]
        if len(ids) > max_length:
            ids = ids[-max_length:]
        out.append(ids)
    return out


def pad_batch(seqs: Sequence[Sequence[int]], pad_id: int):
    import torch

    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


def decoder_layers(trunk):
    """The list of decoder blocks of an AutoModel trunk (GPT-2/BLOOM/GPT-J `h`, LLaMA `layers`, ...), or None."""
    for attr in ("h", "layers", "blocks"):
        layers = getattr(trunk, attr, None)
        if layers is not None and hasattr(layers, "__len__"):
            return layers
    dec = getattr(trunk, "decoder", None)
    if dec is not None and hasattr(dec, "layers"):
        return dec.layers
    return None


def build_reward_model_class():
    import torch
    from torch import nn

    class ValueHeadRewardModel(nn.Module):
        """A causal-LM trunk (AutoModel) + a bias-free linear value head; score = value at the last non-pad token."""

        def __init__(self, trunk, pad_token_id: int):
            super().__init__()
            self.trunk = trunk
            self.config = trunk.config
            hidden = getattr(trunk.config, "hidden_size", None) or getattr(trunk.config, "n_embd")
            self.v_head = nn.Linear(hidden, 1, bias=False)
            self.pad_token_id = pad_token_id

        def score(self, input_ids, attention_mask):
            out = self.trunk(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
            hidden = out[0]
            values = self.v_head(hidden.to(self.v_head.weight.dtype)).squeeze(-1)
            positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
            last = (positions * attention_mask).argmax(-1)  # last non-pad token, left or right padding
            return values[torch.arange(values.shape[0], device=values.device), last].float()

        def forward(self, chosen_input_ids, chosen_attention_mask, rejected_input_ids, rejected_attention_mask,
                    **_unused):
            n = chosen_input_ids.shape[0]
            width = max(chosen_input_ids.shape[1], rejected_input_ids.shape[1])

            def widen(t, value):
                return torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value)

            ids = torch.cat([widen(chosen_input_ids, self.pad_token_id), widen(rejected_input_ids, self.pad_token_id)])
            mask = torch.cat([widen(chosen_attention_mask, 0), widen(rejected_attention_mask, 0)])
            scores = self.score(ids, mask)
            chosen, rejected = scores[:n], scores[n:]
            loss = -torch.nn.functional.logsigmoid(chosen - rejected).mean()
            return {"loss": loss, "chosen_scores": chosen, "rejected_scores": rejected}

    return ValueHeadRewardModel


def new_reward_model(model_path: str, torch_dtype=None, seed: int = 0):
    """Trunk from `model_path` (AutoModel: lm head dropped) + a fresh value head (seeded), and its tokenizer."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(model_path))
    trunk = AutoModel.from_pretrained(model_path, torch_dtype=torch_dtype)
    cls = build_reward_model_class()
    torch.manual_seed(seed)
    model = cls(trunk, tokenizer.pad_token_id)
    if torch_dtype is not None:
        model.v_head.to(torch_dtype)
    return model, tokenizer


def save_reward_model(model, tokenizer, out_dir: Path, meta: dict) -> None:
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.trunk.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    save_file({"weight": model.v_head.weight.detach().float().cpu().contiguous()}, str(out_dir / VALUE_HEAD_FILE))
    write_json(out_dir / META_FILE, {"format": RM_FORMAT, "value_head": VALUE_HEAD_FILE, **meta})


def is_reward_model_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / META_FILE).is_file() and (Path(path) / VALUE_HEAD_FILE).is_file()


def load_reward_model(path: str | os.PathLike, device="cpu", torch_dtype=None):
    """(model, tokenizer, meta) of a reward model saved by this module; model in eval mode on `device`."""
    from safetensors.torch import load_file
    from transformers import AutoModel, AutoTokenizer

    path = Path(path)
    if not is_reward_model_dir(path):
        raise ConfigError(f"RM={path} is not a reward model folder saved by rlhf_overlay.trlx_jobs.reward_model (it "
                          f"needs {META_FILE} and {VALUE_HEAD_FILE}); train one with `make rm-bloom` / `make rm-gptj` "
                          f"and pass its reward_model/ folder")
    meta = json.loads((path / META_FILE).read_text())
    if meta.get("format") != RM_FORMAT:
        raise ConfigError(f"RM={path}: unknown reward model format {meta.get('format')!r} (expected {RM_FORMAT})")
    tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(path))
    trunk = AutoModel.from_pretrained(path, torch_dtype=torch_dtype)
    model = build_reward_model_class()(trunk, tokenizer.pad_token_id)
    model.v_head.weight.data.copy_(load_file(str(path / VALUE_HEAD_FILE))["weight"].to(model.v_head.weight.dtype))
    model.to(device).eval()
    return model, tokenizer, meta


class RewardScorer:
    """Scores texts with a value-head reward model, in batches, without gradients."""

    def __init__(self, model, tokenizer, max_length: int, separator: str = "\n", batch_size: int = 16):
        self.model, self.tokenizer = model, tokenizer
        self.max_length, self.separator, self.batch_size = max_length, separator, batch_size

    @property
    def device(self):
        return self.model.v_head.weight.device

    def score_texts(self, texts: Sequence[str]) -> list[float]:
        import torch

        out: list[float] = []
        for i in range(0, len(texts), self.batch_size):
            seqs = encode_texts(self.tokenizer, texts[i: i + self.batch_size], self.max_length)
            ids, mask = pad_batch(seqs, self.tokenizer.pad_token_id)
            with torch.no_grad():
                out += self.model.score(ids.to(self.device), mask.to(self.device)).tolist()
        return out

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        return self.score_texts([join_prompt_response(p, r, self.separator) for p, r in zip(prompts, responses)])
