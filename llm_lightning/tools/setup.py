"""`llm-lightning setup`: check that the installation works, and say what this machine offers.

Each check prints one line marked `ok`, `--` (information: missing but optional) or `FAIL`
(something training needs is broken). The exit code is 1 when any check failed, so the
command also works as a smoke test in scripts and CI.
"""

from __future__ import annotations

import importlib
import platform
import sys
import time
from pathlib import Path

import torch

from llm_lightning.errors import ArgumentParser

OK, INFO, FAIL = "ok", "--", "FAIL"
REQUIRED = (
    "torch",
    "lightning",
    "tokenizers",
    "tiktoken",
    "torchmetrics",
    "jsonargparse",
    "numpy",
    "safetensors",
)
OPTIONAL = ("matplotlib", "transformers", "tensorboard")


class Report:
    """Collects check lines and counts failures."""

    def __init__(self) -> None:
        self.failures: list[str] = []

    def section(self, title: str) -> None:
        print(f"\n{title}")

    def line(self, status: str, text: str) -> None:
        if status == FAIL:
            self.failures.append(text)
        print(f"  [{status:>4}] {text}", flush=True)


def check_packages(report: Report) -> None:
    report.section("packages")
    report.line(OK, f"python {platform.python_version()} ({sys.executable})")
    for name in REQUIRED + OPTIONAL:
        try:
            module = importlib.import_module(name)
        except Exception as error:  # a broken install raises more than ImportError
            status = FAIL if name in REQUIRED else INFO
            report.line(status, f"{name}: not importable ({type(error).__name__}: {error})")
            continue
        version = getattr(module, "__version__", "?")
        extra = ""
        if name == "torch":
            extra = f" (CUDA {torch.version.cuda})" if torch.version.cuda else " (CPU build)"
        report.line(OK, f"{name} {version}{extra}")


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def check_devices(report: Report) -> list[torch.device]:
    """Report the CPU and GPUs; return the devices to run the model check on."""
    report.section("devices")
    flags = cpu_flags()
    fast_bf16 = sorted(flags & {"avx512_bf16", "amx_bf16"})
    report.line(
        OK,
        f"cpu: {platform.machine()}, {torch.get_num_threads()} threads, "
        f"ISA {torch.backends.cpu.get_cpu_capability()}",
    )
    if fast_bf16:
        report.line(OK, f"cpu bf16: fast ({', '.join(fast_bf16)}): bf16-mixed is the default on CPU")
    else:
        report.line(
            INFO, "cpu bf16: no avx512_bf16/amx, so bf16 is emulated (slow): 32-true is the default on CPU"
        )
    devices = [torch.device("cpu")]
    try:
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception as error:  # a driver/runtime mismatch raises here
        report.line(FAIL, f"cuda: present but unusable ({error})")
        return devices
    if count == 0:
        report.line(INFO, "cuda: no GPU visible" + ("" if torch.version.cuda else " (CPU build of torch)"))
    for index in range(count):
        props = torch.cuda.get_device_properties(index)
        bf16 = "bf16" if torch.cuda.is_bf16_supported() else "no bf16 (use 16-mixed)"
        report.line(
            OK,
            f"cuda:{index}: {props.name}, {props.total_memory / 2**30:.0f} GiB, "
            f"compute {props.major}.{props.minor}, {bf16}",
        )
        devices.append(torch.device("cuda", index))
    return devices


def sdpa_kernels(device: torch.device) -> dict[str, bool]:
    """Which scaled-dot-product-attention kernels run on `device` (each tried alone)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    # Flash and memory-efficient kernels on GPUs want half precision; the CPU flash kernel takes fp32.
    dtype = torch.float32 if device.type == "cpu" else torch.float16
    q = torch.randn(1, 4, 64, 64, device=device, dtype=dtype)
    usable = {}
    backends = {
        "flash": SDPBackend.FLASH_ATTENTION,
        "mem-efficient": SDPBackend.EFFICIENT_ATTENTION,
        "math": SDPBackend.MATH,
    }
    if device.type == "cuda":
        backends["cudnn"] = SDPBackend.CUDNN_ATTENTION
    for name, backend in backends.items():
        try:
            with sdpa_kernel(backend):
                torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
            usable[name] = True
        except RuntimeError:
            usable[name] = False
    return usable


def check_attention(report: Report, devices: list[torch.device]) -> None:
    report.section("attention kernels (scaled_dot_product_attention)")
    for device in devices:
        usable = sdpa_kernels(device)
        names = ", ".join(f"{name} {'yes' if ok else 'no'}" for name, ok in usable.items())
        report.line(OK if any(usable.values()) else FAIL, f"{device}: {names}")


def check_distributed(report: Report, devices: list[torch.device]) -> None:
    report.section("distributed backends")
    import torch.distributed as dist

    if not dist.is_available():
        report.line(INFO, "torch.distributed not built in: single-process training only")
        return
    gpus = sum(d.type == "cuda" for d in devices)
    report.line(OK if dist.is_gloo_available() else INFO, f"gloo (CPU DDP): {_yes(dist.is_gloo_available())}")
    nccl_needed = gpus > 0 and not dist.is_nccl_available()
    report.line(
        FAIL if nccl_needed else (OK if dist.is_nccl_available() else INFO),
        f"nccl (GPU DDP/FSDP): {_yes(dist.is_nccl_available())}",
    )
    report.line(OK if dist.is_mpi_available() else INFO, f"mpi: {_yes(dist.is_mpi_available())}")


def _yes(flag: bool) -> str:
    return "available" if flag else "not available"


def check_tokenizers(report: Report) -> None:
    """Train each tokenizer kind on a few lines and round-trip a sentence."""
    report.section("tokenizers")
    from llm_lightning.data.tokenizers import KINDS, train_tokenizer

    texts = ["The quick brown fox jumps over the lazy dog."] * 20
    for kind in KINDS:
        try:
            tokenizer = train_tokenizer(kind, iter(texts), 300)
            ids = tokenizer.encode(texts[0])
            back = tokenizer.decode(ids)
            assert back.strip() == texts[0], back
            report.line(OK, f"{kind}: trains, encodes and decodes")
        except Exception as error:
            report.line(FAIL, f"{kind}: {type(error).__name__}: {error}")


def model_step(device: torch.device, dtype: torch.dtype | None) -> float:
    """Forward and backward of a tiny Transformer; returns the seconds taken. Raises on trouble."""
    from llm_lightning.model import ModelConfig, Transformer

    torch.manual_seed(0)
    config = ModelConfig(
        vocab_size=256, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, max_seq_len=64
    )
    model = Transformer(config).to(device)
    ids = torch.randint(0, 256, (2, 64), device=device)
    _forward_backward(model, ids, device, dtype)  # warm-up: the first call pays one-off setup costs
    start = time.perf_counter()
    _forward_backward(model, ids, device, dtype)
    return time.perf_counter() - start


def _forward_backward(model, ids: torch.Tensor, device: torch.device, dtype: torch.dtype | None) -> None:
    model.zero_grad(set_to_none=True)
    with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        logits = model(ids[:, :-1])
    loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    grads = [p.grad for p in model.parameters()]
    if not torch.isfinite(loss) or any(g is None or not torch.isfinite(g).all() for g in grads):
        raise RuntimeError(f"non-finite loss or gradients (loss {loss.item()})")


def check_model(report: Report, devices: list[torch.device]) -> None:
    report.section("model: forward + backward of a tiny Transformer")
    for device in devices:
        variants: list[tuple[str, torch.dtype | None]] = [("fp32", None), ("bf16 autocast", torch.bfloat16)]
        if device.type == "cuda":
            variants.append(("fp16 autocast", torch.float16))
            if not torch.cuda.is_bf16_supported():
                variants.remove(("bf16 autocast", torch.bfloat16))
        for label, dtype in variants:
            try:
                seconds = model_step(device, dtype)
                report.line(OK, f"{device} {label}: {1000 * seconds:.0f} ms")
            except Exception as error:
                report.line(FAIL, f"{device} {label}: {type(error).__name__}: {str(error).splitlines()[0]}")


def build_parser() -> ArgumentParser:
    return ArgumentParser(
        prog="llm-lightning setup",
        description="Check the installation: packages, devices, attention kernels, distributed "
        "backends, tokenizers, and a forward/backward pass on each device. Exit code 1 if anything is broken.",
    )


def main(argv: list[str] | None = None) -> int:
    build_parser().parse_args(argv)
    report = Report()
    check_packages(report)
    devices = check_devices(report)
    check_attention(report, devices)
    check_distributed(report, devices)
    check_tokenizers(report)
    check_model(report, devices)
    print()
    if report.failures:
        print(f"setup: {len(report.failures)} problem(s):")
        for failure in report.failures:
            print(f"  - {failure}")
        return 1
    print("setup: everything needed works")
    return 0


if __name__ == "__main__":
    sys.exit(main())
