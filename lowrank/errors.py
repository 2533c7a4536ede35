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
