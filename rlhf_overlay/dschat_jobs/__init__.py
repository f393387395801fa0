"""DeepSpeed-Chat jobs: rm-llama2, ppo-llama2, dpo-llama2 (settings, launch)."""
