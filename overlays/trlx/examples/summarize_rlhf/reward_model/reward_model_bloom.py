# rlhf-overlay: adds the seed's examples/summarize_rlhf/reward_model/reward_model_bloom.py (BLOOMRewardModel). The
# seed's class loaded the bloom-1b1 tokenizer from the hub and found the score by searching for the pad id (= eos,
# so it read the token before eos). The model now lives in rlhf_overlay.trlx_jobs.value_head, for any causal-LM trunk:
# the score is read at the last non-pad token (the eos appended to every text).
"""Value-head reward model for BLOOM (and any causal LM), the seed's reward_model_bloom.py.

    from reward_model_bloom import BLOOMRewardModel, load_reward_model, RewardScorer
    model, tokenizer = BLOOMRewardModel("./sft/bloom7b1_sft")        # trunk + fresh value head (untrained)
    model, tokenizer, meta = load_reward_model("<rm run>/reward_model")  # a trained one (make rm-bloom)
    scores = RewardScorer(model, tokenizer, max_length=meta["max_length"]).score(prompts, responses)
"""
import sys
from pathlib import Path

try:
    import rlhf_overlay  # noqa: F401
except ImportError:  # imported from upstream/trlx/examples/summarize_rlhf/reward_model inside the checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[5]))

from rlhf_overlay.trlx_jobs.value_head import (  # noqa: E402,F401
    RewardScorer,
    join_prompt_response,
    load_reward_model,
    new_reward_model,
    save_reward_model,
)


def BLOOMRewardModel(model_path, torch_dtype=None, seed=0):
    """(model, tokenizer): the trunk of `model_path` (tokenizer from the same folder) with a fresh value head."""
    return new_reward_model(str(model_path), torch_dtype=torch_dtype, seed=seed)
