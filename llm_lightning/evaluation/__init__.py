"""Downstream evaluation: task accuracy of our checkpoints, after a fit and during one.

- `scoring`: log-likelihoods of continuations with our Transformer, token for token as
  lm-evaluation-harness's Hugging Face model computes them (same truncation, same split of a
  context/continuation pair into tokens), so both give the same numbers;
- `tasks`: the simple multiple-choice jsonl format (context, choices, gold) and its accuracy;
- `loading`: a model and tokenizer from a .ckpt file, a sharded folder or an exported folder;
- `harness`: the lm-eval model "llm-lightning" (lm-eval is an optional extra: imported lazily);
- `callback`: `TaskEval`, the in-loop accuracy of a fit (`--eval.*`).
Evaluation sits between io and training: training adds the callback, tools/eval.py runs it.
"""
