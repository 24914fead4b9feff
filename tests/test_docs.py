"""The documentation: every `llm-lightning ...` command in README.md and docs/ parses with the
current command line (a dry parse: nothing is read, trained or written), the repository files
it names exist, and the site builds in strict mode (a broken link or anchor fails).

Conventions the pages follow (docs/index.md says them to readers): a path that starts with `./`,
`/`, `~` or `$`, or holds a `<placeholder>`, is the reader's own; a path under one of the
repository's folders (REPO_FOLDERS: configs/, scripts/, ...) must exist, and so must every
`--config` file that is not the reader's own.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from llm_lightning.cli import TOOLS
from llm_lightning.errors import UserError

REPO = Path(__file__).resolve().parents[1]
LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test", "predict")
# Tools whose parser lives beside their main (module -> where build_parser is).
PARSER_MODULES = {"prepare": "llm_lightning.data.prepare.options"}
# A relative path under one of these names the repository's own file; any other is the reader's.
REPO_FOLDERS = ("configs", "scripts", "benchmarks", "tests", "llm_lightning", "docs", ".ci")
SHELL_OPERATORS = {"|", "||", "&&", ";", "&", ">", ">>", "<", "2>", "2>&1", ")", "("}
PLACEHOLDER = "PLACEHOLDER"  # what a `<placeholder>` becomes: any string parses the same


def code_blocks(text: str) -> list[tuple[int, str]]:
    """(line number, text) of each fenced code block, indented ones (in a list item) included."""
    blocks, start, lines = [], None, []
    for number, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("```"):
            if start is not None:
                blocks.append((start, "\n".join(lines)))
            start, lines = (number + 1, []) if start is None else (None, [])
        elif start is not None:
            lines.append(line)
    return blocks


def documentation_files() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


# ------------------------------------------------------------------ finding the commands
def shell_lines(block: str) -> list[str]:
    """The block's lines with backslash continuations joined."""
    lines, current = [], ""
    for raw in block.splitlines():
        line = raw.rstrip()
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        lines.append(current + line)
        current = ""
    if current:
        lines.append(current)
    return lines


def words(line: str) -> list[str]:
    """Shell words of a line, comments dropped, operators (|, &&, >) as words of their own."""
    line = re.sub(r"<[^<>\s][^<>]*>", PLACEHOLDER, line)  # `<your folder>` is not a redirection
    lexer = shlex.shlex(line, posix=True, punctuation_chars="|&;<>()")
    lexer.whitespace_split = True
    lexer.commenters = "#"
    try:
        return list(lexer)
    except ValueError:  # an unbalanced quote: not a shell line (output, prose)
        return []


def command_after_program(tokens: list[str]) -> list[str] | None:
    """The arguments given to llm-lightning (`llm-lightning`, `.venv/bin/llm-lightning`,
    `python -m llm_lightning`, `torchrun ... -m llm_lightning`), up to a shell operator."""
    for i, token in enumerate(tokens):
        program = token.endswith("llm-lightning") and (i == 0 or _is_prefix(tokens[:i]))
        module = token == "llm_lightning" and i > 0 and tokens[i - 1] == "-m"
        if not (program or module):
            continue
        rest = tokens[i + 1 :]
        end = next((j for j, word in enumerate(rest) if word in SHELL_OPERATORS), len(rest))
        return rest[:end]
    return None


def _is_prefix(tokens: list[str]) -> bool:
    """Only environment assignments (`FOO=1 llm-lightning ...`), `time` or `srun` before the program."""
    return all(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", t) or t in ("time", "srun", "exec") for t in tokens)


def inline_commands(text: str) -> list[tuple[int, str]]:
    """(line number, span) of `llm-lightning SUBCOMMAND --flag ...` in the prose: spans that give
    flags are commands; a bare `llm-lightning fit` names one."""
    fenced = {
        n for start, block in code_blocks(text) for n in range(start - 1, start + block.count("\n") + 2)
    }
    spans = []
    for number, line in enumerate(text.splitlines(), 1):
        if number not in fenced:
            spans += [(number, span) for span in re.findall(r"`([^`]+)`", line) if " --" in span]
    return spans


def without_ellipses(argv: list[str]) -> list[str]:
    """`--flag ...` stands for any value (a placeholder); a lone `...` for flags left out;
    `[--flag value]` (a usage line's optional part) is checked as `--flag value`."""
    argv, optional = list(argv), False
    for i, word in enumerate(argv):
        if word.startswith("[-"):
            argv[i], optional = word[1:], True
        if optional and argv[i].endswith("]"):
            argv[i], optional = argv[i][:-1], False
    return [
        PLACEHOLDER if word == "..." else word
        for i, word in enumerate(argv)
        if word != "..." or (i > 0 and argv[i - 1].startswith("--") and "=" not in argv[i - 1])
    ]


def documented_commands() -> list[tuple[str, list[str]]]:
    """(where, argv) of every llm-lightning command in the README and docs/: every line of a
    code block, and the inline spans that give flags."""
    found = []
    for path in documentation_files():
        text = path.read_text()
        lines = [(start, line) for start, block in code_blocks(text) for line in shell_lines(block)]
        for number, line in lines + inline_commands(text):
            argv = command_after_program(words(line))
            if argv:
                found.append((f"{path.relative_to(REPO)}:{number}: {line.strip()}", without_ellipses(argv)))
    return found


# ------------------------------------------------------------------ checking one command
class Parsed(Exception):
    """Raised in place of LightningCLI's instantiation: the parse is all the check needs."""


@pytest.fixture(scope="module")
def lightning_parser(monkeypatch_module):
    """LLMCLI's real parser (subcommands, configs, every class's arguments), built once."""
    from llm_lightning.training import cli

    captured = {}

    def parse_only(self, parser, args):
        captured["parser"] = parser
        raise Parsed

    monkeypatch_module.setattr(cli.LLMCLI, "parse_arguments", parse_only)
    with pytest.raises(Parsed):
        cli.run_lightning_cli(["fit"])
    return captured["parser"]


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def tool_parse(name: str):
    """The tool's dry parse: its build_parser().parse_args, or its parse_args."""
    module = importlib.import_module(PARSER_MODULES.get(name, TOOLS[name]))
    if hasattr(module, "build_parser"):
        return module.build_parser().parse_args
    if hasattr(module, "parse_args"):
        return module.parse_args
    raise AssertionError(f"{TOOLS[name]} has neither build_parser() nor parse_args(): add one for this test")


def dry_parse(argv: list[str], lightning_parser) -> None:
    """Raise (argparse.ArgumentError, UserError, SystemExit) when the command does not parse."""
    subcommand = argv[0]
    if subcommand in ("-h", "--help", "help") or "--help" in argv or "-h" in argv:
        return  # prints the usage; every subcommand has one
    if subcommand in LIGHTNING_SUBCOMMANDS:
        lightning_parser.parse_args(argv)
    elif subcommand in TOOLS:
        tool_parse(subcommand)(argv[1:])
    else:
        raise UserError(
            f"no subcommand {subcommand!r} (choose from {', '.join(LIGHTNING_SUBCOMMANDS + tuple(TOOLS))})"
        )


def is_readers_own(word: str) -> bool:
    return word.startswith(("./", "/", "~", "$")) or PLACEHOLDER in word


def missing_repo_paths(argv: list[str]) -> list[str]:
    """Words that name a repository path (under a top-level folder, or a --config file) that is not there."""
    missing = []
    for i, word in enumerate(argv):
        value = word.split("=", 1)[1] if word.startswith("--") and "=" in word else word
        if is_readers_own(value) or value.startswith("-"):
            continue
        is_config = i > 0 and argv[i - 1] in ("--config", "-c") or word.startswith("--config=")
        in_repo = "/" in value and value.split("/", 1)[0] in REPO_FOLDERS
        if (is_config or in_repo) and not (REPO / value).exists():
            missing.append(value)
    return missing


def check(argv: list[str], lightning_parser) -> str | None:
    """None when the command parses and its repository paths exist; else why not, in one line."""
    try:
        dry_parse(argv, lightning_parser)
    except (argparse.ArgumentError, UserError) as error:
        return re.sub(r"\s+", " ", str(error))[:300]
    except SystemExit as error:  # --print_config exits 0 once parsed; a usage error does not
        return f"exit {error.code}" if error.code else None
    missing = missing_repo_paths(argv)
    return f"no such file in the repository: {', '.join(missing)}" if missing else None


# ------------------------------------------------------------------ the tests
def test_every_documented_command_parses_with_the_current_cli(lightning_parser, monkeypatch):
    monkeypatch.chdir(REPO)  # --config paths are relative to the repository
    commands = documented_commands()
    subcommands = {argv[0] for _, argv in commands}
    # The extraction itself works: the pages show the main commands.
    assert {"prepare", "fit", "generate", "export", "monitor"} <= subcommands, subcommands
    failures = [
        f"{where}\n    -> {why}" for where, argv in commands if (why := check(argv, lightning_parser))
    ]
    assert not failures, f"{len(failures)} documented command(s) do not parse:\n" + "\n".join(failures)


@pytest.mark.parametrize(
    "line",
    [
        "llm-lightning fit --config configs/tiny.yaml --model.hiden_size 64",  # misspelt flag
        "llm-lightning fit --config configs/tiny.yaml --config configs/strategy/nope.yaml",  # missing config
        "llm-lightning prepare --input_dir ./raw_text_data --output_dir ./processed_data --vocab_sise 8",
        "CUDA_VISIBLE_DEVICES=0 llm-lightning generate --ckpt_path ./last.ckpt --temprature 0",
        "torchrun --nproc_per_node=2 -m llm_lightning fit --trainer.devicez 2",
        "llm-lightning train --config configs/tiny.yaml",  # no such subcommand
        "llm-lightning monitor --checkpoint_dir ./checkpoints --plot scripts/missing/loss.png",
    ],
)
def test_the_checker_catches_a_bad_command(line, lightning_parser, monkeypatch):
    monkeypatch.chdir(REPO)
    argv = command_after_program(words(" ".join(shell_lines(line))))
    assert argv, line
    assert check(argv, lightning_parser) is not None, f"the checker passed a bad command: {line}"


def test_the_checker_reads_continuations_prefixes_and_configs(lightning_parser, monkeypatch):
    monkeypatch.chdir(REPO)
    block = (
        "OMP_NUM_THREADS=2 llm-lightning fit --config configs/tiny.yaml \\\n"
        "    --config configs/precision/fp32.yaml --data.data_dir ./processed_data  # a comment\n"
        "llm-lightning export --ckpt_path <your checkpoint> --output_dir ./hf_model | tee log\n"
    )
    commands = [command_after_program(words(line)) for line in shell_lines(block)]
    assert commands[0][-2:] == ["--data.data_dir", "./processed_data"]
    assert commands[1][-1] == "./hf_model"
    assert all(check(argv, lightning_parser) is None for argv in commands)
    # Prose elides: `fit ... --trainer.devices 4`, `prepare --input_dir ... --output_dir ./out`.
    assert without_ellipses(["fit", "...", "--trainer.devices", "4"]) == ["fit", "--trainer.devices", "4"]
    assert without_ellipses(["prepare", "--input_dir", "...", "--output_dir", "./out"])[2] == PLACEHOLDER
    assert without_ellipses(["eval", "[--limit", "5]", "[--seed]"]) == ["eval", "--limit", "5", "--seed"]
    assert inline_commands(
        "Run `llm-lightning fit --config configs/tiny.yaml`, not `llm-lightning fit`."
    ) == [(1, "llm-lightning fit --config configs/tiny.yaml")]


def test_the_readmes_links_into_the_docs_exist():
    """README.md is outside the site's build: its links to pages and their anchors are checked here."""
    from markdown.extensions.toc import slugify

    broken = []
    for target, anchor in re.findall(
        r"\]\((?!https?:)([^)#\s]+)(?:#([^)\s]+))?\)", (REPO / "README.md").read_text()
    ):
        path = REPO / target
        if not path.exists():
            broken.append(target)
        elif anchor and path.suffix == ".md":
            headings = re.findall(r"^#+ (.+)$", path.read_text(), re.M)
            if anchor not in {slugify(heading, "-") for heading in headings}:
                broken.append(f"{target}#{anchor}")
    assert not broken, f"README.md links to what is not there: {broken}"


def test_the_site_builds_in_strict_mode(tmp_path):
    """`make docs`: mkdocs strict mode fails on a broken link, anchor or nav entry (mkdocs-material
    comes with the `docs` extra, which `make install` installs)."""
    mkdocs = shutil.which("mkdocs", path=str(Path(sys.executable).parent)) or "mkdocs"
    result = subprocess.run(
        [mkdocs, "build", "--strict", "--quiet", "--site-dir", str(tmp_path / "site")],
        cwd=REPO, capture_output=True, text=True, timeout=120, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (tmp_path / "site" / "index.html").is_file()
