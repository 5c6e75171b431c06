"""`stagelm-chat ckpt=PATH`: a multi-turn chat in the terminal with any SFT-or-later checkpoint.

Replies stream token by token. `/reset` starts a new conversation, `/exit` (or end of input) quits. The built-in
tools (`calculator`, `convert`) are offered by default (`tools=false` turns them off): when the model calls one,
the call is executed, shown with its result (`[calculator {"expression": "4821 * 37"} -> 178377]`), and the result
is fed back so the model can finish its answer. Old turns are dropped (the system prompt is kept) when the
conversation outgrows the context.
"""

from __future__ import annotations

import sys

import hydra
import torch
from omegaconf import DictConfig

from stagelm.chat import Message, parse_assistant, render
from stagelm.checkpoint import load_checkpoint
from stagelm.errors import StagelmError
from stagelm.generation import TextStream, generate
from stagelm.model import Transformer
from stagelm.tokenizer import Tokenizer
from stagelm.tools import BUILTIN_TOOL_SCHEMAS, run_tool_call

MAX_TOOL_ROUNDS = 3


class ChatSession:
    def __init__(
        self,
        model: Transformer,
        tokenizer: Tokenizer,
        system: str | None,
        tools: bool,
        max_new_tokens: int,
        sampling: dict,
    ) -> None:
        self.model, self.tokenizer, self.system = model, tokenizer, system
        self.tools = list(BUILTIN_TOOL_SCHEMAS) if tools else None
        self.max_new_tokens, self.sampling = max_new_tokens, sampling
        self.generator = torch.Generator(device=next(model.parameters()).device)
        if sampling.get("seed") is not None:
            self.generator.manual_seed(int(sampling["seed"]))
        self.reset()

    def reset(self) -> None:
        self.messages: list[Message] = [{"role": "system", "content": self.system}] if self.system else []

    def _prompt_ids(self) -> list[int]:
        budget = self.model.config.max_seq_len - self.max_new_tokens
        while True:
            ids = self.tokenizer.encode(render(self.messages, add_generation_prompt=True, tools=self.tools))
            first = 1 if self.messages and self.messages[0]["role"] == "system" else 0
            if len(ids) <= budget or len(self.messages) - first <= 1:
                return ids[-budget:]
            del self.messages[first]  # forget the oldest turn

    def reply(self, user_text: str, write=sys.stdout.write) -> Message:
        self.messages.append({"role": "user", "content": user_text})
        stops = self.tokenizer.reply_stop_ids
        for _ in range(MAX_TOOL_ROUNDS):
            stream = TextStream(self.tokenizer, write, stop_tokens=stops)
            sampling = {k: v for k, v in self.sampling.items() if k != "seed"}
            out = generate(
                self.model,
                [self._prompt_ids()],
                self.max_new_tokens,
                stop_tokens=stops,
                pad_id=self.tokenizer.pad_id,
                generator=self.generator,
                on_token=stream,
                **sampling,
            )
            message = parse_assistant(self.tokenizer.decode(out.completions()[0]))
            message.pop("finished", None)
            message.pop("malformed_tool_call", None)
            self.messages.append(message)
            if not message.get("tool_calls"):
                return message
            for call in message["tool_calls"]:
                result = run_tool_call(call)
                write(f"\n[{call['function']['name']} {call['function']['arguments']} -> {result}]\n")
                self.messages.append({"role": "tool", "tool_call_id": call["id"], "content": result})
        return message


def run(cfg: DictConfig) -> None:
    loaded = load_checkpoint(str(cfg.ckpt))
    sampling = {
        "temperature": float(cfg.temperature),
        "top_k": cfg.top_k,
        "top_p": cfg.top_p,
        "greedy": bool(cfg.greedy),
        "seed": cfg.seed,
    }
    session = ChatSession(
        loaded.model, loaded.tokenizer, cfg.system, bool(cfg.tools), int(cfg.max_new_tokens), sampling
    )
    interactive = sys.stdin.isatty()
    print(f"stagelm chat ({loaded.stage} checkpoint). /reset starts over, /exit quits.", flush=True)
    while True:
        if interactive:
            print("you> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line:
            break
        text = line.strip()
        if not text:
            continue
        if text == "/exit":
            break
        if text == "/reset":
            session.reset()
            print("(conversation reset)", flush=True)
            continue
        print("assistant> ", end="", flush=True)
        session.reply(text, write=lambda s: (sys.stdout.write(s), sys.stdout.flush()))
        print(flush=True)


@hydra.main(version_base="1.3", config_path="../conf", config_name="chat")
def _hydra_main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except StagelmError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def main() -> None:
    _hydra_main()


if __name__ == "__main__":
    main()
