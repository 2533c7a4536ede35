"""One exception family for user-facing errors; the CLI maps each to one line and an exit code."""

from __future__ import annotations


class LowrankError(Exception):
    """Base of every error lowrank reports to a user (exit code 1)."""

    exit_code = 1


class InputError(LowrankError):
    """A checkpoint, plan, calibration file or output path is unusable (exit code 3)."""

    exit_code = 3


class ValidationError(LowrankError):
    """An exported or compressed model failed validation against its reference (exit code 4)."""

    exit_code = 4


class GateFailed(LowrankError):
    """A quality/size/latency gate was missed: the model got worse, the tool did not fail (exit 5)."""

    exit_code = 5

    def __init__(self, message: str, results: list[dict] | None = None):
        super().__init__(message)
        self.results = results or []  # one entry per check, for printing


class OptionError(LowrankError):
    """An option given without one it needs (exit code 2, as the command line's usage errors).
    ``option`` and ``needs`` are parameter names of :func:`lowrank.compress_spec`; the command
    line shows its flags instead."""

    exit_code = 2

    def __init__(self, option: str, needs: str):
        self.option, self.needs = option, needs
        super().__init__(self.describe())

    def describe(self, name=lambda option: option) -> str:
        shown = name(self.option)
        verb = "need" if shown.endswith("s") else "needs"  # "recover settings need ..."
        return f"{shown} {verb} {name(self.needs)}"


class LowrankWarning(UserWarning):
    """Something worth knowing that did not stop the run (fewer samples than asked for...).
    The CLI prints each as one ``warning:`` line; library users filter them as usual."""


def first_line(e: BaseException) -> str:
    """The first non-empty line of an exception's message (its type name when it has none):
    errors shown to users stay one line."""
    return next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)

