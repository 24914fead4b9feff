"""ShardedStrategy: Lightning's ModelParallelStrategy (FSDP2 + tensor parallelism) made safe to resume.

What it adds (Lightning 2.6's strategy is experimental, and these were found on it):
- sizes: `data_parallel_size="auto"` is every device not used by tensor parallelism
  (Lightning's "auto" is the number of nodes); `tensor_parallel_size="auto"` is the devices of
  one node. So configs/strategy/fsdp.yaml is FSDP2 over all devices on any cluster.
- atomic sharded checkpoints: Lightning writes the shards into an existing folder in place, so a
  kill mid-save leaves a folder mixing two steps (and shards of an older, larger run stay).
  Here every rank writes into a fresh folder beside the target, and rank 0 renames it over the
  target after a barrier (io.atomic.AtomicFolder: the previous one is never damaged).
- ordinary single-file checkpoints (one device, DDP, `consolidate`) resume here: Lightning maps
  their optimizer state's integer ids to parameters in `model.parameters()` order, but torch
  numbers them in param-group order (ours: decayed weights first), which gives wrong moments or
  a shape error; here the ids are mapped through the optimizer's own groups. Old-layout weights
  are upgraded on the way.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch
from lightning.fabric.strategies.model_parallel import _setup_device_mesh
from lightning.pytorch.strategies import ModelParallelStrategy

from llm_lightning.errors import UserError
from llm_lightning.io.atomic import AtomicFolder
from llm_lightning.io.checkpoint import FORMAT_KEY, MODEL_PREFIX, check_shards, model_config, upgrade_weights


class ShardedStrategy(ModelParallelStrategy):
    def __init__(
        self, data_parallel_size: int | str = "auto", tensor_parallel_size: int | str = 1, **kwargs
    ) -> None:
        """
        Args:
            data_parallel_size: ranks that shard the model with FSDP2 ("auto": all devices not used
                by tensor parallelism).
            tensor_parallel_size: ranks that split each layer ("auto": the devices of one node).
        """
        super().__init__(
            data_parallel_size=data_parallel_size, tensor_parallel_size=tensor_parallel_size, **kwargs
        )
        self._sizes = (data_parallel_size, tensor_parallel_size)

    def tensor_parallel_size(self, devices_per_node: int) -> int:
        size = self._sizes[1]
        return devices_per_node if size == "auto" else int(size)

    def setup_environment(self) -> None:
        self._setup_distributed()
        tp = self.tensor_parallel_size(self.num_processes)
        dp = self.world_size // tp if self._sizes[0] == "auto" else int(self._sizes[0])
        if tp < 1 or dp < 1 or dp * tp != self.world_size:
            raise UserError(
                f"strategy sizes: data_parallel_size {dp} x tensor_parallel_size {tp} must equal the "
                f"{self.world_size} devices (--trainer.devices x --trainer.num_nodes); change one of them"
            )
        self._data_parallel_size, self._tensor_parallel_size = dp, tp
        self._device_mesh = _setup_device_mesh(dp, tp, self.world_size, self.root_device)
        self.lightning_module._device_mesh = self._device_mesh

    # ----------------------------------------------------------------- saving
    def save_checkpoint(self, checkpoint: dict, filepath, storage_options=None) -> None:
        if not self._save_distributed_checkpoint:
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        path = Path(self.broadcast(str(filepath)))
        folder = AtomicFolder(path) if self.global_rank == 0 else None
        work = self.broadcast(str(folder.__enter__().work) if folder else None)
        try:
            super().save_checkpoint(checkpoint, work, storage_options)  # every rank writes its shard
            self.barrier("sharded checkpoint written")
            if folder is not None:
                folder.commit()
        finally:
            if folder is not None:
                folder.__exit__(None, None, None)
        self.barrier("sharded checkpoint in place")

    def remove_checkpoint(self, filepath) -> None:
        if self.global_rank == 0:
            super().remove_checkpoint(filepath)

    # ----------------------------------------------------------------- loading
    def load_checkpoint(self, checkpoint_path, weights_only=None) -> dict:
        path = Path(self.broadcast(str(checkpoint_path)))
        if not path.is_dir():
            return self._load_single_file(path)
        check_shards(path)  # on every rank, before any collective: a damaged file is one line, not a hang
        try:
            return super().load_checkpoint(path, weights_only)
        except (OSError, EOFError, AssertionError, pickle.UnpicklingError) as error:
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise UserError(
                f"--ckpt_path {path}: not a readable sharded checkpoint (damaged?): {reason}"
            ) from None

    def _load_single_file(self, path: Path) -> dict:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        checkpoint = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        weights = {k.removeprefix(MODEL_PREFIX): v for k, v in checkpoint.pop("state_dict").items()}
        weights = upgrade_weights(weights, model_config(checkpoint), checkpoint.get(FORMAT_KEY, 1))
        options = StateDictOptions(full_state_dict=True, strict=self.lightning_module.strict_loading)
        set_model_state_dict(self.model, {MODEL_PREFIX + k: v for k, v in weights.items()}, options=options)
        for optimizer, state in zip(self.optimizers, checkpoint.get("optimizer_states", []), strict=False):
            named = optimizer_state_by_name(state, parameter_names(self.model, optimizer))
            set_optimizer_state_dict(self.model, optimizer, optim_state_dict=named, options=options)
        return checkpoint


def parameter_names(module: torch.nn.Module, optimizer) -> list[str]:
    """The optimizer's parameters, by name, in the order torch numbers them (param-group order)."""
    names = {id(p): clean_name(n) for n, p in module.named_parameters(remove_duplicate=False)}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def clean_name(name: str) -> str:
    """A parameter's name without the wrappers' prefixes (activation checkpointing, compile)."""
    return name.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", "")


def optimizer_state_by_name(state: dict, names: list[str]) -> dict:
    """torch's optimizer state dict keyed by position -> keyed by parameter name."""
    if state["state"] and not isinstance(next(iter(state["state"])), int):
        return state
    return {
        "state": {names[i]: value for i, value in state["state"].items()},
        "param_groups": [
            {**group, "params": [names[i] for i in group["params"]]} for group in state["param_groups"]
        ],
    }
