"""`make demo`: from raw text to a trained model, sampled, monitored and exported, on one CPU.

Nothing is downloaded. The corpus is real English already on the machine:

- the docstrings of Python's standard library          -> stdlib/*.txt   (one file per module)
- Python's own reference topics (`pydoc_data.topics`)  -> python_topics.json (a list of objects)
- the descriptions of the installed Python packages    -> packages/*.md
- the system's license texts (/usr/share/common-licenses, /usr/share/doc/*/copyright),
  where the machine has them                           -> licenses/*.txt, copyright.jsonl

Then each stage runs the real command line (`python -m llm_lightning ...`) in a subprocess:
prepare (bpe), fit (the tiny preset, default precision), validate, generate, export, monitor.
Everything lands in `demo_run/` (or --output_dir).
"""

from __future__ import annotations

import ast
import hashlib
import json
import shlex
import shutil
import subprocess
import sys
import sysconfig
import time
from collections.abc import Iterator
from pathlib import Path

from llm_lightning.errors import ArgumentParser, UserError

MARKER = ".llm-lightning-demo"  # marks a folder the demo made, so a re-run may replace it
SKIP_STDLIB = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "lib2to3"}
PROMPT = "The function returns"


# ------------------------------------------------------------------------------------ the corpus


def stdlib_docstrings() -> Iterator[tuple[str, str]]:
    """(module name, its docstrings as one text) for each module of the standard library."""
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root)
        if SKIP_STDLIB & set(relative.parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
            continue
        parts = []
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 40:  # one-liners like "Return x." teach little
                    title = "" if isinstance(node, ast.Module) else f"{node.name}\n\n"
                    parts.append(title + doc)
        if parts:
            yield ".".join(relative.with_suffix("").parts), "\n\n".join(parts) + "\n"


def python_topics() -> list[dict]:
    """Python's language reference as pydoc shows it (part of the standard library)."""
    try:
        from pydoc_data.topics import topics
    except ImportError:
        return []
    return [{"title": name, "text": text} for name, text in sorted(topics.items())]


def package_descriptions() -> Iterator[tuple[str, str]]:
    """(package name, long description) of the installed distributions that have one."""
    import importlib.metadata

    seen = set()
    for dist in sorted(importlib.metadata.distributions(), key=lambda d: (d.metadata["Name"] or "").lower()):
        name = dist.metadata["Name"]
        text = dist.metadata.get_payload() or dist.metadata.get("Description") or ""
        if name and name.lower() not in seen and len(text) > 500:
            seen.add(name.lower())
            yield name, text


def license_texts() -> Iterator[tuple[str, str]]:
    folder = Path("/usr/share/common-licenses")
    if folder.is_dir():
        for path in sorted(folder.iterdir()):
            if path.is_file() and not path.is_symlink():
                yield path.name, path.read_text(encoding="utf-8", errors="replace")


def copyright_texts() -> Iterator[str]:
    """Debian copyright files, each distinct text once (many packages repeat the same licence)."""
    seen = set()
    for path in sorted(Path("/usr/share/doc").glob("*/copyright")):
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        digest = hashlib.sha1(text.encode()).hexdigest()
        if digest not in seen:
            seen.add(digest)
            yield text


class CorpusWriter:
    """Writes files under a folder until a character budget is spent."""

    def __init__(self, root: Path, budget_chars: int) -> None:
        self.root, self.left = root, budget_chars
        self.files: dict[str, int] = {}  # extension -> files written
        self.chars = 0

    def take(self, text: str) -> str:
        text = text[: max(self.left, 0)]
        self.left -= len(text)
        self.chars += len(text)
        return text

    def write(self, relative: str, text: str) -> None:
        text = self.take(text)
        if not text:
            return
        path = self.root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        self.files[path.suffix] = self.files.get(path.suffix, 0) + 1


def safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in name)


def build_corpus(root: Path, megabytes: float) -> CorpusWriter:
    """Write the demo corpus; each source gets a share of the budget so every format appears."""
    total = int(megabytes * 1_000_000)
    writer = CorpusWriter(root, total)

    def until(share: float) -> int:  # the character count at which a source stops
        return min(writer.chars + int(total * share), total)

    stop = until(0.5)
    for module, text in stdlib_docstrings():
        if writer.chars >= stop:
            break
        writer.write(f"stdlib/{safe_name(module)}.txt", text)

    # Python's reference topics: half as one .json list, half as .jsonl lines.
    stop, topics = until(0.2), []
    for item in python_topics():
        if writer.chars >= stop:
            break
        topics.append({"title": item["title"], "text": writer.take(item["text"])})
    half = (len(topics) + 1) // 2
    if topics:
        (root / "python_topics.json").write_text(json.dumps(topics[:half], indent=1), encoding="utf-8")
        writer.files[".json"] = 1
    if topics[half:]:
        lines = "".join(json.dumps(item) + "\n" for item in topics[half:])
        (root / "python_topics.jsonl").write_text(lines, encoding="utf-8")
        writer.files[".jsonl"] = 1

    stop = until(0.2)
    for name, text in package_descriptions():
        if writer.chars >= stop:
            break
        writer.write(f"packages/{safe_name(name)}.md", text)

    # Licence texts where the system has them (Debian/Ubuntu), in what is left.
    stop = until(0.05)
    for name, text in license_texts():
        if writer.chars >= stop:
            break
        writer.write(f"licenses/{safe_name(name)}.txt", text)
    lines = [json.dumps({"text": writer.take(text)}) for text in copyright_texts() if writer.left > 0]
    if lines:
        (root / "copyright.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return writer


# ---------------------------------------------------------------------------------------- stages


def run(*args) -> None:
    """Run `python -m llm_lightning ARGS` as a user would; stop the demo if it fails."""
    args = [str(arg) for arg in args]
    print(f"\n$ llm-lightning {shlex.join(args)}", flush=True)
    result = subprocess.run([sys.executable, "-m", "llm_lightning", *args])
    if result.returncode != 0:
        raise SystemExit(f"demo: `llm-lightning {args[0]}` failed (exit code {result.returncode})")


def prepare_output(output: Path) -> None:
    """A fresh output folder; an earlier demo's is replaced, anything else is left alone."""
    if output.exists():
        if not (output / MARKER).exists():
            raise UserError(
                f"--output_dir {output}: exists and was not made by the demo; choose another folder"
            )
        shutil.rmtree(output)
    output.mkdir(parents=True)
    (output / MARKER).write_text("made by `make demo`; safe to delete\n")


def banner(text: str) -> None:
    print(f"\n{'=' * 78}\n{text}\n{'=' * 78}", flush=True)


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="python -m llm_lightning.tools.demo",
        description="End-to-end demo on this machine's own text: prepare, fit, validate, generate, "
        "export, monitor. No downloads.",
    )
    parser.add_argument("--output_dir", type=Path, default=Path("demo_run"), help="where everything goes")
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps to train (default 300)")
    parser.add_argument(
        "--minutes", type=float, default=5.0, help="stop training after this long (default 5)"
    )
    parser.add_argument("--corpus_mb", type=float, default=3.0, help="corpus size in MB of text (default 3)")
    parser.add_argument("--vocab_size", type=int, default=4096, help="bpe vocabulary (default 4096)")
    parser.add_argument("--max_length", type=int, default=256, help="tokens per sequence (default 256)")
    parser.add_argument("--batch_size", type=int, default=8, help="sequences per optimizer step (default 8)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.steps < 1 or args.minutes <= 0 or args.corpus_mb <= 0:
        raise UserError("--steps, --minutes and --corpus_mb must be positive")
    output = args.output_dir.resolve()
    raw, data, ckpts = output / "raw_text_data", output / "processed_data", output / "checkpoints"
    timings: dict[str, float] = {}
    start = time.perf_counter()

    def lap(stage: str, since: float) -> float:
        timings[stage] = time.perf_counter() - since
        return time.perf_counter()

    banner(f"1/7  corpus: real text already on this machine -> {raw}")
    prepare_output(output)
    corpus = build_corpus(raw, args.corpus_mb)
    formats = ", ".join(f"{n} {ext}" for ext, n in sorted(corpus.files.items()))
    print(f"{corpus.chars / 1e6:.1f} M characters in {formats} files")
    t = lap("corpus", start)

    banner("2/7  prepare: train a bpe tokenizer, tokenize, split train/val")
    run("prepare", "--input_dir", raw, "--output_dir", data, "--tokenizer_type", "bpe",
        "--vocab_size", args.vocab_size, "--max_length", args.max_length, "--stride", args.max_length * 3 // 4,
        "--num_workers", 2, "--val_fraction", 0.02, "--seed", 1337)  # fmt: skip
    t = lap("prepare", t)

    banner(f"3/7  fit: the tiny preset, {args.steps} steps or {args.minutes:g} minutes, default precision")
    eval_every = max(1, args.steps // 4)
    max_time = time.strftime("00:%H:%M:%S", time.gmtime(args.minutes * 60))
    run("fit", "--data.data_dir", data, "--model.preset", "tiny", "--data.batch_size", args.batch_size,
        "--data.micro_batch_size", min(8, args.batch_size), "--data.num_workers", 0,
        "--trainer.max_steps", args.steps, "--trainer.max_time", max_time,
        "--model.learning_rate", "2e-3", "--model.warmup_steps", max(1, args.steps // 10),
        "--eval_interval", eval_every, "--checkpoint.dirpath", ckpts,
        "--checkpoint.every_n_train_steps", 2 * eval_every, "--trainer.log_every_n_steps", max(1, args.steps // 50),
        "--trainer.default_root_dir", output)  # fmt: skip
    t = lap("fit", t)

    banner("4/7  validate: the exact per-token loss of the whole validation split")
    run("validate", "--data.data_dir", data, "--data.micro_batch_size", 8, "--data.num_workers", 0,
        "--ckpt_path", ckpts / "last.ckpt", "--trainer.default_root_dir", output,
        "--trainer.enable_progress_bar", "false")  # fmt: skip
    t = lap("validate", t)

    banner("5/7  generate: a sample from the trained model (KV cache, top-k sampling)")
    run("generate", "--ckpt_path", ckpts / "last.ckpt", "--prompt", PROMPT, "--max_new_tokens", 80,
        "--temperature", 0.8, "--top_k", 50, "--seed", 0)  # fmt: skip
    t = lap("generate", t)

    banner("6/7  export: a Hugging Face Llama folder (transformers loads it)")
    run("export", "--ckpt_path", ckpts / "last.ckpt", "--output_dir", output / "hf_model")
    t = lap("export", t)

    banner("7/7  monitor: the run's state and its loss curves")
    run("monitor", "--checkpoint_dir", ckpts, "--plot", output / "loss.png")
    lap("monitor", t)

    total = time.perf_counter() - start
    banner(f"demo finished in {total / 60:.1f} minutes")
    print("  " + ", ".join(f"{stage} {seconds:.0f} s" for stage, seconds in timings.items()))
    print(f"""
outputs in {output}/
  raw_text_data/    the corpus ({formats})
  processed_data/   tokenizer.json, dataset/train.bin + val.bin, metadata.json
  checkpoints/      checkpoint_step_*.ckpt, last.ckpt, best.ckpt, metrics.jsonl
  hf_model/         config.json, model.safetensors, tokenizer files
  loss.png          loss and learning-rate curves

try next:
  llm-lightning generate --ckpt_path {ckpts}/best.ckpt --prompt "A list is" --temperature 0.7
  llm-lightning monitor --checkpoint_dir {ckpts}
  python -m llm_lightning.tools.demo --steps {2 * args.steps} --minutes {2 * args.minutes:g}    # a longer run""")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UserError as error:
        print(f"demo: error: {error}", file=sys.stderr)
        sys.exit(UserError.exit_code)
