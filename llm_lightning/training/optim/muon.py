"""MuonAdamW: Muon for the blocks' weight matrices and AdamW for the rest, as one optimizer.

One object because Lightning's automatic optimization takes one optimizer, a schedule must scale
every group, and a checkpoint holds one optimizer state. Every param group has a `kind`:
- "adamw" groups (token embedding, LM head, norm gains) run torch's own AdamW: its state
  initialisation (`Adam._init_group`) and functional kernel (fused on CPU and CUDA), so they are
  bit for bit torch.optim.AdamW;
- "muon" groups (qkv, o, gate/up and down projections of every block) take Nesterov momentum,
  then replace the update by its nearest (semi-)orthogonal matrix with the Newton-Schulz iteration
  of torch.optim.Muon (same coefficients and steps), scaled by torch's learning-rate rule:
  "original" (lr x sqrt(max(1, rows/cols)): the same lr transfers across widths) or
  "match_rms_adamw" (0.2 sqrt(max(rows, cols)): AdamW-sized updates). Two differences from
  torch.optim.Muon: the iteration runs in bf16 only where bf16 is fast (GPUs, CPUs with
  avx512_bf16/AMX), fp32 elsewhere (torch always uses bf16, ~100x slower on AVX2-only CPUs); and
  a fused matrix is orthogonalised part by part, q, k, v and gate, up each as its own matrix
  (model/layers.py declares the layouts: `qkv_parts`, `gate_up_parts`).
Under FSDP2 and tensor parallelism the parameters are DTensors: the update is gathered whole
(one all-gather per matrix), orthogonalised on every rank, and each rank keeps its own shard;
Muon's momentum stays sharded, so its state reshards on resume like AdamW's.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, Replicate
from torch.optim._muon import DEFAULT_A, DEFAULT_B, DEFAULT_C, DEFAULT_NS_STEPS, EPS, _adjust_lr
from torch.optim.adam import Adam, adam

from llm_lightning.model.layers import gate_up_parts, qkv_parts
from llm_lightning.training.throughput import cpu_has_fast_bf16

LR_RULES = ("original", "match_rms_adamw")
MUON_DEFAULTS = dict(
    lr=0.02,
    weight_decay=0.0,
    momentum=0.95,
    nesterov=True,
    ns_coefficients=(DEFAULT_A, DEFAULT_B, DEFAULT_C),
    eps=EPS,
    ns_steps=DEFAULT_NS_STEPS,
    adjust_lr_fn="original",
    ns_dtype=None,  # "float32" or "bfloat16"; None: bf16 where it is fast, else fp32 (`ns_dtype_for`)
    split=None,  # a fused matrix's rows: `split_blocks` repeats of [part 0 rows, part 1 rows, ...]
    split_blocks=1,
)
ADAMW_DEFAULTS = dict(
    lr=3e-4,
    weight_decay=0.0,
    betas=(0.9, 0.95),
    eps=1e-8,
    amsgrad=False,
    maximize=False,
    foreach=None,
    capturable=False,
    differentiable=False,
    fused=None,
    decoupled_weight_decay=True,
)


def newton_schulz(grad: Tensor, coefficients: Sequence[float], steps: int, eps: float, dtype) -> Tensor:
    """torch.optim.Muon's orthogonalisation, in `dtype`, on a copy (never in place on `grad`)."""
    a, b, c = coefficients
    x = grad.to(dtype, copy=True)
    transposed = grad.size(0) > grad.size(1)
    if transposed:
        x = x.T
    x.div_(x.norm().clamp(min=eps))  # Frobenius >= spectral norm: singular values at most 1
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if transposed else x


def ns_dtype_for(device: torch.device) -> torch.dtype:
    fast = device.type == "cuda" or (device.type == "cpu" and cpu_has_fast_bf16())
    return torch.bfloat16 if fast else torch.float32


class MuonAdamW(torch.optim.Optimizer):
    def __init__(
        self, groups: Iterable[dict], muon_defaults: dict | None = None, adamw_defaults: dict | None = None
    ):
        """groups: dicts with "params" and "kind" ("muon" or "adamw"); other keys override the kind's defaults."""
        self.kind_defaults = {
            "muon": {**MUON_DEFAULTS, **(muon_defaults or {})},
            "adamw": {**ADAMW_DEFAULTS, **(adamw_defaults or {})},
        }
        # The defaults depend on the kind, so add_param_group fills them, not the base class.
        super().__init__(list(groups), defaults={"differentiable": False, "foreach": None, "fused": None})

    def add_param_group(self, param_group: dict) -> None:
        kind = param_group.get("kind")
        if kind not in self.kind_defaults:
            raise ValueError(f'MuonAdamW param groups need a "kind" of muon or adamw, not {kind!r}')
        group = {**self.kind_defaults[kind], **param_group}
        if kind == "muon":
            if any(p.ndim != 2 for p in group["params"]):
                raise ValueError("a muon group holds weight matrices (2-D) only")
            if group["adjust_lr_fn"] not in LR_RULES:
                raise ValueError(
                    f"muon learning-rate rule {group['adjust_lr_fn']!r}: choose one of {LR_RULES}"
                )
        super().add_param_group(group)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            (self._adamw_step if group["kind"] == "adamw" else self._muon_step)(group)
        return loss

    def _adamw_step(self, group: dict) -> None:
        params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps = [], [], [], [], [], []
        has_complex = Adam._init_group(
            self, group, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps
        )
        if not params:
            return
        beta1, beta2 = group["betas"]
        adam(
            params,
            grads,
            exp_avgs,
            exp_avg_sqs,
            max_exp_avg_sqs,
            steps,
            amsgrad=group["amsgrad"],
            has_complex=has_complex,
            beta1=beta1,
            beta2=beta2,
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            eps=group["eps"],
            maximize=group["maximize"],
            foreach=group["foreach"],
            capturable=group["capturable"],
            differentiable=group["differentiable"],
            fused=group["fused"],
            grad_scale=None,
            found_inf=None,
            decoupled_weight_decay=True,
        )  # fmt: skip - a loss scaler unscales before step(): this optimizer never sees scaled gradients

    def _muon_step(self, group: dict) -> None:
        params, grads, buffers = [], [], []
        torch.optim.Muon._init_group(self, group, params, grads, buffers)
        lr, momentum = float(group["lr"]), group["momentum"]
        for param, grad, buffer in zip(params, grads, buffers, strict=True):
            buffer.lerp_(grad, 1 - momentum)
            update = grad.lerp(buffer, momentum) if group["nesterov"] else buffer
            target = param
            if isinstance(param, DTensor):  # sharded: orthogonalise the whole matrix, keep this rank's part
                whole = update.full_tensor() if isinstance(update, DTensor) else update
                ortho, alpha = self._orthogonalize(whole, group, lr)
                replicated = DTensor.from_local(ortho, param.device_mesh, [Replicate()] * param.device_mesh.ndim, run_check=False)  # fmt: skip
                ortho, target = (
                    replicated.redistribute(param.device_mesh, param.placements).to_local(),
                    param.to_local(),
                )
            else:
                ortho, alpha = self._orthogonalize(update, group, lr)
            target.mul_(1 - lr * group["weight_decay"])
            target.add_(ortho.to(target.dtype), alpha=alpha)

    @staticmethod
    def _orthogonalize(update: Tensor, group: dict, lr: float) -> tuple[Tensor, float]:
        """The orthogonalised update and the factor to add it with (minus the adjusted lr)."""
        # A name, not a torch.dtype: param groups go through torch.distributed.checkpoint.
        dtype = getattr(torch, group["ns_dtype"]) if group["ns_dtype"] else ns_dtype_for(update.device)
        ns = (group["ns_coefficients"], group["ns_steps"], group["eps"], dtype)
        if group["split"] is None:
            return newton_schulz(update, *ns), -_adjust_lr(lr, group["adjust_lr_fn"], update.shape)
        sizes, blocks, cols = group["split"], group["split_blocks"], update.shape[1]
        view = update.reshape(blocks, sum(sizes), cols)
        out = torch.empty(view.shape, dtype=torch.float32, device=update.device)
        start = 0
        for size in sizes:  # each part, all its rows from every block, as one matrix
            part = view[:, start : start + size].reshape(blocks * size, cols)
            scale = _adjust_lr(1.0, group["adjust_lr_fn"], part.shape)
            out[:, start : start + size] = (
                newton_schulz(part, *ns).view(blocks, size, cols).float().mul_(scale)
            )
            start += size
        return out.view(update.shape), -lr


def muon_adamw_groups(
    model: nn.Module,
    *,
    lr: float,
    weight_decay: float,
    muon_lr: float,
    muon_weight_decay: float,
    lr_rule: str,
) -> list[dict]:
    """The Transformer's parameters by role: the same groups on every device layout (resume needs that).

    Muon: the blocks' Linear weights, by fused layout (qkv, gate/up, plain). AdamW: the token
    embedding and the LM head (per-token vectors, not maps of the hidden state; weight decay),
    the norm gains (no decay).
    """
    config = model.config
    layouts = {"qkv_proj": qkv_parts(config), "gate_up_proj": gate_up_parts(config)}
    by_layout: dict[str, list] = {}
    for block in model.layers:
        for name, module in block.named_modules():
            if isinstance(module, nn.Linear):
                by_layout.setdefault(name.rsplit(".", 1)[-1] if name.endswith(tuple(layouts)) else "plain", []).append(module.weight)  # fmt: skip
    groups = []
    for name, params in sorted(by_layout.items()):
        sizes, blocks = layouts.get(name, (None, 1))
        groups.append(dict(kind="muon", name=f"muon_{name}", params=params, lr=muon_lr, weight_decay=muon_weight_decay,
                           decay=True, split=sizes, split_blocks=blocks, adjust_lr_fn=lr_rule))  # fmt: skip
    matrices = {id(p) for group in groups for p in group["params"]}
    tables = [model.embed_tokens.weight] + ([] if model.lm_head.weight is model.embed_tokens.weight else [model.lm_head.weight])  # fmt: skip
    norms = [p for p in model.parameters() if id(p) not in matrices and all(p is not t for t in tables)]
    groups.append(
        dict(kind="adamw", name="embeddings", params=tables, lr=lr, weight_decay=weight_decay, decay=True)
    )
    groups.append(dict(kind="adamw", name="norms", params=norms, lr=lr, weight_decay=0.0, decay=False))
    return groups


def build_muon_adamw(
    model: nn.Module,
    *,
    lr,
    weight_decay,
    betas,
    muon_lr,
    muon_momentum,
    muon_weight_decay,
    lr_rule,
    device,
    precision: str = "auto",
) -> MuonAdamW:
    fused = device.type in ("cuda", "cpu")  # never self-unscaling: fine under a loss scaler too
    groups = muon_adamw_groups(
        model,
        lr=lr,
        weight_decay=weight_decay,
        muon_lr=muon_lr,
        muon_weight_decay=muon_weight_decay,
        lr_rule=lr_rule,
    )
    return MuonAdamW(
        groups,
        muon_defaults={
            "momentum": muon_momentum,
            "ns_dtype": None if precision == "auto" else precision,
        },
        adamw_defaults={"betas": tuple(betas), "fused": fused, "foreach": None if fused else True},
    )


def learning_rates(optimizer) -> dict[str, float]:
    """The current learning rates to log: `lr` (AdamW's groups), and `lr/muon` when Muon runs."""
    rates = {}
    for group in optimizer.param_groups:
        rates.setdefault("lr/muon" if group.get("kind") == "muon" else "lr", group["lr"])
    return rates
