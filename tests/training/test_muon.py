"""Muon + AdamW as one optimizer: every parameter once, torch's math, fused parts, loss scaling,
and through the real CLI: exact resume, accumulation, DDP and FSDP2 equal to one process.

The CLI runs orthogonalise in fp32 (--model.muon_precision float32), so that differences are the
gradients' summation order only; Newton-Schulz enlarges small differences (its slope near 0 is
~3.4 per iteration), hence the tolerances of 1e-4 on val losses and 2e-3 on single weights.
"""

from __future__ import annotations

import pytest
import torch
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.utils._python_dispatch import TorchDispatchMode

from llm_lightning.model import ModelConfig, Transformer
from llm_lightning.model.layers import split_gate_up, split_qkv
from llm_lightning.training.optim.muon import MuonAdamW, build_muon_adamw, muon_adamw_groups, newton_schulz
from tests.conftest import REPO, assert_same_weights, fit, fit_flags, randomized, records, run_cli, weights
from tests.distributed.conftest import DIST_ENV

CONFIG = ModelConfig(vocab_size=97, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, max_seq_len=16)
MUON = ("--model.optimizer", "muon", "--model.muon_precision", "float32", "--model.max_steps", "20")


@pytest.mark.parametrize("tied", [False, True])
def test_the_groups_hold_every_parameter_once(tied):
    model = Transformer(ModelConfig(**{**CONFIG.to_dict(), "tie_embeddings": tied}))
    groups = muon_adamw_groups(
        model, lr=1e-3, weight_decay=0.1, muon_lr=0.02, muon_weight_decay=0.0, lr_rule="original"
    )
    listed = [id(p) for group in groups for p in group["params"]]
    assert len(listed) == len(set(listed)) == len({id(p) for p in model.parameters()})
    muon = {id(p) for g in groups if g["kind"] == "muon" for p in g["params"]}
    matrices = {
        id(m.weight) for block in model.layers for m in block.modules() if isinstance(m, torch.nn.Linear)
    }
    assert muon == matrices  # the embedding, the head and every gain stay with AdamW


def test_one_matrix_is_torchs_muon_bit_for_bit():
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(48, 32))
    twin = torch.nn.Parameter(weight.detach().clone())
    ours = MuonAdamW(
        [{"kind": "muon", "params": [weight], "ns_dtype": "bfloat16"}], muon_defaults={"lr": 0.02}
    )
    theirs = torch.optim.Muon([twin], lr=0.02, weight_decay=0.0)
    for _ in range(3):
        grad = torch.randn(48, 32)
        weight.grad, twin.grad = grad.clone(), grad.clone()
        ours.step()
        theirs.step()
    assert torch.equal(weight, twin)


def test_fused_parts_are_orthogonalised_as_separate_matrices():
    model = randomized(Transformer(CONFIG))
    optimizer = build_muon_adamw(model, lr=1e-3, weight_decay=0.0, betas=(0.9, 0.95), muon_lr=0.02, muon_momentum=0.0,
                                 muon_weight_decay=0.0, lr_rule="original", device=torch.device("cpu"), precision="float32")  # fmt: skip
    attn, mlp = model.layers[0].attn, model.layers[0].mlp
    before = attn.qkv_proj.weight.detach().clone(), mlp.gate_up_proj.weight.detach().clone()
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    grads = attn.qkv_proj.weight.grad.clone(), mlp.gate_up_proj.weight.grad.clone()
    optimizer.step()

    def expected(grad, weight_before, parts):
        steps = []
        for part in parts(grad):  # momentum 0, nesterov: the update is the gradient itself
            scale = max(1.0, part.shape[0] / part.shape[1]) ** 0.5
            steps.append(newton_schulz(part, (3.4445, -4.7750, 2.0315), 5, 1e-7, torch.float32) * scale)
        return steps

    q, k, v = expected(grads[0], before[0], lambda g: split_qkv(g, CONFIG))
    moved = split_qkv(before[0] - attn.qkv_proj.weight.detach(), CONFIG)
    for got, want in zip(moved, (q, k, v), strict=True):
        torch.testing.assert_close(got, 0.02 * want, atol=1e-6, rtol=1e-4)
    gate, up = expected(grads[1], before[1], split_gate_up)
    moved = split_gate_up(before[1] - mlp.gate_up_proj.weight.detach())
    torch.testing.assert_close(moved[0], 0.02 * gate, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(moved[1], 0.02 * up, atol=1e-6, rtol=1e-4)


def test_a_loss_scaler_changes_nothing_and_skips_an_inf_step():
    torch.manual_seed(0)
    results = []
    for scale in (None, 2.0**12):
        model = randomized(Transformer(CONFIG))
        optimizer = build_muon_adamw(model, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95), muon_lr=0.02,
                                     muon_momentum=0.95, muon_weight_decay=0.0, lr_rule="original",
                                     device=torch.device("cpu"), precision="float32")  # fmt: skip
        scaler = torch.amp.GradScaler("cpu", init_scale=scale or 1.0, enabled=scale is not None)
        ids = torch.randint(0, 97, (2, 17), generator=torch.Generator().manual_seed(1))
        for _ in range(2):
            scaler.scale(model(ids[:, :-1], targets=ids[:, 1:])).backward()
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad()
        results.append({k: v.clone() for k, v in model.state_dict().items()})
        if scale:
            before = {k: v.clone() for k, v in model.state_dict().items()}
            model(ids[:, :-1], targets=ids[:, 1:]).backward()
            next(model.parameters()).grad[0] = float("inf")
            scaler.step(optimizer)  # skipped: nothing moves
            scaler.update()
            assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
            assert scaler.get_scale() == scale / 2
    for key in results[0]:
        torch.testing.assert_close(results[0][key], results[1][key], atol=1e-6, rtol=0)


@pytest.fixture(scope="module")
def muon_runs(prepared_dir, tmp_path_factory) -> dict:
    """20 steps of batch 8: one process (micro-batches of 4), micro-batches of 8, 10 + resume 10."""
    root = tmp_path_factory.mktemp("muon")
    runs = {"one": root / "one" / "ckpts", "big": root / "big" / "ckpts", "split": root / "split" / "ckpts"}
    for folder in runs.values():
        folder.parent.mkdir()
    assert fit(prepared_dir, runs["one"], *MUON, steps=20).returncode == 0
    assert fit(prepared_dir, runs["big"], *MUON, steps=20, micro=8).returncode == 0
    assert fit(prepared_dir, runs["split"], *MUON, steps=10).returncode == 0
    resumed = fit(prepared_dir, runs["split"], *MUON, "--ckpt_path", "last", steps=20)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return runs


def test_muon_resumes_exactly(muon_runs):
    assert_same_weights(muon_runs["one"] / "last.ckpt", muon_runs["split"] / "last.ckpt")  # bit for bit
    val = lambda folder: [r["val/loss"] for r in records(folder, "val")]  # noqa: E731
    assert val(muon_runs["one"]) == val(muon_runs["split"])
    assert "lr/muon" in records(muon_runs["one"], "train")[-1]


def assert_close_runs(a, b) -> None:
    assert records(a, "val")[-1]["val/loss"] == pytest.approx(records(b, "val")[-1]["val/loss"], abs=1e-4)
    wa, wb = weights(a / "last.ckpt"), weights(b / "last.ckpt")
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 2e-3


def test_muon_with_accumulation_equals_one_big_batch(muon_runs):
    assert_close_runs(muon_runs["one"], muon_runs["big"])


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_muon_on_two_processes_equals_one_with_accumulation(strategy, muon_runs, prepared_dir, tmp_path):
    """DDP, and FSDP2 (the whole matrix gathered for the orthogonalisation), against one process."""
    ckpts = tmp_path / "ckpts"
    ckpts.parent.mkdir(exist_ok=True)
    launch = (
        ("--trainer.strategy", "ddp")
        if strategy == "ddp"
        else ("--config", REPO / "configs/strategy/fsdp.yaml")
    )
    flags = fit_flags(
        prepared_dir, ckpts, *MUON, *launch, "--trainer.devices", 2, "--trainer.accelerator", "cpu"
    )
    result = run_cli("fit", *flags, cwd=tmp_path, env=DIST_ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_close_runs(muon_runs["one"], ckpts)


# Batched and shared-out orthogonalisation against one process's per-matrix update.

SHARED = ModelConfig(**{**CONFIG.to_dict(), "num_layers": 4, "vocab_size": 98})  # (even: tensor parallelism)
ODD = (3, 37, 24)  # three fused matrices of 37 rows: uneven stacks and uneven row shards on two ranks


class Ranked(torch.nn.Module):
    """A Transformer and odd-shaped extra matrices (their own muon group)."""

    def __init__(self):
        super().__init__()
        self.transformer = randomized(Transformer(SHARED))
        torch.manual_seed(1)
        self.extra = torch.nn.ModuleList(torch.nn.Linear(ODD[2], ODD[1], bias=False) for _ in range(ODD[0]))


def shared_optimizer(model: Ranked, shard_over=None) -> MuonAdamW:
    groups = muon_adamw_groups(
        model.transformer, lr=1e-3, weight_decay=0.1, muon_lr=0.02, muon_weight_decay=0.1, lr_rule="original"
    )
    # A fused matrix of a tall part (30 rows: lr x sqrt(30 / 24)) and a short one, split unevenly.
    groups.append(
        dict(kind="muon", params=[m.weight for m in model.extra], lr=0.02, weight_decay=0.1, split=(30, 7))
    )
    # Fused AdamW, as `build_muon_adamw` has on CPUs and GPUs: it skips a found_inf step on the device.
    return MuonAdamW(groups, {"ns_dtype": "float32"}, {"fused": True}, shard_over=shard_over)


def step_grads(model: torch.nn.Module, step: int) -> dict:
    generator = torch.Generator().manual_seed(100 + step)
    return {name: torch.randn(p.shape, generator=generator) for name, p in model.named_parameters()}


def muon_results(model, optimizer) -> dict:
    """Whole weights and momentum buffers, by name (gathered from shards)."""
    whole = lambda t: t.full_tensor() if isinstance(t, DTensor) else t.detach().clone()  # noqa: E731
    names = {id(p): n for n, p in model.named_parameters()}
    out = {n: whole(p) for n, p in model.named_parameters()}
    for group in optimizer.param_groups:
        if group["kind"] == "muon":
            out.update({"momentum:" + names[id(p)]: whole(optimizer.state[p]["momentum_buffer"]) for p in group["params"]})  # fmt: skip
    return out


def reference_muon_step(params, grads, buffers, group) -> None:
    """Today's (pre-batching) update, one matrix and one fused part at a time, in fp32."""
    lr, ns = group["lr"], (group["ns_coefficients"], group["ns_steps"], group["eps"], torch.float32)
    for param, grad, buffer in zip(params, grads, buffers, strict=True):
        buffer.lerp_(grad, 1 - group["momentum"])
        update = grad.lerp(buffer, group["momentum"])
        if group["split"] is None:
            ortho = newton_schulz(update, *ns) * max(1.0, update.shape[0] / update.shape[1]) ** 0.5
        else:
            sizes, blocks = group["split"], group["split_blocks"]
            view, ortho, start = update.view(blocks, sum(sizes), -1), torch.empty(update.shape), 0
            for size in sizes:
                part = view[:, start : start + size].reshape(blocks * size, -1)
                scale = max(1.0, part.shape[0] / part.shape[1]) ** 0.5
                ortho.view(blocks, sum(sizes), -1)[:, start : start + size] = (newton_schulz(part, *ns) * scale).view(blocks, size, -1)  # fmt: skip
                start += size
        param.mul_(1 - lr * group["weight_decay"]).add_(ortho, alpha=-lr)


def test_batched_muon_equals_the_per_matrix_update():
    model, twin = Ranked(), Ranked()
    optimizer, reference = shared_optimizer(model), shared_optimizer(twin)
    buffers = {id(p): torch.zeros_like(p) for p in twin.parameters()}
    for step in range(3):
        for m, grads in ((model, step_grads(model, step)), (twin, step_grads(twin, step))):
            for name, p in m.named_parameters():
                p.grad = grads[name]
        optimizer.step()
        with torch.no_grad():
            for group in reference.param_groups:
                if group["kind"] == "muon":
                    ps = group["params"]
                    reference_muon_step(ps, [p.grad for p in ps], [buffers[id(p)] for p in ps], group)
    total = 4 * 7 + 2 * ODD[0]  # q, k, v, o, gate, up, down per block; 2 parts per extra
    assert optimizer.matrices_orthogonalised == total
    for group, twin_group in zip(optimizer.param_groups, reference.param_groups, strict=True):
        if group["kind"] == "muon":
            for p, q in zip(group["params"], twin_group["params"], strict=True):
                torch.testing.assert_close(p.detach(), q.detach(), atol=1e-6, rtol=1e-5)
                torch.testing.assert_close(optimizer.state[p]["momentum_buffer"], buffers[id(q)])


class HostReads(TorchDispatchMode):
    """Counts device-to-host reads (what `.item()`, `bool()` and `float()` of a tensor dispatch)."""

    READS = ("aten._local_scalar_dense", "aten.is_nonzero", "aten.item")

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += str(func.overloadpacket) in self.READS
        return func(*args, **(kwargs or {}))


def test_found_inf_skips_the_step_on_the_device():
    """A nonzero `found_inf` leaves weights, momentum, AdamW's moments and steps untouched, read on no host."""
    model, twin = Ranked(), Ranked()
    optimizer, plain = shared_optimizer(model), shared_optimizer(twin)
    for step in range(2):
        for m in (model, twin):
            for name, p in m.named_parameters():
                p.grad = step_grads(m, step)[name]
        optimizer.found_inf = torch.tensor(0.0)
        optimizer.step()
        plain.step()
    snapshot = lambda: (muon_results(model, optimizer), {i: {k: v.clone() for k, v in s.items()} for i, s in optimizer.state_dict()["state"].items()})  # noqa: E731  # fmt: skip
    before = snapshot()
    for name, p in model.named_parameters():
        p.grad = step_grads(model, 5)[name]
    model.transformer.layers[0].attn.qkv_proj.weight.grad[0, 0] = float("inf")
    model.transformer.embed_tokens.weight.grad[0, 0] = float("nan")
    optimizer.found_inf = torch.tensor(1.0)
    with HostReads() as reads:
        optimizer.step()
    assert reads.count == 0
    after = snapshot()
    assert before[0].keys() == after[0].keys() and all(
        torch.equal(before[0][k], after[0][k]) for k in before[0]
    )
    assert len(before[1]) == len(list(model.parameters())) == len(after[1])
    for index, state in before[1].items():
        assert all(torch.equal(value, after[1][index][key]) for key, value in state.items()), index
    for key, value in muon_results(twin, plain).items():  # a found_inf of 0 changed nothing
        torch.testing.assert_close(before[0][key], value, atol=1e-6, rtol=1e-5)


def _shared_worker(rank: int, port: int, folder: str) -> None:
    """One of two gloo ranks: 3 steps under DDP's sharing, FSDP2's, then tensor parallelism's
    gathered path (no sharing); rank 0 saves the results."""
    import os

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from llm_lightning.training.parallel.parallelize import parallelize

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    out = {}
    for layout, sizes in (("ddp", (2, 1)), ("fsdp", (2, 1)), ("tp", (1, 2))):
        model = Ranked()
        if layout != "ddp":  # the project's own FSDP2 units (and tensor-parallel plan)
            mesh = init_device_mesh("cpu", sizes, mesh_dim_names=("data_parallel", "tensor_parallel"))
            parallelize(model.transformer, mesh)
            for module in model.extra if layout == "fsdp" else ():  # uneven row shards (19 + 18)
                fully_shard(module, mesh=mesh["data_parallel"])
        optimizer = shared_optimizer(model, shard_over=dist.group.WORLD if layout == "ddp" else None)
        for step in range(3):
            for name, p in model.named_parameters():
                grad = step_grads(model, step)[name]
                p.grad = (
                    distribute_tensor(grad, p.device_mesh, p.placements) if isinstance(p, DTensor) else grad
                )
            optimizer.step()
        counts = [None, None]
        dist.all_gather_object(counts, optimizer.matrices_orthogonalised)
        out[layout] = {"results": muon_results(model, optimizer), "counts": counts}
    if rank == 0:
        torch.save(out, f"{folder}/shared.pt")
    dist.destroy_process_group()


def test_ddp_and_fsdp2_share_the_orthogonalisations_and_equal_one_process(tmp_path):
    from tests.distributed.conftest import free_port

    torch.multiprocessing.spawn(_shared_worker, args=(free_port(), str(tmp_path)), nprocs=2)
    model = Ranked()
    optimizer = shared_optimizer(model)
    for step in range(3):
        for name, p in model.named_parameters():
            p.grad = step_grads(model, step)[name]
        optimizer.step()
    expected, total = muon_results(model, optimizer), optimizer.matrices_orthogonalised
    shared = torch.load(tmp_path / "shared.pt")
    for layout in ("ddp", "fsdp", "tp"):
        counts = shared[layout]["counts"]
        if layout == "tp":  # every rank orthogonalises every matrix (its shards are not whole rows)
            assert counts == [total, total]
        else:  # each matrix once, about half on each rank
            assert sum(counts) == total and all(abs(c - total / 2) <= 1 for c in counts), (layout, counts)
        for key, value in shared[layout]["results"].items():
            torch.testing.assert_close(value, expected[key], atol=1e-6, rtol=1e-5, msg=f"{layout} {key}")
