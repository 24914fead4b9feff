"""`llm-lightning generate`: sample text from a checkpoint, streamed to stdout.

The model and the tokenizer both come from the checkpoint, so nothing but the .ckpt file is
needed. Decoding uses the KV cache: the prompt is run once, then one token per step. The
context is a sliding window of the model's `max_seq_len` tokens: a longer prompt keeps its
last tokens, and once the window is full the cache is rebuilt from the last `max_seq_len`
tokens at every step, which gives exactly what the no-cache path computes.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator

import torch

from llm_lightning.errors import ArgumentParser, UserError
from llm_lightning.io.checkpoint import load_checkpoint, load_model, load_tokenizer
from llm_lightning.tools.device import pick_dtype, resolve_device


def sample_next(
    logits: torch.Tensor,
    temperature: float = 0.8,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Next token ids (batch,) from last-position logits (batch, vocab); temperature 0 is greedy."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth_best = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth_best, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the tokens ranked above it already hold top_p of the mass:
        # the most likely token is always kept.
        drop = probs.cumsum(dim=-1) - probs > top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _last_logits(model, ids: torch.Tensor, cache=None) -> torch.Tensor:
    """Logits of the last position only: the LM head over the whole prompt would be wasted work."""
    return model.lm_head(model.hidden_states(ids, cache)[:, -1])


@torch.inference_mode()
def generate_tokens(
    model,
    ids: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 0.8,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    eos_id: int | None = None,
) -> Iterator[torch.Tensor]:
    """Yield the next token ids (batch,) one step at a time; stops once every row emitted eos_id."""
    window = model.config.max_seq_len
    ids = ids[:, -window:]
    cache = model.new_cache(ids.shape[0], window) if use_cache else None
    logits = _last_logits(model, ids, cache)
    finished = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    for step in range(max_new_tokens):
        token = sample_next(logits, temperature, top_k, top_p, generator)
        yield token
        if eos_id is not None:
            finished |= token == eos_id
            if finished.all():
                return
        if step == max_new_tokens - 1:
            return  # no forward pass for a token nobody will sample
        ids = torch.cat([ids, token[:, None]], dim=1)[:, -window:]
        if cache is None:
            logits = _last_logits(model, ids)
        elif cache.length < window:
            logits = _last_logits(model, token[:, None], cache)
        else:  # window full: start a fresh cache over the last `window` tokens
            cache = model.new_cache(ids.shape[0], window)
            logits = _last_logits(model, ids, cache)


def generate(model, ids: torch.Tensor, max_new_tokens: int, **sampling) -> torch.Tensor:
    """The prompt ids (batch, seq) followed by up to `max_new_tokens` generated ids.

    `sampling` takes `generate_tokens`' keywords (temperature, top_k, top_p, generator, ...).
    """
    new = list(generate_tokens(model, ids, max_new_tokens, **sampling))
    return torch.cat([ids, torch.stack(new, dim=1)], dim=1) if new else ids


class TextStream:
    """Turns a growing list of ids into printable text increments.

    The whole sequence is decoded each time and only the new suffix is returned, so a
    character split over several byte tokens is held back until it is complete (the
    decoder shows an incomplete one as U+FFFD).
    """

    def __init__(self, tokenizer, prompt_ids: list[int]) -> None:
        self.tokenizer = tokenizer
        self.ids = list(prompt_ids)
        self.shown = tokenizer.decode(self.ids)

    def add(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        # Tokenizers that normalise (wordpiece) may rewrite earlier text: print past the common part.
        common = len(self.shown) if text.startswith(self.shown) else _common_prefix(text, self.shown)
        new, self.shown = text[common:], text
        return new


def _common_prefix(a: str, b: str) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def check_sampling(temperature: float, top_k: int | None, top_p: float | None, max_new_tokens: int) -> None:
    if temperature < 0:
        raise UserError(f"--temperature {temperature}: must be >= 0 (0 = greedy)")
    if top_k is not None and top_k < 1:
        raise UserError(f"--top_k {top_k}: must be at least 1")
    if top_p is not None and not 0 < top_p <= 1:
        raise UserError(f"--top_p {top_p}: must be in (0, 1]")
    if max_new_tokens < 0:
        raise UserError(f"--max_new_tokens {max_new_tokens}: must be >= 0")


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="llm-lightning generate",
        description="Generate text from a checkpoint (model and tokenizer both come from it).",
    )
    parser.add_argument("--ckpt_path", required=True, help="a .ckpt file written by `llm-lightning fit`")
    parser.add_argument("--prompt", default="", help="text to continue (default: start from end-of-text)")
    parser.add_argument("--max_new_tokens", type=int, default=100, help="tokens to generate (default 100)")
    parser.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default 0.8)")
    parser.add_argument("--top_k", type=int, default=None, help="sample among the k most likely tokens")
    parser.add_argument(
        "--top_p", type=float, default=None, help="nucleus sampling: smallest set with mass p"
    )
    parser.add_argument("--seed", type=int, default=None, help="random seed, for repeatable samples")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    parser.add_argument(
        "--dtype",
        choices=("auto", "float32", "bfloat16", "float16"),
        default="auto",
        help="weights' dtype: auto = bfloat16 on a GPU that supports it, float32 elsewhere",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    check_sampling(args.temperature, args.top_k, args.top_p, args.max_new_tokens)
    device = resolve_device(args.device)

    checkpoint = load_checkpoint(args.ckpt_path)
    tokenizer = load_tokenizer(checkpoint)
    model = load_model(checkpoint).to(device=device, dtype=pick_dtype(args.dtype, device))
    del checkpoint

    # A prompt that encodes to nothing (empty, or only whitespace for wordpiece) starts from end-of-text.
    prompt_ids = tokenizer.encode(args.prompt) or [tokenizer.eos_id]
    if len(prompt_ids) > model.config.max_seq_len:
        print(
            f"note: the prompt has {len(prompt_ids)} tokens; the model sees the last {model.config.max_seq_len}",
            file=sys.stderr,
        )
    generator = None
    if args.seed is not None:
        generator = torch.Generator(device=device).manual_seed(args.seed)

    sys.stdout.write(args.prompt)
    sys.stdout.flush()
    stream = TextStream(tokenizer, prompt_ids)
    ids = torch.tensor([prompt_ids], device=device)
    start, count = time.perf_counter(), 0
    tokens = generate_tokens(
        model,
        ids,
        args.max_new_tokens,
        args.temperature,
        args.top_k,
        args.top_p,
        generator,
        eos_id=tokenizer.eos_id,
    )
    try:
        for token in tokens:
            count += 1
            if int(token) == tokenizer.eos_id:
                break
            sys.stdout.write(stream.add(int(token)))
            sys.stdout.flush()
    except KeyboardInterrupt:
        sys.stdout.write("\n")
        raise UserError(f"generate: stopped by Ctrl-C after {count} tokens") from None
    seconds = time.perf_counter() - start
    sys.stdout.write("\n")
    print(
        f"[{count} tokens in {seconds:.2f} s, {count / max(seconds, 1e-9):.1f} tokens/s on {device}]",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
