"""Chat with a trained actor (our PPO, DPO or SFT output in HF format) in the terminal.

    python -m rlhf_overlay.tools.chat --model runs/ppo-llama2-.../actor                 # interactive
    python -m rlhf_overlay.tools.chat --model runs/ppo-llama2-.../actor --prompt "Hi"   # answer once and exit
    make chat MODEL=runs/ppo-llama2-.../actor [PROMPT="Hi"]

The conversation uses DeepSpeed-Chat's format ("Human: ... Assistant: ..."), the one our RM/PPO data use.
Interactive commands: `clear` forgets the history, `quit`/`exit` or Ctrl-D leaves.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from rlhf_overlay.errors import UserError, interrupted


class ChatError(UserError, RuntimeError):
    """A model folder or setting that cannot be used, with what to do about it."""


@dataclass
class ChatConfig:
    model: str                    # HF model folder (config.json + weights + tokenizer) or hub id
    prompt: str | None = None     # answer this once and exit (non-interactive)
    max_new_tokens: int = 64      # length of each answer
    temperature: float = 0.0      # 0 = greedy (deterministic); > 0 samples
    top_p: float = 0.9            # nucleus sampling when temperature > 0
    seed: int = 0                 # sampling seed
    device: str = "auto"          # auto | cpu | cuda[:N]

    def validate(self) -> None:
        if self.max_new_tokens < 1:
            raise ChatError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ChatError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ChatError(f"top_p must be in (0, 1], got {self.top_p}")
        from rlhf_overlay.runtime import preflight
        r = preflight.check_model(self.model, "MODEL", accept=(preflight.CAUSAL_LM,), consumer="make chat",
                                  training=False)
        preflight.say(r)
        if r.local is not None:
            self.model = str(r.local)   # a run folder -> its policy/ or actor/


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m rlhf_overlay.tools.chat", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    d = ChatConfig(model="")
    p.add_argument("--model", required=True, help="HF model folder (config.json + weights + tokenizer) or hub id")
    p.add_argument("--prompt", default=None, help="answer this once and exit")
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens, help="length of each answer")
    p.add_argument("--temperature", type=float, default=d.temperature, help="0 = greedy; > 0 samples")
    p.add_argument("--top-p", type=float, default=d.top_p, help="nucleus sampling when temperature > 0")
    p.add_argument("--seed", type=int, default=d.seed, help="sampling seed")
    p.add_argument("--device", default=d.device, help="auto | cpu | cuda[:N]")
    return p


class Chatbot:
    def __init__(self, cfg: ChatConfig):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.cfg = cfg
        self.torch = torch
        device = cfg.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(cfg.model)
        self.model = AutoModelForCausalLM.from_pretrained(cfg.model).to(self.device).eval()
        self.history = ""

    def answer(self, user_text: str) -> str:
        torch = self.torch
        prompt = f"{self.history}Human: {user_text.strip()} Assistant:"
        enc = self.tokenizer(prompt, return_tensors="pt").to(self.device)
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        torch.manual_seed(self.cfg.seed)
        with torch.no_grad():
            out = self.model.generate(
                **enc, max_new_tokens=self.cfg.max_new_tokens, pad_token_id=pad_id,
                do_sample=self.cfg.temperature > 0,
                **({"temperature": self.cfg.temperature, "top_p": self.cfg.top_p} if self.cfg.temperature > 0 else {}))
        reply = self.tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        reply = reply.split("Human:")[0].strip()  # the model may start the next turn itself
        self.history = f"{prompt} {reply} "
        return reply


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    cfg = ChatConfig(model=args.model, prompt=args.prompt, max_new_tokens=args.max_new_tokens,
                     temperature=args.temperature, top_p=args.top_p, seed=args.seed, device=args.device)
    try:
        cfg.validate()   # MODEL: a causal LM folder (a run folder's policy/ or actor/) or hub id; weights complete
        bot = Chatbot(cfg)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as exc:   # what transformers says about a folder it cannot load
        print(f"error: MODEL={cfg.model} cannot be loaded: {str(exc).splitlines()[0]} — pass the folder of a "
              f"trained policy/actor (config.json, weights and tokenizer files)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return interrupted()
    try:
        return _talk(bot, cfg)
    except KeyboardInterrupt:
        return interrupted()


def _talk(bot: Chatbot, cfg: ChatConfig) -> int:
    if cfg.prompt is not None:
        print(bot.answer(cfg.prompt))
        return 0
    print(f"Chatting with {cfg.model} (clear = new conversation, quit = leave)")
    while True:
        try:
            text = input("Human: ")
        except EOFError:
            print()
            return 0
        if text.strip().lower() in ("quit", "exit"):
            return 0
        if text.strip().lower() == "clear":
            bot.history = ""
            continue
        if text.strip():
            print(f"Assistant: {bot.answer(text)}")


if __name__ == "__main__":
    sys.exit(main())
