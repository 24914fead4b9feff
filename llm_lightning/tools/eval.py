"""`llm-lightning eval`: a checkpoint on lm-evaluation-harness tasks, without exporting it first.

The checkpoint may be a .ckpt file, a sharded checkpoint folder or an exported folder; the model
runs behind the harness as "llm-lightning" (evaluation/harness.py). Tasks are the harness's own
(their data sets must be cached: there is no network) or local YAML under --include_path; the
example task `readme_qa` ships with the package. The table goes to stdout, the JSON (metrics,
seconds and per-document log-likelihoods) to --output, written atomically.
"""

from __future__ import annotations

import sys

from llm_lightning.errors import ArgumentParser, UserError
from llm_lightning.evaluation.run import go_offline, require_lm_eval
from llm_lightning.io.atomic import write_json
from llm_lightning.tools.device import pick_dtype, resolve_device


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="llm-lightning eval",
        description="Evaluate a checkpoint on lm-evaluation-harness tasks (offline: local or cached data).",
    )
    parser.add_argument(
        "--ckpt_path", required=True, help="a .ckpt file, a sharded folder or an exported folder"
    )
    parser.add_argument("--tasks", required=True, help="comma-separated task names, e.g. readme_qa,arc_easy")
    parser.add_argument("--num_fewshot", type=int, default=None, help="examples in the prompt (task default)")
    parser.add_argument("--batch_size", type=int, default=16, help="sequences per forward pass (default 16)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    parser.add_argument(
        "--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="float32",
        help="weights' dtype (default float32; auto = bfloat16 on a GPU that has it)",
    )  # fmt: skip
    parser.add_argument("--output", default=None, help="write the results as JSON to this file")
    parser.add_argument("--limit", type=int, default=None, help="at most this many documents per task")
    parser.add_argument("--include_path", default=None, help="a folder of local task YAML files")
    return parser


def check_args(args) -> list[str]:
    tasks = [task.strip() for task in args.tasks.split(",") if task.strip()]
    if not tasks:
        raise UserError("--tasks: give at least one task name (comma-separated)")
    if args.batch_size < 1:
        raise UserError(f"--batch_size {args.batch_size}: must be at least 1")
    if args.limit is not None and args.limit < 1:
        raise UserError(f"--limit {args.limit}: must be at least 1")
    if args.num_fewshot is not None and args.num_fewshot < 0:
        raise UserError(f"--num_fewshot {args.num_fewshot}: must be >= 0")
    return tasks


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    tasks = check_args(args)
    require_lm_eval()
    go_offline()  # before lm_eval imports datasets, which reads these once
    from llm_lightning.evaluation.loading import load_for_eval

    device = resolve_device(args.device)
    model, tokenizer = load_for_eval(args.ckpt_path)  # a bad checkpoint fails before lm_eval loads
    from llm_lightning.evaluation.harness import LightningLM
    from llm_lightning.evaluation.run import evaluate, table

    dtype = str(pick_dtype(args.dtype, device)).removeprefix("torch.")
    lm = LightningLM(args.ckpt_path, args.batch_size, str(device), dtype, model=model, tokenizer=tokenizer)
    report = evaluate(lm, tasks, args.include_path, args.num_fewshot, args.limit)
    print(table(report))
    if args.output:
        config = {
            k: getattr(args, k) for k in ("ckpt_path", "num_fewshot", "batch_size", "limit", "include_path")
        }
        write_json(args.output, {"config": {**config, "tasks": tasks, "device": str(device)}, **report})
        print(f"wrote {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
