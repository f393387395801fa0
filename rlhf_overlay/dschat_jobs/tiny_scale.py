"""RECIPE_AT_TINY_SCALE=1 (`--recipe-at-tiny-scale`): a DeepSpeed-Chat GPU recipe's DeepSpeed settings, exactly,
on the embedded tiny LLaMA with 2 CPU ranks.

    make rm-llama2  RECIPE_AT_TINY_SCALE=1 LORA_DIM=128   # step2 .../llama2/run_llama2_7b_lora.sh at tiny scale
    make ppo-llama2 RECIPE_AT_TINY_SCALE=1 CRITIC=<rm run>  # step3 .../llama2/run_llama2_7b_lora.sh (and _mixz.sh)
    make dpo-llama2 RECIPE_AT_TINY_SCALE=1                # step2_dpo .../llama2/run_llama2_7b.sh

Kept as the 7B recipe has them (each job module's LLAMA2_7B, copied from upstream's llama2 scripts): ZeRO stage
(3), ZeRO offload (`--offload`: rm, dpo) and `--offload_reference_model` (ppo), gradient checkpointing, LoRA rank
and module names, weight decay, learning rates, scheduler and warm-up, epochs, generation batches and PPO epochs.
Scaled down (SCALED below): the data (the tiny synthetic data instead of Dahoas/rm-static), sequence lengths, the
number of steps and evaluation batches; the per-device batch sizes stay (8 pairs / 1 prompt fit the tiny model).
The reward model's and DPO's learning rate is the tiny recipe's (5e-4, 60 steps): at the 7B rate (9.65e-6) the tiny
model does not move (measured: RM eval accuracy 0.45 after 20 steps; at 5e-4 and 60 steps 1.00, as at ZeRO-0/2).
Left out, each with a printed note, because no CPU can run them: the hybrid engine (CUDA inference kernels; see
rlhf_overlay/engine/upstream_tests_plugin.py), fp16 (fp32 instead), and mixed-precision LoRA (run_llama2_7b_mixz.sh:
ZeRO++ quantizes the frozen fp16 weights with DeepSpeed's CUDA QuantizerBuilder; it also skips tensors under
500k elements, i.e. every tensor of the tiny model, so even a GPU would not exercise it at this scale).
Any value the user sets (ZERO_STAGE, LORA_DIM, NUM_GPUS, DATA, ...) still wins over both.
"""
from __future__ import annotations

from rlhf_overlay.errors import ConfigError

NAME = "llama2-7b@tiny-scale"
RANKS = 2
# kind -> the recipe values replaced at tiny scale (the tiny data's longest pair is 30 tokens, its prompts 13)
SCALED = {
    "rm-llama2": dict(data="", data_split="0,1,0", max_seq_len=48, max_steps=60, eval_iters=10, learning_rate=5e-4),
    "dpo-llama2": dict(data="", data_split="0,1,0", max_seq_len=48, max_steps=60, eval_iters=10, learning_rate=5e-4),
    "ppo-llama2": dict(data="", data_split="0,0,1", max_prompt_len=16, max_answer_len=16, max_steps=4),
}


def start(kind: str, cfg, recipe: dict) -> tuple[str, dict]:
    """(recipe name, settings) to begin resolve() with: the 7B recipe with SCALED applied."""
    if cfg.recipe not in ("", "llama2-7b"):
        raise ConfigError(f"recipe={cfg.recipe!r} with recipe_at_tiny_scale: the tiny-scale run is the llama2-7b "
                          f"recipe's settings; drop RECIPE/--recipe or RECIPE_AT_TINY_SCALE")
    return NAME, dict(recipe, **SCALED[kind])


def finish(kind: str, r: dict, cfg, cuda: bool, recipe: dict) -> dict:
    """After cpu_adjust(): give back what it takes from a GPU recipe on CPU (ZeRO stage, offload, offload of the
    reference model, ranks) unless the user set it, and say what still differs from the GPU run."""
    if cfg.zero_stage is None:
        r["zero_stage"] = recipe["zero_stage"]
    for key in ("offload", "offload_reference_model"):
        if key in recipe:
            r[key] = bool(recipe[key]) and r["zero_stage"] > 0   # DeepSpeed offloads only under ZeRO 1-3
    if cfg.num_gpus is None and not cfg.hostfile and not cuda:
        r["num_gpus"] = RANKS
    scaled = ", ".join(f"{k} {recipe[k]} -> {r[k] if r[k] != '' else 'the tiny data'}" for k in SCALED[kind]
                       if recipe[k] != r[k])
    notes = [f"the llama2-7b recipe at tiny scale: its DeepSpeed settings as on GPUs; scaled: {scaled}"]
    if recipe.get("hybrid_engine"):
        notes.append("hybrid engine off: DeepSpeed's hybrid engine needs CUDA inference kernels")
    if not cuda and not cfg.dtype:
        notes.append("dtype fp16 -> fp32: fp16 training needs a GPU")
    if not cuda:   # launch() prints these as `note (CPU):` lines
        r["cpu_notes"] = notes
    return r
