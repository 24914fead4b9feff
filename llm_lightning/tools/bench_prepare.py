"""`llm-lightning bench-prepare`: how fast `prepare` encodes, and how that scales.

On a generated corpus (synthetic English-like text, or documents cut from `--source FILE`,
spread over .txt, .md and .jsonl files in nested folders) it measures, each as the median
of `--repeats` runs in a fresh process:

- `prepare` end to end (reading, encoding, writing; the tokenizer is trained once beforehand
  and reused) with 1 and with 2 worker processes: tokens/s and peak memory;
- the ceiling: the tokenizer alone on the same documents already in memory
  (`tokenizers` `encode_batch_fast`, or tiktoken's batch encode), with 1 and 2 threads;
- scaling: the same `prepare` on a corpus 10x smaller, to show that time grows with the corpus
  and peak memory does not.

Peak memory is the largest resident set (VmHWM) of the main process and, separately, of the
largest worker process. CPU seconds (main process plus workers) are reported beside wall time:
on a machine shared with other work, they still show what the pipeline costs.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from llm_lightning.data.sources import find_files, iter_pieces
from llm_lightning.data.tokenizer import KINDS, train_tokenizer
from llm_lightning.errors import UserError

_COMMON = """the of and to a in is it you that he was for on are with as I his they be at one have this
from or had by hot word but what some we can out other were all there when up use your how said an each she
which do their time if will way about many then them write would like so these her long make thing see him two
has look more day could go come did number sound no most people my over know water than call first who may down
side been now find any new work part take get place made live where after back little only round man year came
show every good me give our under name very through just form sentence great think say help low line differ turn
cause much mean before move right boy old too same tell does set three want air well also play small end put home
read hand port large spell add even land here must big high such follow act why ask men change went light kind
off need house picture try us again animal point mother world near build self earth father head stand own page
should country found answer school grow study still learn plant cover food sun four between state keep eye never
last let thought city tree cross farm hard start might story saw far sea draw left late run don't while press
close night real life few north 1998 2024 42 3.5 100 12"""
COMMON_WORDS = _COMMON.split()

# A run of `prepare` in a fresh process: prints one JSON line with its time and memory.
# Peak memory is VmHWM from /proc (ru_maxrss would also count the parent's pages at fork time),
# polled for the worker processes while they run.
_PREPARE_RUN = """
import contextlib, io, json, os, resource, sys, threading, time
from llm_lightning.data.prepare import prepare

def peak_mb(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024
    except (OSError, StopIteration):
        return 0.0

def watch_workers(peaks, done):
    me = str(os.getpid())
    while not done.wait(0.2):
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/stat") as f:
                    parent = f.read().rsplit(")", 1)[1].split()[1]
            except OSError:
                continue
            if parent == me:
                peaks[pid] = max(peaks.get(pid, 0.0), peak_mb(pid))

a = json.loads(sys.argv[1])
me = resource.getrusage(resource.RUSAGE_SELF)
cpu_before = me.ru_utime + me.ru_stime  # imports are not part of the run
peaks, done = {}, threading.Event()
watcher = threading.Thread(target=watch_workers, args=(peaks, done), daemon=True)
watcher.start()
start = time.perf_counter()
with contextlib.redirect_stdout(io.StringIO()):
    out = prepare(a["input_dir"], a["output_dir"], tokenizer=a["tokenizer"], num_workers=a["workers"],
                  overwrite=True, progress=False)
seconds = time.perf_counter() - start
done.set()
watcher.join()
meta = json.loads((out / "metadata.json").read_text())
me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
print(json.dumps({
    "seconds": seconds,
    "cpu_seconds": me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime - cpu_before,
    "cpu_main_seconds": me.ru_utime + me.ru_stime - cpu_before,
    "tokens": sum(meta["num_tokens"].values()),
    "documents": sum(meta["num_documents"].values()),
    "peak_main_mb": peak_mb("self"),
    "peak_worker_mb": max(peaks.values(), default=0.0),
}))
"""

# The tokenizer alone on the same documents, already in memory, with N threads.
_CEILING_RUN = """
import json, os, sys, time
a = json.loads(sys.argv[1])
os.environ["TOKENIZERS_PARALLELISM"] = "true" if a["threads"] > 1 else "false"
os.environ["RAYON_NUM_THREADS"] = str(a["threads"])
from llm_lightning.data.sources import find_files, iter_pieces
from llm_lightning.data.tokenizer import HFTokenizer, load_tokenizer
from llm_lightning.data.prepare import BATCH_CHARS
tok = load_tokenizer(a["tokenizer"])
batches, batch, chars = [], [], 0
for piece in iter_pieces(a["input_dir"], find_files(a["input_dir"]), block_chars=a["block_chars"]):
    batch.append(piece.text)
    chars += len(piece.text)
    if chars >= BATCH_CHARS:
        batches.append(batch)
        batch, chars = [], 0
batches.append(batch)
start, cpu = time.perf_counter(), time.process_time()
tokens = 0
for batch in batches:
    if isinstance(tok, HFTokenizer):
        tokens += sum(len(e.ids) for e in tok.hf.encode_batch_fast(batch, add_special_tokens=False))
    else:
        tokens += sum(map(len, tok.encoding.encode_ordinary_batch(batch, num_threads=a["threads"])))
print(json.dumps({"seconds": time.perf_counter() - start, "cpu_seconds": time.process_time() - cpu, "tokens": tokens}))
"""


# ---------------------------------------------------------------------------------------------
# Corpus


def synthetic_documents(rng: random.Random, vocabulary_seed: int) -> Callable[[], str]:
    """A function making one English-like document: common words and a long tail of made-up ones.

    The vocabulary depends only on `vocabulary_seed`, so corpora of different sizes (and
    documents drawn by different `rng`s) share it, as parts of one language would.
    """
    vocab_rng = random.Random(vocabulary_seed)
    syllables = [c + v for c in "bcdfghjklmnprstvwyz" for v in ("a", "e", "i", "o", "u", "ai", "ou", "ee")]
    made_up = {
        "".join(vocab_rng.choice(syllables) for _ in range(vocab_rng.randint(1, 4))) for _ in range(30000)
    }
    words = COMMON_WORDS + sorted(made_up)
    words += [w.capitalize() for w in vocab_rng.sample(words, len(words) // 10)]  # names
    cumulative, total = [], 0.0
    for rank in range(len(words)):
        total += 1 / (rank + 10) ** 1.05  # Zipf-like frequencies
        cumulative.append(total)

    def sentence() -> str:
        chosen = rng.choices(words, cum_weights=cumulative, k=rng.randint(4, 22))
        chosen[0] = chosen[0].capitalize()
        if len(chosen) > 9:
            chosen[len(chosen) // 2] += ","
        return " ".join(chosen) + rng.choice(".....?!")

    def document() -> str:
        paragraphs = (
            " ".join(sentence() for _ in range(rng.randint(2, 9))) for _ in range(rng.randint(1, 8))
        )
        return "\n\n".join(paragraphs) + "\n"

    return document


def source_documents(rng: random.Random, text: str) -> Callable[[], str]:
    """A function making one document from `text`: a run of its lines, some with words shuffled."""
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        raise UserError("--source has no text; give a text file")

    def document() -> str:
        start = rng.randrange(len(lines))
        run = lines[start : start + rng.randint(10, 120)]
        out = []
        for line in run:
            if rng.random() < 0.3:
                words = line.split()
                rng.shuffle(words)
                line = " ".join(words)
            out.append(line)
        return "\n".join(out) + "\n"

    return document


def write_corpus(folder: Path, size_bytes: int, seed: int, source: Path | None = None, part: int = 0) -> None:
    """About `size_bytes` of documents: most in 1 MB .jsonl files, the rest one per .txt/.md file.

    `part` picks other documents of the same language (same `seed`).
    """
    rng = random.Random(f"{seed}-{part}")
    if source:
        make = source_documents(rng, source.read_text(encoding="utf-8"))
    else:
        make = synthetic_documents(rng, vocabulary_seed=seed)
    written, lines, line_bytes, n = 0, [], 0, 0
    while written < size_bytes:
        doc = make()
        size = len(doc.encode("utf-8"))
        if rng.random() < 0.3:
            ext = ".md" if n % 5 == 0 else ".txt"
            path = folder / f"docs/{n % 7}/{n % 3}/doc{n:06d}{ext}"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(doc, encoding="utf-8")
        else:
            lines.append(json.dumps({"text": doc, "id": n}, ensure_ascii=False))
            line_bytes += size
            if line_bytes >= 1 << 20:
                _write_jsonl(folder, lines)
                lines, line_bytes = [], 0
        written += size
        n += 1
    if lines:
        _write_jsonl(folder, lines)


def _write_jsonl(folder: Path, lines: list[str]) -> None:
    (folder / "jsonl").mkdir(parents=True, exist_ok=True)
    index = len(list((folder / "jsonl").iterdir()))
    (folder / "jsonl" / f"part{index:05d}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------------------------
# Runs


def _run(code: str, args: dict, env: dict | None = None) -> dict:
    """Run `code` in a fresh Python; also measure how busy other processes kept the CPUs meanwhile."""
    busy, ours, started = _busy_cpu_seconds(), _children_cpu_seconds(), time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-c", code, json.dumps(args)],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
    )
    if result.returncode != 0:
        raise RuntimeError(f"benchmark run failed:\n{result.stderr}")
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    others = (_busy_cpu_seconds() - busy) - (_children_cpu_seconds() - ours)
    measured["other_cpus"] = max(others, 0.0) / (time.perf_counter() - started)
    return measured


def _busy_cpu_seconds() -> float:
    """CPU time all processes on this machine have used (Linux /proc/stat), 0 where unknown."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except OSError:
        return 0.0
    idle = fields[3] + fields[4]  # idle, iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _median(runs: list[dict]) -> dict:
    keys = runs[0].keys()
    med = {key: statistics.median(run[key] for run in runs) for key in keys}
    med["tokens_per_s"] = statistics.median(run["tokens"] / run["seconds"] for run in runs)
    return med


def run_benchmark(args: argparse.Namespace, work: Path) -> dict:
    size = int(args.size_mb * 2**20)
    corpora = {"base": work / "corpus", "small": work / "corpus_small"}
    started = time.perf_counter()
    write_corpus(corpora["base"], size, args.seed, args.source)
    write_corpus(corpora["small"], size // 10, args.seed, args.source, part=1)
    _log(
        f"generated corpora of {args.size_mb:g} MB and {args.size_mb / 10:g} MB in {time.perf_counter() - started:.0f} s"
    )

    started = time.perf_counter()
    files = find_files(corpora["base"])
    texts = (p.text for p in iter_pieces(corpora["base"], files))
    tok = train_tokenizer(args.tokenizer_type, _capped(texts, args.train_chars), args.vocab_size)
    tok.save(work / "tokenizer")
    _log(
        f"trained a {tok.kind} tokenizer of {tok.vocab_size:,} tokens in {time.perf_counter() - started:.0f} s"
    )

    load_before = os.getloadavg()[0]
    runs: dict[str, list[dict]] = {}
    kept, discarded = 0, 0
    while kept < args.repeats:
        round_ = _one_round(args, work, corpora)
        busiest = max(run["other_cpus"] for run in round_.values())
        if args.quiet_only is not None and busiest > args.quiet_only:
            discarded += 1
            _log(f"round discarded: other processes kept {busiest:.2f} CPUs busy")
            if discarded >= args.max_discarded:
                raise UserError(
                    f"the machine was never quiet enough for {args.repeats} rounds ({discarded} discarded); "
                    "raise --quiet_only or try later"
                )
            continue
        for name, run in round_.items():
            runs.setdefault(name, []).append(run)
        kept += 1
        _log(f"round {kept}/{args.repeats} done")
    medians = {name: _median(r) for name, r in runs.items()}
    return {
        "size_mb": args.size_mb,
        "tokenizer": {"kind": tok.kind, "vocab_size": tok.vocab_size},
        "cpu_count": os.cpu_count(),
        "load_before": load_before,
        "load_after": os.getloadavg()[0],
        "discarded_rounds": discarded,
        "median": medians,
        "runs": runs,
    }


def _one_round(args: argparse.Namespace, work: Path, corpora: dict[str, Path]) -> dict[str, dict]:
    """Each measurement once, back to back."""
    round_ = {f"prepare_{w}w": _prepare(work, corpora["base"], w) for w in args.workers}
    for threads in (1, 2):
        ceiling = {
            "input_dir": str(corpora["base"]),
            "tokenizer": str(work / "tokenizer"),
            "threads": threads,
        }
        round_[f"ceiling_{threads}t"] = _run(_CEILING_RUN, {**ceiling, "block_chars": 16 * 2049})
    round_["prepare_small"] = _prepare(work, corpora["small"], max(args.workers))
    return round_


def _capped(texts, limit: int):
    total = 0
    for text in texts:
        yield text
        total += len(text)
        if total >= limit:
            return


def _prepare(work: Path, corpus: Path, workers: int) -> dict:
    args = {
        "input_dir": str(corpus),
        "output_dir": str(work / "out"),
        "tokenizer": str(work / "tokenizer"),
        "workers": workers,
    }
    return _run(_PREPARE_RUN, args)


def _log(message: str) -> None:
    print(f"[bench-prepare] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Report


def report(result: dict, workers: list[int]) -> str:
    med = result["median"]
    one, many = med[f"prepare_{min(workers)}w"], med[f"prepare_{max(workers)}w"]
    small, ceiling = med["prepare_small"], med["ceiling_2t"]
    lines = [
        f"corpus {result['size_mb']:g} MB: {one['documents']:,.0f} documents, {one['tokens']:,.0f} tokens "
        f"({result['tokenizer']['kind']}, vocabulary {result['tokenizer']['vocab_size']:,}); {result['cpu_count']} "
        f"CPUs, load average {result['load_before']:.1f} before and {result['load_after']:.1f} after; "
        f"medians of {len(result['runs'][f'prepare_{min(workers)}w'])} runs"
        + (f" ({result['discarded_rounds']} busier rounds discarded)" if result["discarded_rounds"] else ""),
        "",
        f"{'run':<42}{'tokens/s':>11}{'wall s':>8}{'CPU s':>8}{'others':>8}{'peak MB main':>14}{'worker':>8}",
    ]
    rows = [(f"prepare, {w} worker{'s' * (w > 1)}", med[f"prepare_{w}w"]) for w in workers]
    rows += [
        ("tokenizer alone, in memory, 1 thread", med["ceiling_1t"]),
        ("tokenizer alone, in memory, 2 threads", ceiling),
        (f"prepare, {max(workers)} workers, corpus 10x smaller", small),
    ]
    for name, m in rows:
        memory = f"{m['peak_main_mb']:>14.0f}{m['peak_worker_mb']:>8.0f}" if "peak_main_mb" in m else ""
        lines.append(
            f"{name:<42}{m['tokens_per_s']:>11,.0f}{m['seconds']:>8.2f}{m['cpu_seconds']:>8.2f}"
            f"{m['other_cpus']:>8.2f}{memory}"
        )
    lines.append(
        "(CPU s: this run's processes; others: CPUs kept busy by other processes meanwhile, 0 = quiet)"
    )
    lines.append("")
    if len(workers) > 1:
        lines.append(
            f"{max(workers)} workers / {min(workers)} worker: {many['tokens_per_s'] / one['tokens_per_s']:.2f}x "
            f"(target >= 1.7x); CPU time {many['cpu_seconds'] / one['cpu_seconds']:.2f}x"
        )
    lines.append(
        f"end to end / ceiling ({max(workers)} workers vs 2 threads): "
        f"{many['tokens_per_s'] / ceiling['tokens_per_s']:.0%} (target >= 70%); the tokenizer's share of "
        f"prepare's CPU time with 1 worker: {med['ceiling_1t']['cpu_seconds'] / one['cpu_seconds']:.0%}"
    )
    lines.append(
        f"10x the corpus: {many['tokens'] / small['tokens']:.1f}x tokens, {many['seconds'] / small['seconds']:.1f}x "
        f"time, {many['peak_main_mb'] / small['peak_main_mb']:.2f}x peak memory of the main process, "
        f"{many['peak_worker_mb'] / small['peak_worker_mb']:.2f}x of a worker"
    )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llm-lightning bench-prepare",
        description="Benchmark `llm-lightning prepare` on a generated corpus: tokens/s with 1 and 2 workers, "
        "the tokenizer's own speed as the ceiling, peak memory, and a 10x smaller corpus for scaling.",
    )
    add = parser.add_argument
    # fmt: off
    add("--size_mb", type=float, default=20, metavar="MB", help="size of the generated corpus (default: 20)")
    add("--source", type=Path, metavar="FILE",
        help="make documents from runs of this text file's lines instead of synthetic English")
    add("--tokenizer_type", choices=KINDS, default="bpe", metavar="KIND", help="tokenizer kind (default: bpe)")
    add("--vocab_size", type=int, default=32000, metavar="N", help="vocabulary size (default: 32000)")
    add("--train_chars", type=int, default=10_000_000, metavar="N",
        help="characters to train the tokenizer on, once (default: 10,000,000)")
    add("--workers", type=int, nargs="+", default=[1, 2], metavar="N", help="worker counts to time (default: 1 2)")
    add("--repeats", type=int, default=3, metavar="N", help="runs of each measurement; medians are reported (default: 3)")
    add("--seed", type=int, default=0, metavar="N", help="seed of the generated corpus (default: 0)")
    add("--quiet_only", type=float, metavar="CPUS",
        help="on a shared machine: discard and repeat a round of runs during which other processes kept more "
        "than this many CPUs busy (default: keep every round)")
    add("--max_discarded", type=int, default=20, metavar="N",
        help="give up after discarding this many rounds (default: 20)")
    add("--work_dir", type=Path, metavar="DIR", help="where to put corpora and outputs (default: a temporary folder)")
    add("--keep", action="store_true", help="keep --work_dir's contents afterwards")
    add("--json", type=Path, metavar="FILE", help="also write all measurements to this JSON file")
    # fmt: on
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.source is not None and not args.source.is_file():
        raise UserError(f"--source {args.source} is not a file; give a text file or leave it out")
    if args.size_mb <= 0 or args.repeats < 1 or min(args.workers) < 1:
        raise UserError("--size_mb, --repeats and --workers must be positive")
    args.workers = sorted(set(args.workers))
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="bench-prepare-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        result = run_benchmark(args, work)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(report(result, args.workers))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
