"""The GPU check: everything a user's first hour on a CUDA machine touches, in one JSON report.

Steps (each through the real `llm-lightning` command, in its own process):
1. `llm-lightning setup`: versions, devices, attention kernels, a forward/backward per device;
2. `llm-lightning bench` of the small preset in bf16-mixed, without and with torch.compile:
   tokens/s, MFU (against the device's dense bf16 peak), peak memory;
3. flash attention confirmed: a profiled training step of our Transformer whose attention ran
   a `*flash_attention*` kernel;
4. a 30-step bf16 fit on real text (the demo's corpus: Python's own documentation), once with
   DDP on one device and once with FSDP2 on one device, each stopped at step 15 and resumed
   with `--ckpt_path last` to 30; the val losses and the throughput from the run log.

    bash scripts/gpu_check.sh                 # on a machine with a CUDA GPU: gpu_check.json
    python -m benchmarks.gpu_check --cpu      # the same steps at tiny sizes on a CPU (the test suite's)

The report says for every step whether it passed; the process exits 1 if any failed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]

GPU = {"preset": "small", "bench": ["--micro_batch_size", "8", "--seq_len", "1024", "--steps", "10", "--warmup", "3"],
       "fit": ["--model.preset", "small", "--data.batch_size", "16", "--data.micro_batch_size", "16"],
       "corpus_mb": 3.0, "max_length": 512, "vocab": 8192, "steps": 30, "precision": "bf16-mixed", "accelerator": "gpu"}  # fmt: skip
CPU = {"preset": "tiny", "bench": ["--hidden_size", "64", "--num_layers", "1", "--num_heads", "4", "--vocab_size", "512",
                                   "--micro_batch_size", "2", "--seq_len", "32", "--steps", "2", "--warmup", "1"],
       "fit": ["--model.preset", "tiny", "--model.hidden_size", "64", "--model.num_layers", "2", "--model.num_heads", "4",
               "--data.batch_size", "4", "--data.micro_batch_size", "4", "--data.num_workers", "0"],
       "corpus_mb": 0.15, "max_length": 32, "vocab": 512, "steps": 8, "precision": "32-true", "accelerator": "cpu"}  # fmt: skip


def cli(*args, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "llm_lightning", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def step(report: dict, name: str, run) -> None:
    """Run one step, record its result (or its failure) and how long it took."""
    started = time.perf_counter()
    try:
        report[name] = {"ok": True, **run()}
    except Exception as error:  # noqa: BLE001 - the report says what failed, the others still run
        report[name] = {"ok": False, "error": str(error)[-2000:]}
    report[name]["seconds"] = round(time.perf_counter() - started, 1)
    print(
        f"[gpu_check] {name}: {'ok' if report[name]['ok'] else 'FAILED'} ({report[name]['seconds']} s)",
        flush=True,
    )


def check(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    if result.returncode != 0:
        raise RuntimeError(f"exit {result.returncode}: {result.stderr[-1500:]}")
    return result


def setup() -> dict:
    result = check(cli("setup"))
    return {"summary": result.stdout.strip().splitlines()[-1]}


def bench(sizes: dict, work: Path, compile: bool) -> dict:
    path = work / f"bench_compile_{compile}.json"
    device = "cuda" if sizes["accelerator"] == "gpu" else "cpu"
    args = ["bench", "--preset", sizes["preset"], *sizes["bench"], "--precision", sizes["precision"]]
    check(cli(*args, "--device", device, "--json", path, *(["--compile"] if compile else [])))
    result = json.loads(path.read_text())
    keys = ("tokens_per_s", "mfu", "achieved_tflops", "peak_memory_bytes", "device_name", "step_time_s")
    return {key: result[key] for key in keys}


def flash_attention(sizes: dict) -> dict:
    """Profile a training step and name the attention kernels that ran."""
    from torch.profiler import ProfilerActivity, profile

    from llm_lightning.model import ModelConfig, Transformer

    device = torch.device("cuda" if sizes["accelerator"] == "gpu" else "cpu")
    dtype = torch.bfloat16 if sizes["precision"].startswith("bf16") else torch.float32
    model = Transformer(
        ModelConfig(vocab_size=512, hidden_size=256, num_layers=2, num_heads=4, max_seq_len=256)
    ).to(device)
    ids = torch.randint(0, 512, (2, 257), device=device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with (
        profile(activities=activities) as profiler,
        torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32),
    ):
        model(ids[:, :-1], targets=ids[:, 1:]).backward()
    kernels = sorted({e.key for e in profiler.key_averages() if "attention" in e.key.lower()})
    if not any("flash" in name for name in kernels):
        raise RuntimeError(f"no flash attention kernel ran; attention ran {kernels}")
    return {"attention_kernels": kernels}


def prepare(sizes: dict, work: Path) -> Path:
    from llm_lightning.tools.demo import build_corpus

    raw, data = work / "raw", work / "data"
    build_corpus(raw, sizes["corpus_mb"])
    check(cli("prepare", "--input_dir", raw, "--output_dir", data, "--vocab_size", sizes["vocab"], "--max_length",
              sizes["max_length"], "--num_workers", 2, "--val_fraction", 0.05))  # fmt: skip
    return data


def fit_and_resume(sizes: dict, work: Path, data: Path, strategy: list[str], name: str) -> dict:
    ckpts, total = work / name, sizes["steps"]
    common = [
        "fit", *sizes["fit"], *strategy, "--data.data_dir", data, "--trainer.accelerator", sizes["accelerator"],
        "--trainer.devices", 1, "--trainer.precision", sizes["precision"], "--model.max_steps", total,
        "--model.warmup_steps", 5, "--model.learning_rate", "1e-3", "--eval_interval", total // 2,
        "--checkpoint.every_n_train_steps", total, "--trainer.log_every_n_steps", 5, "--checkpoint.dirpath", ckpts,
        "--trainer.default_root_dir", work / f"{name}_logs",
    ]  # fmt: skip
    check(cli(*common, "--trainer.max_steps", total // 2))
    check(cli(*common, "--trainer.max_steps", total, "--ckpt_path", "last"))
    records = [json.loads(line) for line in (ckpts / "metrics.jsonl").read_text().splitlines()]
    val = {r["step"]: r["val/loss"] for r in records if r["event"] == "val"}
    starts = [r["step"] for r in records if r["event"] == "start"]
    speed = [
        r["train/tokens_per_s"] for r in records if r["event"] == "train" and r.get("train/tokens_per_s")
    ]
    if starts != [0, total // 2] or sorted(val) != [total // 2, total] or not val[total] < val[total // 2]:
        raise RuntimeError(f"unexpected run: starts {starts}, val {val}")
    return {
        "val_loss": val,
        "tokens_per_s": speed[-1] if speed else None,
        "last_is_folder": (ckpts / "last.ckpt").is_dir(),
    }


def run(cpu: bool, out: Path) -> dict:
    sizes = CPU if cpu else GPU
    if not cpu and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device here; pass --cpu for the CPU mode")
    work = out.with_suffix("")
    work.mkdir(parents=True, exist_ok=True)
    report: dict = {"mode": "cpu" if cpu else "gpu", "torch": torch.__version__}
    if torch.cuda.is_available() and not cpu:
        report["device"] = torch.cuda.get_device_name(0)

    def checks() -> None:
        step(report, "setup", setup)
        step(report, "bench", lambda: bench(sizes, work, compile=False))
        step(report, "bench_compile", lambda: bench(sizes, work, compile=True))
        step(report, "flash_attention", lambda: flash_attention(sizes))

    def fits() -> None:
        data = prepare(sizes, work)
        step(
            report, "fit_ddp", lambda: fit_and_resume(sizes, work, data, ["--trainer.strategy", "ddp"], "ddp")
        )
        fsdp = ["--config", REPO / "configs" / "strategy" / "fsdp.yaml"]
        step(report, "fit_fsdp", lambda: fit_and_resume(sizes, work, data, fsdp, "fsdp"))

    if cpu:  # the two halves side by side: mostly process start-up, which the second core halves
        with ThreadPoolExecutor(2) as pool:
            for done in [pool.submit(checks), pool.submit(fits)]:
                done.result()
    else:  # one after the other, so no step's timing shares the GPU
        checks()
        fits()
    report["ok"] = all(value["ok"] for value in report.values() if isinstance(value, dict))
    out.write_text(json.dumps(report, indent=2) + "\n")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="tiny sizes on the CPU (what the test suite runs)")
    parser.add_argument("--out", type=Path, default=Path("gpu_check.json"), help="the JSON report")
    args = parser.parse_args(argv)
    report = run(args.cpu, args.out)
    print(f"[gpu_check] {'all passed' if report['ok'] else 'FAILED'}: {args.out}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
