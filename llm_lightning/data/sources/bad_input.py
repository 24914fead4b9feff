"""Bad input: raised as a `UserError` naming the file and line, or skipped and recorded."""

from __future__ import annotations

from llm_lightning.errors import UserError

ON_BAD_INPUT = ("error", "skip")
_STREAM_FIX = "re-create or re-download the file"


class _BadInput:
    """Raises `UserError` for a bad file or line, or records it when skipping."""

    def __init__(self, mode: str, skipped: list[dict]):
        if mode not in ON_BAD_INPUT:
            raise UserError(f"--on_bad_input must be one of {', '.join(ON_BAD_INPUT)}, not {mode!r}")
        self.mode, self.skipped = mode, skipped

    def __call__(self, path: str, line: int | None, reason: str, fix: str) -> None:
        where = f"{path}" if line is None else f"{path}:{line}"
        if self.mode == "error":
            raise UserError(f"{where}: {reason}; {fix} or pass --on_bad_input skip")
        self.skipped.append({"file": path, "line": line, "reason": reason})


def _one_line(error: BaseException, limit: int = 200) -> str:
    text = "".join(c if c.isprintable() else " " for c in str(error))
    text = " ".join(text.split()) or type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
