"""Reading checkpoints outside Lightning: older layouts upgraded, the newest checkpoint found, atomic folders."""

from __future__ import annotations

import os
import socket

import torch

from llm_lightning.io.atomic import AtomicFolder
from llm_lightning.io.checkpoint import FORMAT_KEY, latest_checkpoint, load_model
from llm_lightning.model import ModelConfig, Transformer
from llm_lightning.model.layers import split_gate_up, split_qkv
from tests.conftest import randomized


def test_a_checkpoint_of_the_old_layout_gives_the_same_model(tmp_path):
    """llm-lightning 0.1 stacked [q | k | v] and [gate | up]; such files load into today's layout."""
    config = ModelConfig(
        vocab_size=50, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, max_seq_len=16
    )
    model = randomized(Transformer(config)).eval()
    old = {}
    for name, value in model.state_dict().items():
        if name.endswith("qkv_proj.weight"):
            value = torch.cat(split_qkv(value, config))
        elif name.endswith("gate_up_proj.weight"):
            value = torch.cat(split_gate_up(value))
        old[f"model.{name}"] = value
    hparams = {
        "vocab_size": 50,
        "max_length": 16,
        **{k: v for k, v in config.to_dict().items() if k != "max_seq_len"},
    }
    loaded = load_model({"state_dict": old, "hyper_parameters": hparams})  # no format key: format 1
    ids = torch.randint(0, 50, (2, 12))
    torch.testing.assert_close(loaded(ids), model(ids))
    current = {
        "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
        "hyper_parameters": hparams,
    }
    torch.testing.assert_close(load_model({**current, FORMAT_KEY: 2})(ids), model(ids))


def test_latest_checkpoint_prefers_last_then_the_highest_step(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    for step in (2, 10, 9):
        (tmp_path / f"checkpoint_step_{step}.ckpt").write_bytes(b"x")
    assert latest_checkpoint(tmp_path).name == "checkpoint_step_10.ckpt"
    (tmp_path / "last.ckpt").mkdir()  # a sharded one is a folder
    assert latest_checkpoint(tmp_path).name == "last.ckpt"


def test_an_atomic_folder_replaces_the_old_one_only_when_complete(tmp_path):
    target = tmp_path / "last.ckpt"
    with AtomicFolder(target) as folder:
        (folder.work / "a").write_text("1")
        folder.commit()
    with AtomicFolder(target) as folder:  # interrupted: never committed
        (folder.work / "a").write_text("2")
    assert (target / "a").read_text() == "1" and os.listdir(tmp_path) == ["last.ckpt"]


def test_a_writer_killed_between_its_two_renames_is_recovered(tmp_path):
    """The old version had been moved aside, the new one not yet renamed: recover() puts it back."""
    target = tmp_path / "last.ckpt"
    dead = 2**22 + 12345  # a process id that is not running
    aside = tmp_path / f"last.ckpt.tmp-{socket.gethostname()}-{dead}-old"
    aside.mkdir()
    (aside / "a").write_text("previous")
    (tmp_path / f"last.ckpt.tmp-{socket.gethostname()}-{dead}-k2j4").mkdir()  # its unfinished work
    AtomicFolder.recover(target)
    assert (target / "a").read_text() == "previous" and os.listdir(tmp_path) == ["last.ckpt"]
