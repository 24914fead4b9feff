"""The lm-evaluation-harness model "llm-lightning": our Transformer and tokenizer behind the
harness's model interface (log-likelihood, rolling log-likelihood, generate-until).

Importing this module registers the model, so the harness's own command works through
`python -m llm_lightning.evaluation.harness run --model llm-lightning --model_args
ckpt_path=PATH ...` (lm-eval 0.4 looks up models in its registry only; it has no plug-in
entry point). This module imports lm_eval: import it only where the extra is installed.
"""

from __future__ import annotations

import sys

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from llm_lightning.evaluation.loading import load_for_eval
from llm_lightning.evaluation.scoring import score_pairs

MODEL_NAME = "llm-lightning"
DEFAULT_MAX_GEN_TOKS = 256


@register_model(MODEL_NAME)
class LightningLM(TemplateLM):
    """`model_args`: ckpt_path (a .ckpt, a sharded folder or an exported folder), dtype
    (float32 default), max_length (default: the model's max_seq_len, as the `hf` model reads it)."""

    def __init__(
        self,
        ckpt_path: str,
        batch_size: int | str | None = 16,
        device: str | None = "cpu",
        dtype: str = "float32",
        max_length: int | None = None,
        model=None,
        tokenizer=None,
        **_ignored,
    ) -> None:
        super().__init__()
        if model is None:
            model, tokenizer = load_for_eval(ckpt_path)
        self._device = harness_device(device)
        self.model = model.to(device=self._device, dtype=getattr(torch, dtype)).eval()
        self.tokenizer = tokenizer
        self._max_length = int(max_length or model.config.max_seq_len)
        # "auto" (a harness option) has no meaning here: the default size
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 16

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tokenizer.eos_id  # the export's bos_token is end-of-text too

    @property
    def max_length(self) -> int:
        return self._max_length

    def tok_encode(self, string: str, add_special_tokens=None, **kwargs) -> list[int]:
        return self.tokenizer.encode(string)

    def tok_decode(self, ids) -> str:
        return self.tokenizer.decode(list(ids))

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        pairs = [(list(context), list(continuation)) for _, context, continuation in requests]
        results = score_pairs(self.model, pairs, self.max_length, self.batch_size)
        for (key, _, _), result in zip(requests, results, strict=True):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        totals = []
        for (text,) in [request.args for request in requests]:
            windows = get_rolling_token_windows(
                token_list=self.tok_encode(text),
                prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length,
                context_len=1,
            )
            pairs = [make_disjoint_window(window) for window in windows]
            scores = score_pairs(self.model, pairs, self.max_length, self.batch_size)
            totals.append(sum(ll for ll, _ in scores))
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), totals[-1])
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        outputs = []
        for context, gen_kwargs in [request.args for request in requests]:
            until = gen_kwargs.get("until") or [self.tok_decode([self.eot_token_id])]
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(gen_kwargs.get("max_gen_toks", DEFAULT_MAX_GEN_TOKS))
            text = self._greedy(self.tok_encode(context) or [self.prefix_token_id], max_new, until)
            outputs.append(text)
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
        return outputs

    @torch.no_grad()
    def _greedy(self, ids: list[int], max_new: int, until: list[str]) -> str:
        """Greedy decoding with the KV cache over a sliding window of max_length tokens
        (rebuilt from the last max_length tokens once full); stops at a stop string or eos."""
        window, new = self.max_length, []
        ids = ids[-window:]
        cache = self.model.new_cache(1, window)
        logits = self.model(torch.tensor([ids], device=self._device), cache)[:, -1]
        for _ in range(max_new):
            token = int(logits.argmax(dim=-1))
            if token == self.eot_token_id:
                break
            new.append(token)
            text = self.tok_decode(new)
            stops = [text.index(stop) for stop in until if stop and stop in text]
            if stops:
                return text[: min(stops)]
            ids = (ids + [token])[-window:]
            if cache.length < window:
                logits = self.model(torch.tensor([[token]], device=self._device), cache)[:, -1]
            else:
                cache = self.model.new_cache(1, window)
                logits = self.model(torch.tensor([ids], device=self._device), cache)[:, -1]
        return self.tok_decode(new)


def harness_device(name: str | None) -> torch.device:
    """The harness's command passes device "cuda" by default: the CPU where there is no GPU."""
    if not name or name == "auto" or (name.startswith("cuda") and not torch.cuda.is_available()):
        return torch.device("cuda" if name and torch.cuda.is_available() else "cpu")
    return torch.device(name)


def main() -> None:
    """The harness's own command line, with "llm-lightning" registered."""
    from lm_eval.__main__ import cli_evaluate

    sys.argv[0] = "lm_eval"
    cli_evaluate()


if __name__ == "__main__":
    main()
