"""Trlx jobs: rm-bloom/rm-gptj (value-head reward models), ppo-bloom/ppo-gptj, the PPO smoke test."""
