"""Reading checkpoints outside Lightning: older layouts upgraded, the newest checkpoint found, atomic
folders (and files replacing them), damaged sharded folders named in one line."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from llm_lightning.errors import UserError
from llm_lightning.io.atomic import AtomicFolder, atomic_link, atomic_write, recover_folder
from llm_lightning.io.checkpoint import (
    FORMAT_KEY,
    is_sharded,
    latest_checkpoint,
    load_checkpoint,
    load_model,
    read_header,
)
from llm_lightning.model import ModelConfig, Transformer
from llm_lightning.model.layers import split_gate_up, split_qkv
from llm_lightning.tools import consolidate
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


def sharded_folder(folder: Path) -> Path:
    """A sharded checkpoint as torch.distributed.checkpoint writes it (.metadata, a shard) and
    Lightning's meta.pt beside it; written by one process, read back by `load_checkpoint`."""
    import torch.distributed.checkpoint as dcp

    weights = {"model.embed.weight": torch.arange(24.0).reshape(6, 4)}
    with warnings.catch_warnings():  # "assuming the intent is to save in a single process": it is
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save({"state_dict": weights}, checkpoint_id=folder, no_dist=True)
    torch.save({"hyper_parameters": {"vocab_size": 6}, "global_step": 3}, folder / "meta.pt")
    return folder


def test_a_sharded_folder_reads_back_whole(tmp_path):
    checkpoint = load_checkpoint(sharded_folder(tmp_path / "last.ckpt"))
    assert checkpoint["global_step"] == 3
    assert torch.equal(checkpoint["state_dict"]["model.embed.weight"], torch.arange(24.0).reshape(6, 4))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGES = {
    "truncated shard": (lambda f: truncate(next(f.glob("*.distcp"))), "__0_0.distcp: truncated"),
    "missing shard": (lambda f: next(f.glob("*.distcp")).unlink(), "__0_0.distcp: missing"),
    "garbage .metadata": (
        lambda f: (f / ".metadata").write_bytes(b"garbage, not a pickle" * 20),
        ".metadata: not readable",
    ),
    "truncated meta.pt": (lambda f: truncate(f / "meta.pt"), "meta.pt: not readable"),
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_sharded_folder_is_one_line_naming_the_file(tmp_path, damage):
    folder = sharded_folder(tmp_path / "last.ckpt")
    spoil, expected = DAMAGES[damage]
    spoil(folder)
    for read in (load_checkpoint, read_header):  # generate/export/consolidate; validate/fit's check
        with pytest.raises(UserError, match=expected) as error:
            read(folder)
        assert "\n" not in str(error.value) and str(folder) in str(error.value)


def test_consolidate_overwrites_only_a_checkpoint(tmp_path):
    """`--overwrite` replaces an earlier output, never another file (a data folder's metadata.json)."""
    folder = sharded_folder(tmp_path / "last.ckpt")
    foreign = tmp_path / "metadata.json"
    foreign.write_text('{"vocab_size": 6}')
    with pytest.raises(UserError, match="not an llm-lightning checkpoint; --overwrite only replaces"):
        consolidate.main(["--ckpt_path", str(folder), "--output", str(foreign), "--overwrite"])
    assert foreign.read_text() == '{"vocab_size": 6}'
    output = tmp_path / "one.ckpt"
    consolidate.main(["--ckpt_path", str(folder), "--output", str(output)])
    with pytest.raises(UserError, match="already exists; pass --overwrite"):
        consolidate.main(["--ckpt_path", str(folder), "--output", str(output)])
    os.utime(output, (0, 0))
    consolidate.main(
        ["--ckpt_path", str(folder), "--output", str(output), "--overwrite"]
    )  # its own: replaced
    assert output.stat().st_mtime > 0 and load_checkpoint(output)["global_step"] == 3


def test_a_file_replaces_a_folder_of_the_same_name_and_back(tmp_path):
    """One device after a sharded run (and back) writes last.ckpt where the other kind is."""
    target = sharded_folder(tmp_path / "last.ckpt")
    atomic_write(target, lambda stream: stream.write(b"file"))
    assert target.read_bytes() == b"file" and os.listdir(tmp_path) == ["last.ckpt"]
    with AtomicFolder(target) as folder:
        (folder.work / "a").write_text("folder")
        folder.commit()
    assert (target / "a").read_text() == "folder" and os.listdir(tmp_path) == ["last.ckpt"]


def test_a_file_writer_killed_after_moving_the_folder_aside_loses_nothing(tmp_path):
    """A real process dies between its two renames; the next reader finds the previous folder."""
    target = sharded_folder(tmp_path / "last.ckpt")
    script = (
        "import os, sys; from llm_lightning.io import atomic\n"
        "atomic.os.replace = lambda *a: os._exit(9)  # die right after the folder was moved aside\n"
        "atomic.atomic_write(sys.argv[1], lambda s: s.write(b'new'))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    died = subprocess.run([sys.executable, "-c", script, str(target)], env=env, timeout=60)
    assert died.returncode == 9 and not target.exists()
    AtomicFolder.recover(target)
    assert load_checkpoint(target)["global_step"] == 3


def test_last_as_a_link_replaces_a_file_or_a_folder_and_is_read_through(tmp_path):
    """`save_last: link`: last.ckpt becomes a relative link in one rename, over either kind."""
    step = sharded_folder(tmp_path / "checkpoint_step_3.ckpt")
    last = tmp_path / "last.ckpt"
    last.write_bytes(b"an older full last.ckpt")
    atomic_link(step, last)
    assert os.readlink(last) == "checkpoint_step_3.ckpt" and load_checkpoint(last)["global_step"] == 3
    atomic_write(last, lambda stream: stream.write(b"full"))  # a final state off the interval
    assert last.read_bytes() == b"full" and load_checkpoint(step)["global_step"] == 3  # the target kept
    sharded_folder(tmp_path / "other.ckpt")
    with AtomicFolder(last) as folder:  # a sharded final state over the file
        (folder.work / "a").write_text("folder")
        folder.commit()
    atomic_link(tmp_path / "other.ckpt", last)  # over a folder
    assert os.readlink(last) == "other.ckpt" and is_sharded(last)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint_step_3.ckpt", "last.ckpt", "other.ckpt"]


def test_a_resume_clears_every_dead_writers_leftovers(tmp_path):
    """A run killed while saving checkpoint_step_2 (a resume may never save that name again)."""
    dead = 2**22 + 12345  # a process id that is not running
    work = tmp_path / f"checkpoint_step_2.ckpt.tmp-{socket.gethostname()}-{dead}-k2j4"
    work.mkdir()
    live = tmp_path / f"last.ckpt.tmp-{socket.gethostname()}-{os.getpid()}-link"
    live.symlink_to("nowhere")  # a live writer's: left alone
    recover_folder(tmp_path)
    assert sorted(os.listdir(tmp_path)) == [live.name]
