"""`stagelm-generate ckpt=PATH prompt="..."`: print the prompt followed by a sampled completion.

Any stage's checkpoint works (the backbone and tokenizer are rebuilt from the checkpoint alone). The prompt is
encoded after BOS and generation stops at EOS. With one sample the text is streamed as it is generated; with
`num_samples=N` the N completions are sampled as one batch and printed one after another. Settings are in
`conf/generate.yaml`; Hydra writes no outputs/ folder and does not change directory.

User errors (missing or unreadable checkpoint, bad settings) print one `error: ...` line on stderr and exit
with status 2, without a traceback.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from stagelm.chat import ChatFormatError, render
from stagelm.checkpoint import CheckpointError, load_checkpoint
from stagelm.generation import TextStream, generate
from stagelm.tools import BUILTIN_TOOL_SCHEMAS

EXIT_USAGE = 2


class UsageError(Exception):
    """A problem the user can fix from the command line; reported as one line, never as a traceback."""


def _sampling_settings(cfg: DictConfig) -> dict:
    settings = {
        "temperature": float(cfg.temperature),
        "top_k": None if cfg.top_k is None else int(cfg.top_k),
        "top_p": None if cfg.top_p is None else float(cfg.top_p),
        "greedy": bool(cfg.greedy),
        "seed": None if cfg.seed is None else int(cfg.seed),
    }
    if int(cfg.num_samples) < 1:
        raise UsageError(f"num_samples={cfg.num_samples} must be >= 1")
    if int(cfg.max_new_tokens) < 1:
        raise UsageError(f"max_new_tokens={cfg.max_new_tokens} must be >= 1")
    return settings


class _StdoutWriter:
    """Writes the prompt before the first piece of streamed text, so a failure before sampling starts (bad
    settings) prints only the error."""

    def __init__(self, prompt: str) -> None:
        self.prompt: str | None = prompt

    def __call__(self, text: str) -> None:
        if self.prompt is not None:
            text, self.prompt = self.prompt + text, None
        sys.stdout.write(text)
        sys.stdout.flush()


def load_messages(value: object) -> list[dict]:
    """messages= as a Hydra list, a JSON string, or the path of a .json file holding the list."""
    if isinstance(value, str):
        path = Path(value).expanduser()
        text = path.read_text(encoding="utf-8") if path.suffix == ".json" and path.is_file() else value
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            raise UsageError(f"messages: not a JSON message list or .json file ({e.msg})") from None
    else:
        value = OmegaConf.to_container(value, resolve=True)
    if not isinstance(value, list) or not all(isinstance(m, dict) and "role" in m for m in value):
        raise UsageError('messages must be a list like [{"role": "user", "content": "..."}]')
    return value


def run(cfg: DictConfig) -> None:
    if OmegaConf.is_missing(cfg, "ckpt"):
        raise UsageError("no checkpoint given: stagelm-generate ckpt=PATH prompt='...'")
    settings = _sampling_settings(cfg)

    loaded = load_checkpoint(str(cfg.ckpt))
    model, tokenizer = loaded.model, loaded.tokenizer
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)

    if cfg.messages is not None:
        # chat input: render the conversation, let the model answer as the assistant, print only the reply
        messages = load_messages(cfg.messages)
        tools = list(BUILTIN_TOOL_SCHEMAS) if cfg.tools else None
        prompt_ids = tokenizer.encode(render(messages, add_generation_prompt=True, tools=tools))
        prompt, stop_tokens = "", tokenizer.reply_stop_ids
    else:
        # Hydra parses `prompt=123` or `prompt=true` as a number or bool; the user meant text either way.
        prompt = "" if cfg.prompt is None else str(cfg.prompt)
        prompt_ids = [tokenizer.bos_id, *tokenizer.encode(prompt)]
        stop_tokens = [tokenizer.eos_id]
    if tokenizer.unknown_count:
        print(
            f"note: {tokenizer.unknown_count} prompt character(s) not in the vocabulary became <|unk|>", file=sys.stderr
        )
    room = model.config.max_seq_len - len(prompt_ids)
    if room < 1:
        raise UsageError(f"prompt is {len(prompt_ids)} tokens, no room left in max_seq_len={model.config.max_seq_len}")
    max_new_tokens = int(cfg.max_new_tokens)
    if max_new_tokens > room:
        print(f"note: max_new_tokens={max_new_tokens} clipped to {room} (max_seq_len)", file=sys.stderr)
        max_new_tokens = room

    num_samples = int(cfg.num_samples)
    stream = None
    if num_samples == 1:
        stream = TextStream(tokenizer, _StdoutWriter(prompt), 0, stop_tokens)
    out = generate(
        model,
        [prompt_ids] * num_samples,
        max_new_tokens,
        stop_tokens=stop_tokens,
        pad_id=tokenizer.pad_id,
        on_token=stream,
        compile=bool(cfg.get("compile", False)),
        **settings,
    )
    if stream is not None:
        stream.flush()
        sys.stdout.write("\n")
        return
    for i, (ids, finished) in enumerate(zip(out.completions(), out.finished.tolist())):
        text = tokenizer.decode(ids[:-1] if finished else ids)
        sys.stdout.write(("\n" if i else "") + f"--- sample {i + 1} ---\n{prompt}{text}\n")


@hydra.main(version_base="1.3", config_path="../conf", config_name="generate")
def main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except (UsageError, CheckpointError, ChatFormatError, ValueError) as e:
        # SystemExit is not an Exception, so Hydra lets it through instead of printing a traceback
        print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_USAGE)


if __name__ == "__main__":
    main()
