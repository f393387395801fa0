"""Tools on finished runs: chat, eval-rm, report, the whole Megatron->RM->PPO->Megatron pipeline, seed forwarders."""
