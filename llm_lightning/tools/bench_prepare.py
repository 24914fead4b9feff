"""`llm-lightning bench-prepare`: how fast `prepare` encodes, and how that scales.

On a generated corpus (synthetic English-like text, or documents cut from `--source FILE`,
spread over .txt, .md and .jsonl files in nested folders) it measures, each as the median
of `--repeats` runs in a fresh process:

- `prepare` end to end (reading, encoding, writing; the tokenizer is trained once beforehand
  and reused) with 1 and with 2 worker processes: tokens/s and peak memory;
- the ceiling: the tokenizer alone on the same documents already in memory
  (`tokenizers` `encode_batch_fast`, or tiktoken's batch encode), with 1 and 2 threads;
- scaling: the same `prepare` on a corpus 10x smaller, to show that time grows with the corpus
  and peak memory does not;
- input formats (`--formats jsonl.zst parquet`): `prepare` with the most workers on the same
  documents written as zstd-compressed JSON lines or Parquet (synthetic_corpus.py), so the
  cost of decompressing and decoding each format shows beside plain files.

Peak memory is the largest resident set (VmHWM) of the main process and, separately, of the
largest worker process. CPU seconds (main process plus workers) are reported beside wall time:
on a machine shared with other work, they still show what the pipeline costs.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import multiprocessing
import os
import resource
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from llm_lightning.data.prepare import prepare
from llm_lightning.data.prepare.encode import BATCH_CHARS
from llm_lightning.data.sources import find_files, iter_pieces
from llm_lightning.data.tokenizers import KINDS, HFTokenizer, load_tokenizer, train_tokenizer
from llm_lightning.errors import ArgumentParser, UserError
from llm_lightning.tools.synthetic_corpus import FORMATS, write_corpus

# ---------------------------------------------------------------------------------------------
# Measurements, each run in a fresh (spawned) process


def peak_mb(pid: str | int) -> float:
    """VmHWM of a process, from /proc (ru_maxrss would also count a parent's pages at fork time)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024
    except (OSError, StopIteration):
        return 0.0


def _watch_children(peaks: dict, done: threading.Event) -> None:
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


def _cpu_seconds(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def measure_prepare(input_dir: str, output_dir: str, tokenizer: str, workers: int) -> dict:
    """One `prepare` run: time, CPU, tokens, peak memory of this process and of its workers."""
    cpu_before = _cpu_seconds(resource.RUSAGE_SELF)  # imports are not part of the run
    peaks, done = {}, threading.Event()
    watcher = threading.Thread(target=_watch_children, args=(peaks, done), daemon=True)
    watcher.start()
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        out = prepare(
            input_dir, output_dir, tokenizer=tokenizer, num_workers=workers, overwrite=True, progress=False
        )
    seconds = time.perf_counter() - start
    done.set()
    watcher.join()
    meta = json.loads((out / "metadata.json").read_text())
    main = _cpu_seconds(resource.RUSAGE_SELF) - cpu_before
    return {
        "seconds": seconds,
        "cpu_seconds": main + _cpu_seconds(resource.RUSAGE_CHILDREN),
        "cpu_main_seconds": main,
        "tokens": sum(meta["num_tokens"].values()),
        "documents": sum(meta["num_documents"].values()),
        "peak_main_mb": peak_mb("self"),
        "peak_worker_mb": max(peaks.values(), default=0.0),
    }


def measure_ceiling(input_dir: str, tokenizer: str, threads: int, block_chars: int) -> dict:
    """The tokenizer alone on the same documents, already in memory, with `threads` threads."""
    os.environ["TOKENIZERS_PARALLELISM"] = "true" if threads > 1 else "false"
    os.environ["RAYON_NUM_THREADS"] = str(threads)  # read when the thread pool first starts
    tok = load_tokenizer(tokenizer)
    batches, batch, chars = [], [], 0
    for piece in iter_pieces(input_dir, find_files(input_dir), block_chars=block_chars):
        batch.append(piece.text)
        chars += len(piece.text)
        if chars >= BATCH_CHARS:
            batches.append(batch)
            batch, chars = [], 0
    batches.append(batch)
    start, cpu, tokens = time.perf_counter(), time.process_time(), 0
    for batch in batches:
        if isinstance(tok, HFTokenizer):
            tokens += sum(len(e.ids) for e in tok.hf.encode_batch_fast(batch, add_special_tokens=False))
        else:
            tokens += sum(map(len, tok.encoding.encode_ordinary_batch(batch, num_threads=threads)))
    return {
        "seconds": time.perf_counter() - start,
        "cpu_seconds": time.process_time() - cpu,
        "tokens": tokens,
    }


def _in_fresh_process(measure: Callable[..., dict], **kwargs) -> dict:
    """Run `measure` in a new Python process; also measure how busy other processes kept the CPUs."""
    busy, started = _busy_cpu_seconds(), time.perf_counter()
    ours = _cpu_seconds(resource.RUSAGE_CHILDREN)
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        measured = pool.submit(measure, **kwargs).result()
    others = (_busy_cpu_seconds() - busy) - (_cpu_seconds(resource.RUSAGE_CHILDREN) - ours)
    measured["other_cpus"] = max(others, 0.0) / (time.perf_counter() - started)
    return measured


# ---------------------------------------------------------------------------------------------
# Rounds


def _busy_cpu_seconds() -> float:
    """CPU time all processes on this machine have used (Linux /proc/stat), 0 where unknown."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except OSError:
        return 0.0
    idle = fields[3] + fields[4]  # idle, iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


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
    for fmt in args.formats:  # the base corpus's documents again, in another format
        corpora[fmt] = work / f"corpus_{fmt.replace('.', '_')}"
        write_corpus(corpora[fmt], size, args.seed, args.source, fmt=fmt)
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
        "formats": ["plain", *args.formats],
        "median": medians,
        "runs": runs,
    }


def _one_round(args: argparse.Namespace, work: Path, corpora: dict[str, Path]) -> dict[str, dict]:
    """Each measurement once, back to back."""
    round_ = {f"prepare_{w}w": _prepare(work, corpora["base"], w) for w in args.workers}
    for threads in (1, 2):
        round_[f"ceiling_{threads}t"] = _in_fresh_process(
            measure_ceiling,
            input_dir=str(corpora["base"]),
            tokenizer=str(work / "tokenizer"),
            threads=threads,
            block_chars=16 * 2049,
        )
    round_["prepare_small"] = _prepare(work, corpora["small"], max(args.workers))
    for fmt in args.formats:
        round_[f"prepare_{fmt}"] = _prepare(work, corpora[fmt], max(args.workers))
    return round_


def _capped(texts, limit: int):
    total = 0
    for text in texts:
        yield text
        total += len(text)
        if total >= limit:
            return


def _prepare(work: Path, corpus: Path, workers: int) -> dict:
    return _in_fresh_process(
        measure_prepare,
        input_dir=str(corpus),
        output_dir=str(work / "out"),
        tokenizer=str(work / "tokenizer"),
        workers=workers,
    )


def _log(message: str) -> None:
    print(f"[bench-prepare] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Report


def report(result: dict, workers: list[int], formats: list[str] = ()) -> str:
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
        *((f"prepare, {max(workers)} workers, {fmt} input", med[f"prepare_{fmt}"]) for fmt in formats),
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


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
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
    add("--formats", nargs="+", choices=FORMATS, default=[],
        metavar="FMT", help="also time prepare on the same documents as jsonl.zst or parquet files "
        "(plain .txt/.md/.jsonl is always timed)")
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
    args.formats = [fmt for fmt in dict.fromkeys(args.formats) if fmt != "plain"]
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="bench-prepare-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        result = run_benchmark(args, work)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(report(result, args.workers, args.formats))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
