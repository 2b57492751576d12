"""Errors a user can act on. The CLI prints them as one line and exits with their code."""

from __future__ import annotations

EXIT_OK = 0
EXIT_VERIFICATION_FAILED = 1
EXIT_BAD_INPUT = 2


class GraphoptError(Exception):
    """Bad input or usage: a one-line message naming the problem (and the node, where there is one)."""

    exit_code = EXIT_BAD_INPUT

    def __init__(self, message: str, *, node: str | None = None):
        if node is not None:
            message = f"{message} (node '{node}')"
        super().__init__(message)


class VerificationError(GraphoptError):
    """The optimized model no longer computes what the original did."""

    exit_code = EXIT_VERIFICATION_FAILED


def one_line(exc: BaseException, limit: int = 400) -> str:
    """An exception's message folded onto one line (tools like onnx.checker spread it over several)."""
    text = " ".join(str(exc).split())
    if not text:
        return type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
