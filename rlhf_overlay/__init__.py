"""rlhf-overlay: pinned DeepSpeed-Chat and trlx, our overlays, tiny embedded assets and the glue between them.

Flow: upstream.lock -> rlhf_overlay.engine.setup_engine (clone, verify, apply overlays) -> overlays/<upstream>/...
-> training_scripts/*.sh -> make targets.
"""
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
