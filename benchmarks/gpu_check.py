"""The GPU check: what a training step costs on a CUDA GPU, one JSON line per measurement.

    bash scripts/gpu_check.sh --out DIR          # on a machine with a CUDA GPU
    python -m benchmarks.gpu_check --cpu --out DIR   # the same code at tiny sizes (the test suite's)

Each measurement appends one line to DIR/gpu_check.jsonl as soon as it ends (a run cut off
keeps the lines it wrote), with `name`, `ok`, `seconds` and its figures; the last line is the
summary. In order, most telling first:

1. `environment`: versions, the device, its SDPA kernels;
2. `gemm`: the bf16 matrix-product ceiling (8192^3, mean of 10 after 3 warm-ups);
3. `recipe_eager`, `recipe_compiled`, `recipe_compiled_cudnn`: the small preset's recipe (its
   config's optimizer, z-loss, QK-norm and clipping, read from configs/small.yaml at run time)
   at 32 x 2048 tokens, vocab 32,000, bf16-mixed, without activation checkpointing: eager,
   compiled (PyTorch's attention order), compiled with cuDNN attention first (the default on
   Hopper). tokens/s, MFU against the datasheet peak (H100/H200: 989 TFLOP/s dense bf16) and
   against the measured ceiling, peak memory, the attention ops that ran;
4. `baseline_nanochat`: a nanochat-style GPT in plain torch at the small preset's dims
   (ReLU^2, QK-norm, rotary, untied head, logit softcap, the whole model compiled), same batch;
5. `memory_<preset>`: each configs/<preset>.yaml at its own micro-batch and activation
   checkpointing (sequence 2048), two optimizer steps eager: peak memory against the
   project's formula (training/parallel/memory.py);
6. `fit_resume`: `llm-lightning prepare` on the demo corpus, then `llm-lightning fit` with
   configs/small.yaml (compile: auto) stopped half way and resumed with `--ckpt_path last`.

FLOPs are the PaLM / nanoGPT count (model/config.py `flops_per_token`, LM head included).
A measurement that would start after `--budget_s` seconds is written as skipped, so the run
ends in time (under 8 minutes on one H200 by design; not yet measured on a GPU).
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
import yaml
from torch import nn

REPO = Path(__file__).resolve().parents[1]
PRESET_CONFIGS = ("tiny", "small", "medium", "large", "xl")

GPU = {"device": "cuda", "precision": "bf16-mixed", "gemm": 8192, "batch": 32, "seq": 2048, "vocab": 32000,
       "steps": 10, "warmup": 3, "dims": {}, "memory_seq": 2048, "corpus_mb": 3.0, "fit_steps": 30,
       "fit": ["--config", REPO / "configs" / "small.yaml", "--data.batch_size", 16, "--data.micro_batch_size", 16],
       "prepare": ["--vocab_size", 8192, "--max_length", 512], "resume": []}  # fmt: skip
# The resumed CPU fit compiles (auto is off on CPUs), so the suite runs the CLI's compiled path.
CPU = {"device": "cpu", "precision": "32-true", "gemm": 256, "batch": 2, "seq": 32, "vocab": 512,
       "steps": 2, "warmup": 1, "dims": {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2},
       "memory_seq": 32, "corpus_mb": 0.15, "fit_steps": 8,
       "fit": ["--config", REPO / "configs" / "tiny.yaml", "--model.hidden_size", 64, "--model.num_layers", 2,
               "--model.num_heads", 4, "--data.batch_size", 4, "--data.micro_batch_size", 4,
               "--data.num_workers", 0, "--trainer.precision", "32-true", "--trainer.accelerator", "cpu"],
       "prepare": ["--vocab_size", 512, "--max_length", 32], "resume": ["--model.compile", "true"]}  # fmt: skip


# ----------------------------------------------------------------------------- the record
class Record:
    """Appends one JSON line per measurement to DIR/gpu_check.jsonl, as each one ends."""

    def __init__(self, folder: Path, budget_s: float) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.path, self.budget_s, self.started = folder / "gpu_check.jsonl", budget_s, time.perf_counter()
        self.results: list[dict] = []

    def run(self, name: str, measure, *args) -> dict:
        started = time.perf_counter()
        if started - self.started > self.budget_s:
            line = {"name": name, "ok": False, "skipped": f"over the {self.budget_s:.0f} s budget"}
        else:
            try:
                line = {"name": name, "ok": True, **measure(*args)}
            except Exception as error:  # noqa: BLE001 - the line says what failed; the others still run
                line = {"name": name, "ok": False, "error": f"{type(error).__name__}: {error}"[-2000:]}
        line["seconds"] = round(time.perf_counter() - started, 1)
        self.write(line)
        print(f"[gpu_check] {name}: {'ok' if line['ok'] else 'FAILED'} ({line['seconds']} s)", flush=True)
        return line

    def write(self, line: dict) -> None:
        self.results.append(line)
        with self.path.open("a") as file:  # one write per line: a cut-off run keeps whole lines
            file.write(json.dumps(line, default=str) + "\n")


# ----------------------------------------------------------------------------- helpers
def autocast(sizes: dict):
    enabled = sizes["precision"].startswith("bf16")
    return torch.autocast(sizes["device"], dtype=torch.bfloat16, enabled=enabled)


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def fresh_memory(device: str) -> None:
    """Forget compiled graphs and free cached blocks, so each measurement starts alike."""
    torch._dynamo.reset()
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_memory_mib(device: str) -> float:
    from llm_lightning.tools.timing import peak_memory

    return round(peak_memory(torch.device(device))[0] / 2**20, 1)


def time_steps(step, sizes: dict) -> float:
    """Median seconds of one step, after warm-ups (compiling happens in the first)."""
    for _ in range(sizes["warmup"]):
        step()
    synchronize(sizes["device"])
    times = []
    for _ in range(sizes["steps"]):
        started = time.perf_counter()
        step()
        synchronize(sizes["device"])
        times.append(time.perf_counter() - started)
    return sorted(times)[len(times) // 2]


def rounded(value: float) -> float:
    """Four significant figures: GPU figures in hundreds, the CPU mode's in millionths."""
    return float(f"{value:.4g}")


def throughput(
    seconds: float, tokens: int, flops_per_token: float, sizes: dict, ceiling: float | None
) -> dict:
    from llm_lightning.training.throughput import device_peak_flops

    achieved = tokens / seconds * flops_per_token
    peak = device_peak_flops(torch.device(sizes["device"]), sizes["precision"])
    return {
        "tokens_per_s": rounded(tokens / seconds),
        "step_s": rounded(seconds),
        "achieved_tflops": rounded(achieved / 1e12),
        "mfu_datasheet": rounded(achieved / peak) if peak else None,
        "mfu_measured_ceiling": rounded(achieved / ceiling) if ceiling else None,
        "peak_memory_mib": peak_memory_mib(sizes["device"]),
    }


def attention_ops(step, device: str) -> list[str]:
    """The attention operators one more step dispatches (which SDPA kernel ran)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as profiler:
        step()
        synchronize(device)
    return sorted({e.key for e in profiler.key_averages() if "attention" in e.key.lower()})


def random_batch(sizes: dict, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (sizes["batch"], sizes["seq"] + 1), generator=generator).to(sizes["device"])
    return ids[:, :-1], ids[:, 1:]


def model_settings(name: str) -> tuple[dict, dict]:
    """configs/<name>.yaml's model and data sections, read now (the presets change over time)."""
    config = yaml.safe_load((REPO / "configs" / f"{name}.yaml").read_text())
    return config.get("model", {}), config.get("data", {})


def recipe_model(sizes: dict, name: str, seq: int, checkpointing: str, compile: bool):
    """configs/<name>.yaml's model and optimizer (the LanguageModel's own), built on the device.

    The LanguageModel reads the config's settings; its Transformer is rebuilt on the device
    (the module's own is on the meta device until a Trainer places it).
    """
    from llm_lightning.model import Transformer
    from llm_lightning.training.module import LanguageModel
    from llm_lightning.training.parallel import parallelize

    settings, _ = model_settings(name)
    settings = {**settings, **sizes["dims"], "max_steps": 1000}
    lm = LanguageModel(vocab_size=sizes["vocab"], max_length=seq, **settings)
    with torch.device(sizes["device"]):
        lm.model = Transformer(lm.config)
    lm.to(sizes["device"])  # also the module's own device, which the optimizer's settings read
    parallelize(lm.model, None, checkpointing, compile, sizes["precision"])
    # A Trainer that never runs: configure_optimizers reads its precision and strategy.
    lm.trainer = L.Trainer(accelerator=sizes["device"], devices=1, precision=sizes["precision"], logger=False,
                           enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    return lm, lm.configure_optimizers()["optimizer"]


# ----------------------------------------------------------------------------- measurements
def environment(sizes: dict) -> dict:
    import lightning

    info = {"python": platform.python_version(), "torch": torch.__version__, "lightning": lightning.__version__,
            "cuda": torch.version.cuda, "device": sizes["device"]}  # fmt: skip
    if sizes["device"] == "cuda":
        info.update(name=torch.cuda.get_device_name(), capability=torch.cuda.get_device_capability(),
                    cudnn=torch.backends.cudnn.version(), sdpa_priority=getattr(torch._C, "_get_sdp_priority_order", list)(),
                    memory_gib=round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1))  # fmt: skip
    return info


def gemm(sizes: dict) -> dict:
    n, device = sizes["gemm"], sizes["device"]
    dtype = torch.bfloat16 if sizes["precision"].startswith("bf16") else torch.float32
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    synchronize(device)
    started = time.perf_counter()
    for _ in range(10):
        a @ b
    synchronize(device)
    tflops = 2 * n**3 * 10 / (time.perf_counter() - started) / 1e12
    return {"n": n, "dtype": str(dtype), "tflops": rounded(tflops)}


def recipe(sizes: dict, compile: bool, attention: str, ceiling: float | None) -> dict:
    """The small preset's recipe, one optimizer step per call, through the training code."""
    from llm_lightning.model import flops_per_token, layers
    from llm_lightning.training.parallel import clip_grad_norm

    fresh_memory(sizes["device"])
    layers.attention_priority = attention
    lm, optimizer = recipe_model(sizes, "small", sizes["seq"], "none", compile)
    config = lm.config
    inputs, targets = random_batch(sizes, config.vocab_size)

    def step() -> None:
        with autocast(sizes):
            loss = lm.model(inputs, targets=targets, z_loss=lm.hparams.z_loss)
        loss.backward()
        clip_grad_norm(lm.model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    try:
        seconds = time_steps(step, sizes)
        tokens = sizes["batch"] * sizes["seq"]
        result = throughput(seconds, tokens, flops_per_token(config, sizes["seq"]), sizes, ceiling)
        return {**result, "attention_ops": attention_ops(step, sizes["device"]), "compile": compile,
                "attention_priority": attention, "optimizer": lm.hparams.optimizer,
                "batch": f"{sizes['batch']} x {sizes['seq']}", "vocab": config.vocab_size}  # fmt: skip
    finally:
        layers.attention_priority = "auto"


class NanoBlock(nn.Module):
    """A nanochat-style block: no-gain RMSNorm, rotary, QK-norm, ReLU^2 MLP (own code)."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv, self.proj = nn.Linear(width, 3 * width, bias=False), nn.Linear(width, width, bias=False)
        self.up, self.down = nn.Linear(width, 4 * width, bias=False), nn.Linear(4 * width, width, bias=False)

    def forward(self, x, cos, sin):
        b, t, c = x.shape
        q, k, v = self.qkv(F.rms_norm(x, (c,))).view(b, t, 3, self.heads, -1).transpose(1, 3).unbind(2)
        q, k = (rotate(F.rms_norm(z, (z.shape[-1],)), cos, sin) for z in (q, k))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, c)
        x = x + self.proj(y)
        return x + self.down(F.relu(self.up(F.rms_norm(x, (c,)))).square())


def rotate(x, cos, sin):
    cos, sin, half = cos.to(x.dtype), sin.to(x.dtype), x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class NanoGPT(nn.Module):
    def __init__(self, vocab: int, width: int, depth: int, heads: int, seq: int) -> None:
        super().__init__()
        self.embed, self.head = nn.Embedding(vocab, width), nn.Linear(width, vocab, bias=False)
        self.blocks = nn.ModuleList(NanoBlock(width, heads) for _ in range(depth))
        angles = torch.outer(
            torch.arange(seq).float(), 10000 ** -(torch.arange(0, width // heads, 2) / (width // heads))
        )
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, ids, targets):
        x = F.rms_norm(self.embed(ids), (self.embed.embedding_dim,))
        for block in self.blocks:
            x = block(x, self.cos, self.sin)
        logits = 15 * torch.tanh(self.head(F.rms_norm(x, (x.shape[-1],))).float() / 15)  # softcap
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def baseline_nanochat(sizes: dict, ceiling: float | None) -> dict:
    """The same batch through a nanochat-style GPT: fused AdamW, the whole model compiled."""
    from llm_lightning.model import ModelConfig

    fresh_memory(sizes["device"])
    config = ModelConfig.from_preset(
        "small", vocab_size=sizes["vocab"], max_seq_len=sizes["seq"], **sizes["dims"]
    )
    width, depth, heads = config.hidden_size, config.num_layers, config.num_heads
    with torch.device(sizes["device"]):
        model = NanoGPT(sizes["vocab"], width, depth, heads, sizes["seq"])
    # Compiled on CUDA as nanochat is; a CPU (the suite's mode) spends the time compiling instead.
    compiled = torch.compile(model) if sizes["device"] == "cuda" else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, fused=sizes["device"] == "cuda")
    inputs, targets = random_batch(sizes, sizes["vocab"])

    def step() -> None:
        with autocast(sizes):
            compiled(inputs, targets).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    seconds = time_steps(step, sizes)
    matmul = sum(p.numel() for name, p in model.named_parameters() if p.dim() == 2 and "embed" not in name)
    flops = 6 * matmul + 12 * depth * width * sizes["seq"]
    tokens = sizes["batch"] * sizes["seq"]
    return {**throughput(seconds, tokens, flops, sizes, ceiling), "dims": f"{width} x {depth}, {heads} heads"}


def preset_memory(sizes: dict, name: str) -> dict:
    """configs/<name>.yaml at its micro-batch and checkpointing: two steps, peak vs the formula."""
    from llm_lightning.training.parallel import clip_grad_norm
    from llm_lightning.training.parallel.memory import training_memory

    fresh_memory(sizes["device"])
    settings, data = model_settings(name)
    micro = data.get("micro_batch_size", data.get("batch_size", 1))
    checkpointing = settings.get("activation_checkpointing", "none")
    lm, optimizer = recipe_model(sizes, name, sizes["memory_seq"], checkpointing, False)
    config = lm.config
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (micro, sizes["memory_seq"] + 1), generator=generator)
    ids = ids.to(sizes["device"])
    for _ in range(2):  # the second step holds the optimizer's state too
        with autocast(sizes):
            loss = lm.model(ids[:, :-1], targets=ids[:, 1:], z_loss=lm.hparams.z_loss)
        loss.backward()
        clip_grad_norm(lm.model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    synchronize(sizes["device"])
    formula = training_memory(config, micro_batch_size=micro, seq_len=sizes["memory_seq"],
                              precision=sizes["precision"], activation_checkpointing=checkpointing)  # fmt: skip
    return {"micro_batch": micro, "seq": sizes["memory_seq"], "activation_checkpointing": checkpointing,
            "peak_memory_mib": peak_memory_mib(sizes["device"]), "formula_mib": round(formula["total"] / 2**20, 1),
            "loss": round(loss.item(), 4)}  # fmt: skip


def cli(*args, timeout: float = 400) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-m", "llm_lightning", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if result.returncode != 0:
        raise RuntimeError(f"llm-lightning {args[0]}: exit {result.returncode}: {result.stderr[-1500:]}")
    return result


def fit_resume(sizes: dict, work: Path) -> dict:
    """prepare, then fit half way, then resume with --ckpt_path last to the end: through the CLI."""
    from llm_lightning.tools.demo import build_corpus

    raw, data, ckpts, total = work / "raw", work / "data", work / "checkpoints", sizes["fit_steps"]
    build_corpus(raw, sizes["corpus_mb"])
    cli("prepare", "--input_dir", raw, "--output_dir", data, *sizes["prepare"], "--num_workers", 2,
        "--val_fraction", 0.05)  # fmt: skip
    common = [
        "fit", *sizes["fit"], "--data.data_dir", data, "--model.max_steps", total, "--model.warmup_steps", 5,
        "--eval_interval", total // 2, "--checkpoint.every_n_train_steps", total, "--checkpoint.dirpath", ckpts,
        "--trainer.log_every_n_steps", 5, "--trainer.default_root_dir", work / "logs",
    ]  # fmt: skip
    started = time.perf_counter()
    cli(*common, "--trainer.max_steps", total // 2)
    first = time.perf_counter() - started
    cli(*common, "--trainer.max_steps", total, "--ckpt_path", "last", *sizes["resume"])
    records = [json.loads(line) for line in (ckpts / "metrics.jsonl").read_text().splitlines()]
    val = {r["step"]: r["val/loss"] for r in records if r["event"] == "val"}
    starts = [r["step"] for r in records if r["event"] == "start"]
    speed = [
        r["train/tokens_per_s"] for r in records if r["event"] == "train" and r.get("train/tokens_per_s")
    ]
    if starts != [0, total // 2] or sorted(val) != [total // 2, total] or not val[total] < val[total // 2]:
        raise RuntimeError(f"unexpected run: starts {starts}, val {val}")
    return {"val_loss": val, "tokens_per_s": speed[-1] if speed else None, "first_half_s": round(first, 1)}


# ----------------------------------------------------------------------------- the run
def in_process(sizes: dict, record: Record) -> None:
    record.run("environment", environment, sizes)
    ceiling = record.run("gemm", gemm, sizes).get("tflops")
    ceiling = ceiling * 1e12 if ceiling else None
    record.run("recipe_eager", recipe, sizes, False, "default", ceiling)
    record.run("recipe_compiled_cudnn", recipe, sizes, True, "cudnn", ceiling)
    record.run("recipe_compiled", recipe, sizes, True, "default", ceiling)
    record.run("baseline_nanochat", baseline_nanochat, sizes, ceiling)
    for name in PRESET_CONFIGS:
        record.run(f"memory_{name}", preset_memory, sizes, name)
    fresh_memory(sizes["device"])


def run(cpu: bool, out: Path, budget_s: float) -> bool:
    sizes = CPU if cpu else GPU
    if not cpu and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device here; pass --cpu for the CPU mode")
    record = Record(out, budget_s)
    if cpu:  # the subprocess half beside the in-process half: the second core halves the wait
        with ThreadPoolExecutor(2) as pool:
            fit = pool.submit(record.run, "fit_resume", fit_resume, sizes, out / "work")
            in_process(sizes, record)
            fit.result()
    else:  # one after the other, so no measurement shares the GPU
        in_process(sizes, record)
        record.run("fit_resume", fit_resume, sizes, out / "work")
    ok = all(line["ok"] for line in record.results)
    record.write({"name": "summary", "ok": ok, "failed": [r["name"] for r in record.results if not r["ok"]],
                  "seconds": round(time.perf_counter() - record.started, 1)})  # fmt: skip
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="tiny sizes on the CPU (what the test suite runs)")
    parser.add_argument("--out", type=Path, default=Path("gpu_check_out"), help="folder of gpu_check.jsonl")
    parser.add_argument("--budget_s", type=float, default=420, help="start no measurement after this")
    args = parser.parse_args(argv)
    ok = run(args.cpu, args.out, args.budget_s)
    print(f"[gpu_check] {'all passed' if ok else 'FAILED'}: {args.out / 'gpu_check.jsonl'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
