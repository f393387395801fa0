"""Chat with a trained actor (our PPO, DPO or SFT output in HF format) in the terminal.

    python -m rlhf_overlay.tools.chat --model runs/ppo-llama2-.../actor                 # interactive
    python -m rlhf_overlay.tools.chat --model runs/ppo-llama2-.../actor --prompt "Hi"   # answer once and exit
    make chat MODEL=runs/ppo-llama2-.../actor [PROMPT="Hi"]

The conversation uses DeepSpeed-Chat's format ("Human: ... Assistant: ..."), the one our RM/PPO data use.
Interactive commands: `clear` forgets the history, `quit`/`exit` or Ctrl-D leaves.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field

from rlhf_overlay import settings
from rlhf_overlay.errors import UserError, main_guard


class ChatError(UserError, RuntimeError):
    """A model folder or setting that cannot be used, with what to do about it."""


@dataclass
class ChatConfig:
    model: str = field(metadata={"help": "HF model folder (config.json + weights + tokenizer), a run folder with "
                                         "policy/ or actor/, or a hub id (MODEL)"})
    prompt: str | None = field(default=None, metadata={"help": "answer this once and exit (PROMPT; default: "
                                                               "interactive)"})
    max_new_tokens: int = field(default=64, metadata={"help": "length of each answer"})
    temperature: float = field(default=0.0, metadata={"help": "0 = greedy (deterministic); > 0 samples"})
    top_p: float = field(default=0.9, metadata={"help": "nucleus sampling when temperature > 0"})
    seed: int = field(default=0, metadata={"help": "sampling seed"})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda[:N]"})

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


def build_parser() -> settings.SettingsParser:
    return settings.build_parser(ChatConfig, prog="python -m rlhf_overlay.tools.chat",
                                 description=__doc__.split("\n\n")[0], epilog=__doc__)


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


@main_guard
def main(argv=None) -> int:
    cfg = settings.config_from_args(ChatConfig, build_parser().parse_args(argv))
    cfg.validate()   # MODEL: a causal LM folder (a run folder's policy/ or actor/) or hub id; weights complete
    try:
        bot = Chatbot(cfg)
    except (OSError, ValueError) as exc:   # what transformers says about a folder it cannot load
        raise ChatError(f"MODEL={cfg.model} cannot be loaded: {str(exc).splitlines()[0]} — pass the folder of a "
                        f"trained policy/actor (config.json, weights and tokenizer files)") from None
    return _talk(bot, cfg)


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
