"""Errors a user can cause. Each maps to one exit code and prints as one line."""

from __future__ import annotations

import shlex


class QatkitError(Exception):
    """Base class: an expected failure with a message meant for the user."""

    exit_code = 1


class RecipeError(QatkitError):
    """Bad input: recipe, CLI argument, data or model path."""

    exit_code = 2

    def __init__(self, problems: str | list[str]):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("; ".join(self.problems))


class EnvError(QatkitError):
    """The environment cannot do it: missing package, hardware, offline data."""

    exit_code = 3


class GateError(QatkitError):
    """A quality gate failed (e.g. train/deploy parity)."""

    exit_code = 4


class Interrupted(QatkitError):
    """Ctrl-C or SIGTERM: state was saved and the run can be resumed."""

    exit_code = 130

    def with_resume(self, command: list[str], overrides: list[str]) -> Interrupted:
        """The same stop, its message ending with the command line that continues it (`overrides`: its --set values)."""
        sets = [arg for o in overrides for arg in ("--set", o)]
        return Interrupted(f"{self}. Resume with: {shlex.join([*command, '--resume', *sets])}")
