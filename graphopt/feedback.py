"""What a user sees while graphopt works: a live status on a terminal, plain lines in a log.

On a terminal, each phase (loading, optimizing, verifying, writing) shows a transient rich status
that names what runs now, down to the pass and its fixed-point iteration. When stderr is not a
terminal (CI logs, `2> log`), a status line would be noise or nothing at all, so each phase prints
one plain line instead, when it is done. Everything goes to stderr: stdout carries the report alone, so it can be
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
        # Phases run inside each other (verifying happens while writing): the innermost is shown.
        self._phases: list[str] = []

    def note(self, text: str) -> None:
        """A line worth keeping in the log (not transient): a first-time training, dims chosen."""
        if not self.quiet:
            self.console.print(f"graphopt: {escape(text)}", highlight=False, soft_wrap=True)

    @contextlib.contextmanager
    def phase(self, text: str) -> Iterator[None]:
        self._phases.append(text)
        start = time.perf_counter()
        try:
            if self.live and self._status is None:
                with self.console.status(escape(text), spinner="dots") as status:
                    self._status = status
                    try:
                        yield
                    finally:
                        self._status = None
            else:
                self._show(text)
                yield
        finally:
            self._phases.pop()
            if self._phases:
                self._show(self._phases[-1])
        if not self.live:
            # Said when the phase is done, with its time: a log then records what was done and
            # where the time went, and a phase that fails leaves only its error (one line).
            self.note(f"{text}: done in {time.perf_counter() - start:.1f} s")

    def update(self, detail: str) -> None:
        """Say what the current phase is doing now (shown on a terminal only)."""
        if self._phases:
            self._show(f"{self._phases[-1]}: {detail}")

    def _show(self, text: str) -> None:
        if self._status is not None:
            self._status.update(escape(text))


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
