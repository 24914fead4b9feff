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
Same-shape matrices (a fused matrix's parts included) are stacked and orthogonalised in one batched
call (compiled on CUDA). With several data-parallel ranks the orthogonalisations are shared out,
as nanochat and modded-nanogpt do: under DDP (`shard_over`) each rank orthogonalises about 1/N of
each stack and an all-gather (in the iteration's dtype) gives every rank every result; under FSDP2
(DTensor row shards) an all-to-all brings each matrix's rows to its owner and another brings each
rank its rows of the results. Under tensor parallelism every rank gathers every whole update and
orthogonalises it (no sharing: its shards are not whole rows). Muon's momentum stays per parameter
and sharded like the parameter, so its state reshards on resume like AdamW's.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from functools import cache

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, Replicate, Shard
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
    """torch.optim.Muon's orthogonalisation, in `dtype`, on a copy (never in place on `grad`).

    `grad` is one matrix or a stack (n, rows, cols) of same-shape matrices, each normalised and
    iterated on its own: one batched matrix product per stage instead of one per matrix.
    """
    a, b, c = coefficients
    x = grad.to(dtype, copy=True)
    transposed = grad.size(-2) > grad.size(-1)
    if transposed:
        x = x.mT
    if x.ndim == 2:  # torch.optim.Muon's own calls, so that one matrix stays bit for bit torch's
        x.div_(x.norm().clamp(min=eps))  # Frobenius >= spectral norm: singular values at most 1
        for _ in range(steps):
            gram = x @ x.T
            x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    else:
        x.div_(torch.linalg.vector_norm(x, dim=(-2, -1), keepdim=True).clamp(min=eps))
        for _ in range(steps):
            gram = x @ x.mT
            x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.mT if transposed else x


@cache
def _compiled_newton_schulz():
    return torch.compile(newton_schulz)


def orthogonalise(stack: Tensor, coefficients: Sequence[float], steps: int, eps: float, dtype) -> Tensor:
    """`newton_schulz`, compiled where it runs on CUDA (CPUs stay eager: compiling did not pay there)."""
    run = _compiled_newton_schulz() if stack.device.type == "cuda" else newton_schulz
    return run(stack, coefficients, steps, eps, dtype)


def ns_dtype_for(device: torch.device) -> torch.dtype:
    fast = device.type == "cuda" or (device.type == "cpu" and cpu_has_fast_bf16())
    return torch.bfloat16 if fast else torch.float32


def _local(tensor: Tensor, like: Tensor) -> Tensor:
    """This rank's part of `tensor`, laid out as `like` (a parameter) is."""
    if not isinstance(tensor, DTensor):
        return tensor
    if tensor.placements != like.placements:
        tensor = tensor.redistribute(like.device_mesh, like.placements)
    return tensor.to_local()


def _layout(param: Tensor, shard_over) -> tuple[str, object]:
    """How a parameter's update is shared out: (mode, process group).

    "local": every matrix orthogonalised here (one process, or nobody to share with);
    "replicated": every rank holds the same whole update (DDP): each orthogonalises its share,
    an all-gather gives everyone every result; "rows": a DTensor of row shards on a 1-D mesh
    (FSDP2): the owner of a matrix collects its rows, orthogonalises, sends each rank its rows back;
    "gathered": any other DTensor (tensor parallelism, 2-D meshes): the whole update is gathered
    on every rank and orthogonalised there (no sharing), each rank keeps its part.
    """
    if isinstance(param, DTensor):
        mesh = param.device_mesh
        if mesh.ndim == 1 and tuple(param.placements) == (Shard(0),):
            return ("rows", mesh.get_group()) if mesh.size() > 1 else ("local", None)
        return "gathered", None
    if shard_over is not None and dist.get_world_size(shard_over) > 1:
        return "replicated", shard_over
    return "local", None


class MuonAdamW(torch.optim.Optimizer):
    def __init__(
        self,
        groups: Iterable[dict],
        muon_defaults: dict | None = None,
        adamw_defaults: dict | None = None,
        shard_over=None,
    ):
        """groups: dicts with "params" and "kind" ("muon" or "adamw"); other keys override the kind's defaults.

        shard_over: a process group whose ranks all hold the same whole gradients (DDP): they share
        the orthogonalisations out. FSDP2's sharded parameters are shared over their own mesh.
        """
        self.kind_defaults = {
            "muon": {**MUON_DEFAULTS, **(muon_defaults or {})},
            "adamw": {**ADAMW_DEFAULTS, **(adamw_defaults or {})},
        }
        self.shard_over = shard_over
        # Set by the trainer before step(): a 0-d tensor, nonzero to skip the step on the device.
        self.found_inf: Tensor | None = None
        self.matrices_orthogonalised = 0  # by this rank, in the last step (fused parts count one each)
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
        self.matrices_orthogonalised = 0
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
        found_inf = self.found_inf
        if found_inf is not None and not group["fused"]:
            # Only torch's fused kernels skip on the device; elsewhere (no fused AdamW) read the flag.
            if found_inf.item():
                return
            found_inf = None
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
            found_inf=found_inf,
            decoupled_weight_decay=True,
        )  # fmt: skip - a loss scaler unscales before step(): this optimizer never sees scaled gradients

    def _muon_step(self, group: dict) -> None:
        params, grads, buffers = [], [], []
        torch.optim.Muon._init_group(self, group, params, grads, buffers)
        buckets: dict[tuple, list] = {}  # same shape, same sharing: one stack, one batched call
        for param, grad, buffer in zip(params, grads, buffers, strict=True):
            key = (tuple(param.shape), *_layout(param, self.shard_over))
            buckets.setdefault(key, []).append((param, grad, buffer))
        for (_, mode, process_group), members in buckets.items():
            self._muon_bucket(group, *zip(*members, strict=True), mode, process_group)

    def _muon_bucket(self, group: dict, params, grads, buffers, mode: str, process_group) -> None:
        """Momentum, orthogonalisation and update of same-shape matrices, as stacks."""
        lr, momentum = float(group["lr"]), group["momentum"]
        targets = [_local(p, p) for p in params]
        local_buffers = [_local(b, p) for b, p in zip(buffers, params, strict=True)]
        # One stack: the gradients, then (in place) the update. The buffers stay per parameter.
        update = torch.stack([_local(g, p) for g, p in zip(grads, params, strict=True)])
        rows, keep = list(update.unbind(0)), None
        if self.found_inf is None:
            torch._foreach_lerp_(local_buffers, rows, 1 - momentum)
        else:  # a skipped step: the momentum moves by 0 and the weights add 0, decided on the device
            keep = (self.found_inf == 0).to(update.dtype)
            update.nan_to_num_(0.0, 0.0, 0.0)
            # A list of 0-d weights: a bare tensor weight would be read on the host.
            torch._foreach_lerp_(local_buffers, rows, [keep * (1 - momentum)] * len(rows))
        if group["nesterov"]:
            torch._foreach_lerp_(rows, local_buffers, momentum)
        else:
            update = torch.stack(local_buffers)
        share = {"local": self._share_local, "replicated": self._share_replicated,
                 "rows": self._share_rows, "gathered": self._share_gathered}[mode]  # fmt: skip
        ortho, alpha = share(update, params[0], group, lr, process_group)
        ortho = ortho.to(targets[0].dtype)
        if keep is not None:
            ortho.mul_(keep)
        if group["weight_decay"]:
            decay = 1 - lr * group["weight_decay"]
            torch._foreach_mul_(targets, decay if keep is None else 1 - (1 - decay) * keep)
        torch._foreach_add_(targets, list(ortho.unbind(0)), alpha=alpha)

    # Each `_share_*` takes this rank's stack of updates (whole matrices, or row shards for "rows"
    # and "gathered") and returns the stack to add to this rank's parameters, and its factor.

    def _share_local(self, update: Tensor, param: Tensor, group: dict, lr: float, _) -> tuple[Tensor, float]:
        return self._scaled(self._orthogonalise(update, group), param.shape, 0, group, lr)

    def _share_replicated(self, update: Tensor, param: Tensor, group: dict, lr: float, process_group):
        """DDP: rank r orthogonalises matrices [r k, (r + 1) k), one all-gather gives every result."""
        world, rank = dist.get_world_size(process_group), dist.get_rank(process_group)
        count = update.size(0)
        share = -(-count // world)
        mine = self._orthogonalise(update[rank * share : (rank + 1) * share], group)
        padded = mine.new_zeros((share, *update.shape[1:]))
        padded[: mine.size(0)] = mine
        gathered = padded.new_empty((world * share, *update.shape[1:]))
        dist.all_gather_single(gathered, padded, group=process_group)
        return self._scaled(gathered[:count], param.shape, 0, group, lr)

    def _share_rows(self, update: Tensor, param: Tensor, group: dict, lr: float, process_group):
        """FSDP2 (row shards, torch.chunk's split): all-to-all the rows of each matrix to its owner,
        orthogonalise, all-to-all the results' rows back. Sent in the orthogonalisation's dtype:
        its first step is that cast, so nothing is lost on the way there."""
        world, rank = dist.get_world_size(process_group), dist.get_rank(process_group)
        (count, local_rows, cols), rows = update.shape, param.shape[0]
        share, chunk = -(-count // world), -(-rows // world)
        send = update.new_zeros((world * share, chunk, cols), dtype=self._ns_dtype(group, update.device))
        send[:count, :local_rows] = update
        received = torch.empty_like(send)  # [source rank, matrix of mine, its rows]
        dist.all_to_all_single(received, send, group=process_group)
        whole = received.view(world, share, chunk, cols).transpose(0, 1).reshape(share, world * chunk, cols)
        owned = max(0, min(share, count - rank * share))
        mine = self._orthogonalise(whole[:owned, :rows], group)
        back = whole.new_zeros((share, world * chunk, cols))
        back[:owned, :rows] = mine
        send = back.view(share, world, chunk, cols).transpose(0, 1).contiguous()
        dist.all_to_all_single(received, send.view_as(received), group=process_group)
        mine = received.view(world * share, chunk, cols)[:count, :local_rows]
        return self._scaled(mine, param.shape, rank * chunk, group, lr)

    def _share_gathered(self, update: Tensor, param: Tensor, group: dict, lr: float, _):
        """Tensor parallelism: the whole update on every rank, each keeps its own part of the result."""
        mesh, placements = param.device_mesh, param.placements
        whole = torch.stack([
            DTensor.from_local(u, mesh, placements, run_check=False, shape=param.shape, stride=param.stride()).full_tensor()
            for u in update.unbind(0)
        ])  # fmt: skip
        ortho, alpha = self._scaled(self._orthogonalise(whole, group), param.shape, 0, group, lr)
        replicate = [Replicate()] * mesh.ndim
        parts = [DTensor.from_local(o, mesh, replicate, run_check=False).redistribute(mesh, placements).to_local() for o in ortho.unbind(0)]  # fmt: skip
        return torch.stack(parts), alpha

    @staticmethod
    def _ns_dtype(group: dict, device: torch.device) -> torch.dtype:
        # A name, not a torch.dtype: param groups go through torch.distributed.checkpoint.
        return getattr(torch, group["ns_dtype"]) if group["ns_dtype"] else ns_dtype_for(device)

    def _orthogonalise(self, whole: Tensor, group: dict) -> Tensor:
        """Whole matrices (n, rows, cols), a fused one part by part, each shape's parts in one call."""
        ns = (group["ns_coefficients"], group["ns_steps"], group["eps"], self._ns_dtype(group, whole.device))
        count, rows, cols = whole.shape
        if not count:  # a rank with no share of this stack
            return whole.to(ns[-1])
        if group["split"] is None:
            self.matrices_orthogonalised += count
            return orthogonalise(whole, *ns)
        sizes, blocks = group["split"], group["split_blocks"]
        view = whole.view(count, blocks, sum(sizes), cols)
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        out = torch.empty(view.shape, dtype=ns[-1], device=whole.device)
        for size in sorted(set(sizes)):  # each part, all its rows from every block, as one matrix
            same = [i for i, s in enumerate(sizes) if s == size]
            stack = torch.cat([view[:, :, starts[i] : starts[i] + size] for i in same])
            result = orthogonalise(stack.reshape(-1, blocks * size, cols), *ns)
            for index, part in zip(
                same, result.view(len(same), *view[:, :, :size].shape).unbind(0), strict=True
            ):
                out[:, :, starts[index] : starts[index] + size] = part
        self.matrices_orthogonalised += count * len(sizes)
        return out.view(count, rows, cols)

    @staticmethod
    def _scaled(ortho: Tensor, shape, first_row: int, group: dict, lr: float) -> tuple[Tensor, float]:
        """The update (rows `first_row`... of the whole matrices) and the factor to add it with.

        torch's learning-rate rule, by each matrix's shape: a fused matrix's parts each by their own.
        """
        rule = group["adjust_lr_fn"]
        if group["split"] is None:
            return ortho, -_adjust_lr(lr, rule, shape)
        sizes, blocks, cols = group["split"], group["split_blocks"], shape[1]
        scales = [_adjust_lr(1.0, rule, (blocks * size, cols)) for size in sizes]
        per_row = torch.tensor(scales).repeat_interleave(torch.tensor(sizes)).repeat(blocks)
        rows = per_row[first_row : first_row + ortho.size(1)].to(ortho.device, torch.float32)
        return ortho.float().mul_(rows[:, None]), -lr


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
    shard_over=None,
) -> MuonAdamW:
    """shard_over: see `MuonAdamW` (DDP's process group; None elsewhere)."""
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
        shard_over=shard_over,
    )


def learning_rates(optimizer) -> dict[str, float]:
    """The current learning rates to log: `lr` (AdamW's groups), and `lr/muon` when Muon runs."""
    rates = {}
    for group in optimizer.param_groups:
        rates.setdefault("lr/muon" if group.get("kind") == "muon" else "lr", group["lr"])
    return rates
