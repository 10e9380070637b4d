"""User-facing errors: a user's mistake becomes one message and exit code 2, never a traceback."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

USAGE_EXIT_CODE = 2


@dataclass
class Problem:
    """One thing wrong with the user's input, located as precisely as we can."""

    message: str
    file: str | Path | None = None
    line: int | None = None
    fix: str | None = None

    def __str__(self) -> str:
        where = ""
        if self.file is not None:
            where = f"{self.file}:{self.line}: " if self.line is not None else f"{self.file}: "
        text = f"{where}{self.message}"
        return f"{text}\n  fix: {self.fix}" if self.fix else text


@dataclass
class UserError(Exception):
    """Raised for bad input (config, data, paths, options); the CLI prints it and exits with code 2.

    Carries every problem found, so that the user can fix them all at once.
    """

    problems: list[Problem] = field(default_factory=list)

    @classmethod
    def one(
        cls, message: str, file: str | Path | None = None, line: int | None = None, fix: str | None = None
    ) -> UserError:
        return cls([Problem(message, file, line, fix)])

    def __str__(self) -> str:
        if len(self.problems) == 1:
            return str(self.problems[0])
        lines = [f"{len(self.problems)} problems:"]
        lines += [f"- {problem}".replace("\n", "\n  ") for problem in self.problems]
        return "\n".join(lines)


def pickled_objects_refused(path: str | Path, error: Exception) -> UserError:
    """A `.bin` weight file that `torch.load(weights_only=True)` refused: it would run code if unpickled."""
    return UserError.one(
        f"refused: the file holds pickled objects that are not tensors ({str(error).splitlines()[0]})",
        path,
        fix="use the checkpoint's original weight files, or convert them to safetensors where you trust them",
    )


class RunStopped(Exception):
    """A run that stopped before its end (interrupted, diverged, out of memory): the CLI prints the message, which
    says what was saved and how to go on, and exits with `exit_code` (no traceback)."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code
