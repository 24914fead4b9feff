"""TextDataModule: the prepared token files as Lightning dataloaders.

`vocab_size`, `max_length` and `eos_id` are read from metadata.json in `__init__`, so
LightningCLI can link them into the model before anything is set up. `batch_size` is the
global batch per optimizer step (the seed's meaning); `micro_batch_size` is what one device
holds per forward; `accumulation_steps` turns both into the trainer's accumulation.

Training reads one endless stream of windows (sampler.py); the module's state in a
checkpoint is its position in that stream, counted in windows, plus the tokenizer, so a
resume continues the stream exactly (with any batch split or device count) and never meets
data made with another tokenizer. Data parallelism comes from the strategy
(`distributed_sampler_kwargs`): under tensor parallelism the ranks of one group read the
same micro-batch.

`data_dir` is a prepared folder, a merged one (its shards read as one split, windows never
crossing a shard), or a list of them: a mixture (mixture.py), drawn by `weights` through a
`MixtureOrder`, with per-source epochs (`epochs_by_source`) and validation batches that carry
their source's index so the module can report `val/loss/<name>` beside `val/loss`.
"""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader

from llm_lightning.data.mixture import Source, common_stride, normalized_weights, open_sources
from llm_lightning.data.sampler import StreamSampler, make_order
from llm_lightning.data.tokenizers import fingerprint
from llm_lightning.data.windows import FileWindows, ScoredFileWindows
from llm_lightning.errors import UserError


def accumulation_steps(batch_size: int, micro_batch_size: int, data_parallel_size: int) -> int:
    """Micro-batches per optimizer step on each rank, so that the global batch is batch_size."""
    per_pass = micro_batch_size * data_parallel_size
    if batch_size < 1 or micro_batch_size < 1 or batch_size % per_pass:
        raise UserError(
            f"--data.batch_size {batch_size} must be a positive multiple of --data.micro_batch_size "
            f"{micro_batch_size} x {data_parallel_size} data-parallel rank(s) = {per_pass}; change one of them"
        )
    return batch_size // per_pass


class TextDataModule(L.LightningDataModule):
    def __init__(
        self,
        data_dir: str | list[str] = "./processed_data",
        weights: list[float] | None = None,
        batch_size: int = 32,
        micro_batch_size: int | None = None,
        stride: int | None = None,
        num_workers: int = 2,
        pin_memory: bool = True,
        seed: int = 1337,
    ) -> None:
        """
        Args:
            data_dir: output folder of `llm-lightning prepare` (or of `merge-shards`), or a list of
                them to train on a mixture: `[web, code]`.
            weights: with a list of folders, the share of training windows drawn from each
                (`[0.75, 0.25]`); defaults to their sizes (one concatenated dataset).
            batch_size: global batch, in sequences per optimizer step (across all devices).
            micro_batch_size: sequences per device per forward pass; defaults to batch_size
                (no accumulation on one device).
            stride: tokens between the starts of consecutive training windows; defaults to the
                stride the data was prepared with.
            num_workers: DataLoader worker processes per device.
            pin_memory: page-locked host memory for faster copies to a GPU.
            seed: seed of the order of training windows.
        """
        super().__init__()
        self.save_hyperparameters()
        self.sources: list[Source] = open_sources(data_dir)
        self.source_names = [source.name for source in self.sources]
        self.val_bytes_per_token = [source.val_bytes_per_token for source in self.sources]
        self.data_dir = self.sources[0].folder  # the first folder: messages name it
        self.metadata = combined_metadata(self.sources)
        self.vocab_size: int = self.metadata["vocab_size"]
        self.max_length: int = self.metadata["max_length"]
        self.eos_id: int = self.metadata["eos_id"]
        self.weights = normalized_weights(weights, self.sources)
        self.batch_size = batch_size
        self.micro_batch_size = micro_batch_size or batch_size
        self.stride = common_stride(self.sources, stride)
        if not 1 <= self.stride <= self.max_length:
            raise UserError(f"--data.stride {self.stride} must be between 1 and max_length {self.max_length}")
        self.num_workers, self.pin_memory, self.seed = num_workers, pin_memory, seed
        self.tokenizer_files = self.sources[0].tokenizer_files
        self.tokenizer_fingerprint = fingerprint(self.tokenizer_files)
        self.resume_position = 0  # windows of the stream consumed before this run (from a checkpoint)
        self._stream_start: tuple[int, int] | None = None  # (position, global step) when training started
        self._order = None  # the stream's order, once the training windows are known
        self.num_train_windows: int | None = None
        self._layout: list[int] | None = None  # window_layout(), once read

    # ----------------------------------------------------------------- geometry
    def data_parallel(self) -> tuple[int, int]:
        """(rank, size) of this process among the data-parallel ranks."""
        strategy = getattr(self.trainer, "strategy", None)
        kwargs = getattr(strategy, "distributed_sampler_kwargs", None) or {}
        return kwargs.get("rank", 0), kwargs.get("num_replicas", 1)

    def accumulation(self) -> int:
        return accumulation_steps(self.batch_size, self.micro_batch_size, self.data_parallel()[1])

    @property
    def position(self) -> int:
        """Windows of the training stream consumed after the last completed optimizer step."""
        if self._stream_start is None:
            return self.resume_position
        start, step = self._stream_start
        return start + (self.trainer.global_step - step) * self.batch_size

    def train_windows(self) -> tuple[FileWindows, list[int]]:
        """All sources' training windows, one source after the other, and how many each has."""
        files = [source.files("train") for source in self.sources]
        windows = FileWindows(sum(files, []), self.metadata["dtype"], self.max_length, self.stride)
        counts = iter(windows.counts)
        sizes = [sum(next(counts) for _ in group) for group in files]
        shares = self.weights or [1.0] * len(sizes)
        for source, size, share in zip(self.sources, sizes, shares, strict=True):
            if size == 0 and share > 0:
                raise UserError(
                    f"{source.folder}: its train split has fewer than max_length + 1 = {self.max_length + 1} tokens, "
                    "not one window; prepare more text or a smaller --max_length"
                )
        return windows, sizes

    def val_windows(self) -> ScoredFileWindows:
        """All sources' validation windows, each tagged with its source's index."""
        paths, tags = [], []
        for index, source in enumerate(self.sources):
            for path in source.files("val"):
                paths.append(path)
                tags.append(index)
        rank, world = self.data_parallel()
        windows = ScoredFileWindows(
            paths, tags, self.metadata["dtype"], self.max_length, self.stride, rank, world
        )
        for path, size, count in zip(paths, windows.sizes, windows.counts, strict=True):
            if count == 0:  # its tokens could not be scored, so the loss would not be the split's
                raise UserError(
                    f"{path}: {size} tokens, fewer than max_length + 1 = {self.max_length + 1}, not one window; "
                    "prepare more text or a smaller --max_length"
                )
        return windows

    def _loader_options(self) -> dict:
        return dict(
            batch_size=self.micro_batch_size,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory and torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0,
        )

    # ----------------------------------------------------------------- loaders
    def train_dataloader(self) -> DataLoader:
        windows, sizes = self.train_windows()
        if len(windows) < self.batch_size:
            raise UserError(
                f"{self.data_dir}: {len(windows)} training windows, fewer than one batch of "
                f"{self.batch_size}; lower --data.batch_size or prepare more text"
            )
        rank, world = self.data_parallel()
        self.num_train_windows = len(windows)
        self._stream_start = (self.resume_position, self.trainer.global_step if self.trainer else 0)
        self._order = make_order(sizes, self.weights, self.seed)
        sampler = StreamSampler(self._order, self.resume_position, self.micro_batch_size, rank, world)
        return DataLoader(windows, sampler=sampler, **self._loader_options())

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_windows(), shuffle=False, **self._loader_options())

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    def predict_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    def epochs_seen(self) -> float:
        """Passes over the training windows so far (fractional; for a mixture, over all of them)."""
        return self.position / max(self.num_train_windows or len(self.train_windows()[0]), 1)

    def epochs_by_source(self) -> dict[str, float]:
        """`train/epochs/<name>`: passes over each source's windows so far (a mixture only)."""
        if len(self.sources) == 1:
            return {}
        order = self._order or make_order(self.train_windows()[1], self.weights, self.seed)
        drawn = order.drawn(self.position)
        return {
            f"train/epochs/{name}": count / max(size, 1)
            for name, count, size in zip(self.source_names, drawn, order.sizes, strict=True)
        }

    # ----------------------------------------------------------------- checkpoint state
    def state_dict(self) -> dict:
        """Saved in every checkpoint: the tokenizer travels with the model, and the stream position."""
        return {
            "metadata": self.metadata,
            "tokenizer_files": self.tokenizer_files,
            "tokenizer_fingerprint": self.tokenizer_fingerprint,
            "position": self.position,
            "stride": self.stride,
            "seed": self.seed,
            "weights": self.weights,
            "data_dirs": [str(source.folder) for source in self.sources],
            "window_layout": self.window_layout(),
        }

    def window_layout(self) -> list[int]:
        """Training windows per token file, in stream order: the same token total cut into other
        shards gives other windows, which a resumed position would then count wrongly."""
        if self._layout is None:
            self._layout = [int(count) for count in self.train_windows()[0].counts]
        return self._layout

    def load_state_dict(self, state: dict) -> None:
        """Check that the checkpoint meets data made by its own tokenizer; resume the stream."""
        theirs = fingerprint(state["tokenizer_files"]) if state.get("tokenizer_files") else None
        if theirs is not None and theirs != self.tokenizer_fingerprint:
            kind = state.get("metadata", {}).get("tokenizer_type", "another")
            raise UserError(
                f"--data.data_dir {self.data_dir}: prepared with another tokenizer than the checkpoint's "
                f"({self.metadata.get('tokenizer_type')} {self.tokenizer_fingerprint} here, {kind} {theirs} "
                "in the checkpoint); use the data folder the checkpoint was trained on, or prepare this text "
                "with `prepare --tokenizer` pointing at that folder"
            )
        self._check_same_folders(state)
        for name in ("stride", "seed", "weights"):
            if name in state and state[name] != getattr(self, name) and self._resuming_fit():
                raise UserError(
                    f"--data.{name} {getattr(self, name)}: the checkpoint's run used {state[name]}, and its data "
                    f"position counts windows of that order; resume with --data.{name} {state[name]}"
                )
        then = state.get("metadata", {}).get("num_tokens")
        if then and then != self.metadata.get("num_tokens") and self._resuming_fit():
            raise UserError(
                f"--data.data_dir {self.data_dir}: not the data the checkpoint was trained on ({then} tokens then, "
                f"{self.metadata.get('num_tokens')} now), so its position in the data means other windows; resume "
                "on the same folder, or start a new run from its weights (export, then --model.init_from)"
            )
        self._check_same_layout(state)
        self.resume_position = int(state.get("position", 0))

    def _check_same_folders(self, state: dict) -> None:
        """A source added or dropped: the folder list is the difference, whatever the weights say."""
        then = state.get("data_dirs")
        now = [str(source.folder) for source in self.sources]
        if then is not None and len(then) != len(now) and self._resuming_fit():
            raise UserError(
                f"--data.data_dir: {len(now)} folder(s) now ({', '.join(now)}), the checkpoint's run read "
                f"{len(then)} ({', '.join(then)}); its data position counts windows of that list. Resume with "
                "the same folders, or start a new run from its weights (export, then --model.init_from)"
            )

    def _check_same_layout(self, state: dict) -> None:
        then = state.get("window_layout")
        if then is None or not self._resuming_fit():
            return
        now = self.window_layout()
        if then != now:
            raise UserError(
                f"--data.data_dir {self.data_dir}: its training windows are laid out otherwise than the "
                f"checkpoint's data ({sum(then)} windows in {len(then)} token files then, {sum(now)} in "
                f"{len(now)} now: re-sharded or re-prepared?), so its data position means other windows; "
                "resume on the folder it was trained on, or start a new run from its weights (export, then "
                "--model.init_from)"
            )

    def _resuming_fit(self) -> bool:
        trainer = self.trainer
        return trainer is not None and trainer.state.fn == "fit"


def combined_metadata(sources: list[Source]) -> dict:
    """The one folder's metadata, or for a mixture what its folders share and each one's size."""
    if len(sources) == 1:
        return sources[0].metadata
    first = sources[0].metadata
    shared = ("tokenizer_type", "tokenizer_fingerprint", "vocab_size", "eos_id", "dtype", "max_length")
    return {
        **{key: first[key] for key in shared if key in first},
        "sources": [{"name": s.name, "data_dir": str(s.folder)} for s in sources],
        "num_tokens": [s.metadata.get("num_tokens") for s in sources],
    }
