"""`llm-lightning bench`: time training steps of a model on this device.

Two modes:
- `loop`: our Transformer and optimizer in a plain PyTorch loop (forward, loss, backward,
  gradient clipping, AdamW step, schedule step) on random token ids already in memory;
- `fit`: the whole Lightning path a user runs: LanguageModel, TextDataModule over a token
  file in a temporary prepared-data folder, a Trainer with the project's callbacks; the steps
  are timed by a callback.

After `--warmup` untimed steps it reports tokens/s, step time (median, min, max), achieved
TFLOP/s (the PaLM / nanoGPT count of `flops_per_token`, LM head included), MFU against the
device's peak (a datasheet table for GPUs, a measured matrix-product peak for CPUs), peak
memory (CUDA: max allocated; CPU: the process's largest resident set) and, in fit mode, the
share of step time spent outside the training step waiting for the next batch.

The timing helpers (tools/timing.py) are shared with the benchmarks in benchmarks/, which
time other libraries' models the same way.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import lightning as L
import numpy as np
import torch

from llm_lightning.data.format import split_path, token_dtype, write_metadata
from llm_lightning.data.tokenizers import train_tokenizer
from llm_lightning.errors import ArgumentParser, UserError
from llm_lightning.model import PRESETS, ModelConfig, Transformer, flops_per_token, num_parameters
from llm_lightning.tools.device import resolve_device
from llm_lightning.tools.timing import (
    autocast,
    peak_memory,
    profile_step,
    random_batches,
    reset_peak_memory,
    summarize,
    time_steps,
)
from llm_lightning.tools.train_clock import TrainClock
from llm_lightning.training.parallel.memory import held_bytes, training_memory

PRECISIONS = ("32-true", "bf16-mixed", "16-mixed")
STRATEGIES = ("single", "ddp", "fsdp")


# ----------------------------------------------------------------------------- arguments
def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = ArgumentParser(prog="llm-lightning bench", description="Time training steps on this device.")
    parser.add_argument("--preset", default="tiny", choices=list(PRESETS), help="model size (default tiny)")
    parser.add_argument("--hidden_size", type=int, help="override the preset's width")
    parser.add_argument("--num_layers", type=int, help="override the preset's depth")
    parser.add_argument("--num_heads", type=int, help="override the preset's query heads")
    parser.add_argument("--num_kv_heads", type=int, help="key/value heads (GQA); default num_heads")
    parser.add_argument("--vocab_size", type=int, default=8192)
    parser.add_argument("--seq_len", type=int, default=256)
    parser.add_argument("--micro_batch_size", type=int, default=8)
    parser.add_argument("--precision", default="32-true", help=f"one of {', '.join(PRECISIONS)}")
    parser.add_argument("--compile", action="store_true", help="torch.compile the transformer")
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto")
    parser.add_argument(
        "--mode",
        default="loop",
        help="loop (plain PyTorch), fit (Lightning), step-audit (ops, host syncs and collectives per step) "
        "or init (memory per rank after build, shard and init)",
    )
    parser.add_argument(
        "--strategy",
        default="single",
        choices=STRATEGIES,
        help="fit mode: one device, DDP or FSDP2 (default single)",
    )
    parser.add_argument("--devices", type=int, default=1, help="fit mode: processes for ddp/fsdp (default 1)")
    parser.add_argument(
        "--activation_checkpointing", default="none", choices=("none", "full", "selective"), help="fit mode"
    )
    parser.add_argument(
        "--num_workers", type=int, help="fit mode: DataLoader workers (default: the data module's)"
    )
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: PyTorch's choice)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", dest="json_path", help="also write the results to this JSON file")
    parser.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="N",
        help="loop mode: also list the N ops that take the most time",
    )
    args = parser.parse_args(argv)
    check_args(args)
    return args


def check_args(args: argparse.Namespace) -> None:
    if args.precision not in PRECISIONS:
        raise UserError(f"--precision {args.precision}: choose one of {', '.join(PRECISIONS)}")
    if args.mode not in ("loop", "fit", "step-audit", "init"):
        raise UserError(f"--mode {args.mode}: choose loop, fit, step-audit or init")
    for name in ("steps", "seq_len", "micro_batch_size", "vocab_size"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} {getattr(args, name)}: must be at least 1")
    if args.warmup < 0:
        raise UserError(f"--warmup {args.warmup}: must be 0 or more")
    if args.threads is not None and args.threads < 1:
        raise UserError(f"--threads {args.threads}: must be at least 1")
    if args.num_workers is not None and args.num_workers < 0:
        raise UserError(f"--num_workers {args.num_workers}: must be 0 or more")
    if args.profile and args.mode != "loop":
        raise UserError("--profile works with --mode loop (the step without Lightning around it)")
    if args.mode == "loop" and (args.strategy != "single" or args.activation_checkpointing != "none"):
        raise UserError("--strategy and --activation_checkpointing work with --mode fit")
    if args.devices < 1 or (args.devices > 1 and args.strategy == "single"):
        raise UserError(f"--devices {args.devices}: more than 1 needs --strategy ddp or fsdp")


def model_config(args: argparse.Namespace) -> ModelConfig:
    return ModelConfig.from_preset(
        args.preset,
        vocab_size=args.vocab_size,
        max_seq_len=args.seq_len,
        hidden_size=args.hidden_size,
        num_layers=args.num_layers,
        num_heads=args.num_heads,
        num_kv_heads=args.num_kv_heads,
    )


# ----------------------------------------------------------------------------- loop mode
def make_loop_step(args: argparse.Namespace, config: ModelConfig, device: torch.device) -> Callable[[], None]:
    """One optimizer step of our Transformer per call, in a plain loop (what `fit` does, minus Lightning)."""
    from functools import partial

    from llm_lightning.training.optim import build_optimizer, warmup_cosine

    model = Transformer(config).to(device)
    if args.compile:
        model.compile()  # in place, as LanguageModel.configure_model does
    optimizer = build_optimizer(model, 3e-4, 0.1, (0.9, 0.95), device, args.precision == "16-mixed")
    total = args.warmup + args.steps
    schedule = partial(warmup_cosine, warmup_steps=min(10, total), max_steps=total, min_ratio=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "16-mixed")
    batches = random_batches(4, args.micro_batch_size, args.seq_len, config.vocab_size, device, args.seed)
    position = iter(range(10**9))

    def step() -> None:
        inputs, targets = batches[next(position) % len(batches)]
        with autocast(device, args.precision):
            loss = model(inputs, targets=targets)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()

    return step


# ----------------------------------------------------------------------------- fit mode
def write_prepared_folder(folder: Path, vocab: int, seq_len: int, windows: int, seed: int) -> Path:
    """A prepared-data folder (metadata.json + dataset/*.bin) of random tokens, `windows` long."""
    dtype = token_dtype(vocab)
    rng = np.random.default_rng(seed)
    split_path(folder, "train").parent.mkdir(parents=True, exist_ok=True)
    rng.integers(0, vocab, windows * seq_len + 1, dtype=dtype).tofile(split_path(folder, "train"))
    rng.integers(0, vocab, 2 * seq_len + 1, dtype=dtype).tofile(split_path(folder, "val"))
    train_tokenizer("bpe", iter(["random tokens for llm-lightning bench"]), 300).save(folder)
    metadata = {"vocab_size": vocab, "max_length": seq_len, "stride": seq_len, "dtype": dtype.name, "eos_id": 0,
                "note": "random tokens written by llm-lightning bench"}  # fmt: skip
    write_metadata(folder, metadata)
    return folder


def quiet_lightning() -> None:
    """Keep the table readable: Lightning's info lines and advice do not apply to a benchmark."""
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*(logging interval|LeafSpec|does not have many workers).*")


def run_fit(args: argparse.Namespace, config: ModelConfig, device: torch.device) -> tuple[list[float], float]:
    """Step times through Lightning, and the share of them spent between steps (data wait).

    A step is the time from one on_train_batch_start to the next, so it includes fetching the
    next batch; the data wait is the time from on_train_batch_end to the next batch's start.
    """
    from lightning.pytorch.callbacks import LearningRateMonitor
    from lightning.pytorch.loggers import TensorBoardLogger

    from llm_lightning.data.datamodule import TextDataModule
    from llm_lightning.training.callbacks import NonFiniteGuard, RunLog
    from llm_lightning.training.module import LanguageModel

    quiet_lightning()
    batches = args.warmup + args.steps + 1  # one more: a step ends when the next one starts
    with tempfile.TemporaryDirectory(prefix="llm-bench-") as tmp:
        data_dir = write_prepared_folder(
            Path(tmp) / "data", config.vocab_size, args.seq_len, batches * args.micro_batch_size, args.seed
        )
        data_options = {} if args.num_workers is None else {"num_workers": args.num_workers}
        datamodule = TextDataModule(
            str(data_dir),
            batch_size=args.micro_batch_size * args.devices,
            micro_batch_size=args.micro_batch_size,
            **data_options,
        )
        model = LanguageModel(
            vocab_size=config.vocab_size,
            max_length=args.seq_len,
            preset=args.preset,
            hidden_size=config.hidden_size,
            num_layers=config.num_layers,
            num_heads=config.num_heads,
            num_kv_heads=config.num_kv_heads,
            warmup_steps=min(10, batches),
            max_steps=batches,
            compile=args.compile,
            activation_checkpointing=args.activation_checkpointing,
        )
        timer, memory = TrainClock(), MemoryProbe(step=args.warmup + 1)
        trainer = L.Trainer(
            accelerator=device.type,
            devices=args.devices,
            strategy=strategy(args.strategy),
            precision=args.precision,
            max_steps=batches,
            gradient_clip_val=1.0,
            log_every_n_steps=100,  # the CLI's default
            callbacks=[
                LearningRateMonitor(logging_interval="step"),
                RunLog(),
                NonFiniteGuard(),
                timer,
                memory,
            ],
            default_root_dir=tmp,
            logger=TensorBoardLogger(tmp, name="bench"),  # what the CLI gets by default
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            limit_val_batches=0,
            num_sanity_val_steps=0,
            use_distributed_sampler=False,
        )
        trainer.fit(model, datamodule=datamodule)
    starts, ends = timer.starts[args.warmup :], timer.ends[args.warmup :]
    step_times = [later - start for start, later in zip(starts, starts[1:], strict=False)]
    waits = [start - end for end, start in zip(ends, starts[1:], strict=False)]
    return step_times, sum(waits) / sum(step_times), memory.held(device), trainer.is_global_zero


def strategy(name: str):
    from lightning.pytorch.strategies import DDPStrategy

    from llm_lightning.training.parallel import ShardedStrategy

    if name == "ddp":  # as configs/strategy/ddp.yaml
        return DDPStrategy(
            find_unused_parameters=False, gradient_as_bucket_view=True, broadcast_buffers=False
        )
    return {"single": "auto", "fsdp": ShardedStrategy(tensor_parallel_size=1)}[name]


class MemoryProbe(L.Callback):
    """What this rank holds for parameters, gradients and optimizer state, read once mid-run."""

    def __init__(self, step: int) -> None:
        self.step, self.bytes = step, {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if trainer.global_step == self.step:  # the optimizer has its state by now
            self.bytes = held_bytes(pl_module, optimizer)

    def held(self, device: torch.device) -> dict:
        return {**self.bytes, "peak": peak_memory(device)[0]}


# ----------------------------------------------------------------------------- report
def format_table(result: dict) -> str:
    """A two-column table of the headline numbers."""
    step = result["step_time_s"]
    mfu = f"{result['mfu']:.1%}" if result["mfu"] is not None else "n/a (unknown device peak)"
    peak = f"{result['peak_tflops']:.3f}" if result["peak_tflops"] else "n/a"
    rows = [
        ("mode", result["mode"]),
        ("device", f"{result['device_name']} ({result['device']}, {result['threads']} threads)"),
        ("model", f"{result['model']}, {result['parameters'] / 1e6:.1f}M parameters"),
        ("batch", f"{result['micro_batch_size']} x {result['seq_len']} tokens, {result['precision']}"),
        ("compile", str(result["compile"])),
        ("tokens/s", f"{result['tokens_per_s']:,.0f}"),
        ("step time (s)", f"median {step['median']:.4f}  min {step['min']:.4f}  max {step['max']:.4f}"),
        ("achieved TFLOP/s", f"{result['achieved_tflops']:.4f}  (peak {peak})"),
        ("MFU", mfu),
        ("peak memory", f"{result['peak_memory_bytes'] / 2**20:,.0f} MiB ({result['peak_memory_kind']})"),
    ]
    if result.get("data_wait_share") is not None:
        rows.append(("data wait", f"{result['data_wait_share']:.2%} of step time"))
    if result.get("memory_per_rank"):
        held, formula = result["memory_per_rank"], result["memory_formula"]
        rows.append(("strategy", f"{result['strategy']} on {result['devices']} process(es)"))
        for kind in ("parameters", "gradients", "optimizer"):
            rows.append(
                (
                    f"{kind}/rank",
                    f"{held.get(kind, 0) / 2**20:,.1f} MiB (formula {formula[kind] / 2**20:,.1f})",
                )
            )
    width = max(len(name) for name, _ in rows)
    lines = [f"{name:<{width}}  {value}" for name, value in rows]
    if result.get("profile"):
        lines += ["", f"{'share':>6}  {'ms/step':>9}  {'calls':>6}  op (self time)"]
        for op in result["profile"]:
            lines.append(f"{op['share']:6.1%}  {op['self_ms_per_step']:9.2f}  {op['calls']:6d}  {op['op']}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> dict:
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    config = model_config(args)
    reset_peak_memory(device)
    profile, memory, estimate, reporter = None, None, None, True
    if args.mode == "loop":
        step = make_loop_step(args, config, device)
        step_times, data_wait = time_steps(step, args.steps, args.warmup, device), None
        profile = profile_step(step, device, args.profile) if args.profile else None
    else:
        step_times, data_wait, memory, reporter = run_fit(args, config, device)
        estimate = training_memory(
            config, strategy=args.strategy, devices=args.devices, micro_batch_size=args.micro_batch_size,
            seq_len=args.seq_len, precision=args.precision, activation_checkpointing=args.activation_checkpointing,
        )  # fmt: skip
    tokens = args.micro_batch_size * args.seq_len
    result = summarize(step_times, tokens, flops_per_token(config, args.seq_len), device, args.precision)
    result.update(
        mode=args.mode,
        compile=args.compile,
        model=f"{args.preset} h{config.hidden_size} L{config.num_layers} heads {config.num_heads}/{config.num_kv_heads} vocab {config.vocab_size}",
        config=config.to_dict(),
        parameters=num_parameters(config),
        seq_len=args.seq_len,
        micro_batch_size=args.micro_batch_size,
        steps=args.steps,
        warmup=args.warmup,
        data_wait_share=data_wait,
        profile=profile,
        strategy=args.strategy,
        devices=args.devices,
        memory_per_rank=memory,
        memory_formula=estimate,
        reporter=reporter,  # rank 0 of a multi-process run, or the only process
    )
    return result


def step_audit(args: argparse.Namespace) -> int:
    """--mode step-audit: one JSON line from rank 0 (tools/step_audit.py)."""
    from llm_lightning.tools.step_audit import print_report, run_step_audit

    return audit(args, run_step_audit, print_report)


def init_audit(args: argparse.Namespace) -> int:
    """--mode init: peak memory per rank after build, shard and init, one JSON line (tools/init_audit.py)."""
    from llm_lightning.tools.init_audit import print_init_report, run_init_audit

    return audit(args, run_init_audit, print_init_report)


def audit(args: argparse.Namespace, run_audit: Callable, print_result: Callable) -> int:
    """Seed, run an audit on this bench's model and device, print its result where it has one (rank 0)."""
    torch.manual_seed(args.seed)
    result = run_audit(args, model_config(args), resolve_device(args.device))
    if result is not None:
        print_result(result)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.mode == "step-audit":
        return step_audit(args)
    if args.mode == "init":
        return init_audit(args)
    result = run(args)
    if not result["reporter"]:
        return 0  # another rank of a ddp/fsdp run: rank 0 reports
    print(format_table(result))
    if args.json_path:
        path = Path(args.json_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
