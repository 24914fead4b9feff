"""Build litgpt's GPT or Hugging Face's LlamaForCausalLM at our model's dimensions, and time it.

Runs in the benchmark environment (.venv-bench: torch, litgpt and transformers from PyPI,
never dependencies of the project) with the repository on PYTHONPATH, so the peers are
timed by the very helpers `llm-lightning bench` uses (`time_steps`, `summarize`).

Each peer runs in a plain PyTorch loop the way its own library would: litgpt's loss is
litgpt's `chunked_cross_entropy` (what litgpt's pretrain script calls), Hugging Face's the
cross entropy of its fp32-upcast logits (what its causal-LM loss does); the optimizer is
torch's AdamW with its defaults for the device (litgpt's pretrain asks for fused only on
CUDA), with the same learning rate, betas, weight decay groups and gradient clipping as ours.

    python -m benchmarks.peers --impl litgpt --precision bf16-mixed --json out.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import types
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from llm_lightning.model import ModelConfig, flops_per_token
from llm_lightning.model.hf import hf_config
from llm_lightning.tools.timing import autocast, random_batches, summarize, time_steps
from llm_lightning.training.optim import parameter_groups, warmup_cosine


def peer_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--impl", required=True, choices=["litgpt", "hf"])
    parser.add_argument("--hidden_size", type=int, default=256)
    parser.add_argument("--num_layers", type=int, default=6)
    parser.add_argument("--num_heads", type=int, default=8)
    parser.add_argument("--num_kv_heads", type=int, default=None)
    parser.add_argument("--vocab_size", type=int, default=8192)
    parser.add_argument("--seq_len", type=int, default=256)
    parser.add_argument("--micro_batch_size", type=int, default=8)
    parser.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed"])
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", dest="json_path")
    return parser.parse_args(argv)


def our_config(args: argparse.Namespace) -> ModelConfig:
    """Our config at these dimensions: the peers copy its derived sizes (SwiGLU width, head dim)."""
    return ModelConfig(
        vocab_size=args.vocab_size,
        hidden_size=args.hidden_size,
        num_layers=args.num_layers,
        num_heads=args.num_heads,
        num_kv_heads=args.num_kv_heads,
        max_seq_len=args.seq_len,
    )


def litgpt_model(config: ModelConfig, litgpt_init: bool = True) -> torch.nn.Module:
    """litgpt's GPT as a Llama: RMSNorm, LLaMAMLP (SwiGLU), full rotary, GQA groups, no biases, untied."""
    from litgpt.config import Config
    from litgpt.model import GPT

    litgpt_config = Config(
        name="bench-llama",
        block_size=config.max_seq_len,
        vocab_size=config.vocab_size,
        padded_vocab_size=config.vocab_size,
        n_layer=config.num_layers,
        n_head=config.num_heads,
        n_embd=config.hidden_size,
        n_query_groups=config.num_kv_heads,
        rotary_percentage=1.0,
        parallel_residual=False,
        bias=False,
        norm_class_name="RMSNorm",
        norm_eps=config.norm_eps,
        mlp_class_name="LLaMAMLP",
        intermediate_size=config.intermediate_size,
        rope_base=int(config.rope_theta),
    )
    model = GPT(litgpt_config)
    if litgpt_init:  # the initialisation litgpt's pretrain script applies (GPT-NeoX style)
        from litgpt.pretrain import initialize_weights

        initialize_weights(types.SimpleNamespace(strategy=None), model, config.num_layers, config.hidden_size)
    return model


def hf_model(config: ModelConfig) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    llama = LlamaConfig(**{**hf_config(config), "use_cache": False})  # our shape, in transformers' own class
    return LlamaForCausalLM._from_config(llama, attn_implementation="sdpa")


def loss_function(impl: str):
    """(model, inputs, targets) -> mean loss, the way each library computes it."""
    if impl == "litgpt":
        from litgpt.utils import chunked_cross_entropy

        return lambda model, inputs, targets: chunked_cross_entropy(model(inputs), targets)

    def hf_loss(model, inputs, targets):
        logits = model(input_ids=inputs).logits
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())

    return hf_loss


def build_peer(impl: str, config: ModelConfig, device: torch.device) -> torch.nn.Module:
    model = litgpt_model(config) if impl == "litgpt" else hf_model(config)
    return model.to(device).train()


def peer_optimizer(model: torch.nn.Module, lr: float, device: torch.device) -> torch.optim.Optimizer:
    """torch's AdamW with the device's defaults (fused on CUDA, as litgpt's pretrain asks)."""
    fused = True if device.type == "cuda" else None
    return torch.optim.AdamW(parameter_groups(model, 0.1), lr=lr, betas=(0.9, 0.95), fused=fused)


def train_step(model, optimizer, scheduler, loss_fn, inputs, targets, device, precision) -> None:
    """One optimizer step on one batch: loss, backward, clip at 1.0, AdamW, schedule."""
    with autocast(device, precision):
        loss = loss_fn(model, inputs, targets)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()


def make_step(model, optimizer, scheduler, loss_fn, batches, device, precision):
    """One optimizer step per call, cycling through `batches`."""
    position = iter(range(10**9))

    def step() -> None:
        inputs, targets = batches[next(position) % len(batches)]
        train_step(model, optimizer, scheduler, loss_fn, inputs, targets, device, precision)

    return step


def main(argv: list[str] | None = None) -> int:
    args = peer_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    config = our_config(args)
    model = build_peer(args.impl, config, device)
    if args.compile:
        model = torch.compile(model)
    optimizer = peer_optimizer(model, 3e-4, device)
    total = args.warmup + args.steps
    schedule = partial(warmup_cosine, warmup_steps=min(10, total), max_steps=total, min_ratio=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    batches = random_batches(4, args.micro_batch_size, args.seq_len, args.vocab_size, device, args.seed)
    step = make_step(model, optimizer, scheduler, loss_function(args.impl), batches, device, args.precision)
    times = time_steps(step, args.steps, args.warmup, device)
    tokens = args.micro_batch_size * args.seq_len
    result = summarize(times, tokens, flops_per_token(config, args.seq_len), device, args.precision)
    parameters = sum(p.numel() for p in model.parameters())
    result.update(mode=args.impl, compile=args.compile, parameters=parameters, seq_len=args.seq_len)
    if not math.isfinite(result["tokens_per_s"]):
        return 1
    print(json.dumps({k: v for k, v in result.items() if k != "step_times_s"}))
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
