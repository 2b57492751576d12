"""What a user sees while graphopt works: a live status on a terminal, plain lines in a log.

On a terminal, each phase (loading, optimizing, verifying, writing) shows a transient rich status
that names what runs now, down to the pass and its fixed-point iteration. When stderr is not a
terminal (CI logs, `2> log`), a status line would be noise or nothing at all, so each phase prints
one plain line instead. Everything goes to stderr: stdout carries the report alone, so it can be
piped or parsed. `quiet` silences all of it (errors are printed elsewhere).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

from rich.console import Console
from rich.markup import escape

from graphopt.pass_manager import Instrument, Pass, PassContext


class Feedback:
    def __init__(self, console: Console, *, quiet: bool = False):
        self.console = console
        self.quiet = quiet
        self.live = console.is_terminal and not quiet
        self._status = None
        self._phase = ""

    def note(self, text: str) -> None:
        """A line worth keeping in the log (not transient): a first-time training, dims chosen."""
        if not self.quiet:
            self.console.print(f"graphopt: {escape(text)}", highlight=False, soft_wrap=True)

    @contextlib.contextmanager
    def phase(self, text: str) -> Iterator[None]:
        self._phase = text
        if self.quiet:
            yield
            return
        if not self.live:
            self.note(text)
            yield
            return
        with self.console.status(escape(text), spinner="dots") as status:
            self._status = status
            try:
                yield
            finally:
                self._status = None

    def update(self, detail: str) -> None:
        """Say what the current phase is doing now (shown on a terminal only)."""
        if self._status is not None:
            self._status.update(f"{escape(self._phase)}: {escape(detail)}")


class PassProgress(Instrument):
    """Names the running pass, with its fixed-point iteration, in the live status."""

    def __init__(self, feedback: Feedback):
        self.feedback = feedback
        self.runs: dict[str, int] = {}
        self.start = time.perf_counter()

    def before_pass(self, pass_: Pass, ctx: PassContext) -> None:
        # A pass runs once per iteration of its fixed-point group, so its run count is the iteration.
        runs = self.runs[pass_.name] = self.runs.get(pass_.name, 0) + 1
        elapsed = time.perf_counter() - self.start
        self.feedback.update(f"{pass_.name} (iteration {runs}, {elapsed:.1f} s)")
