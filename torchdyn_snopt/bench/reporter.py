"""The one voice of a bench: printed lines and progress bars, both silenced by ``quiet``."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from torchdyn_snopt.bench.records import format_table

Progress = Callable[[float], None]


class Reporter:
    """Prints a bench's lines to stdout and draws its progress bars; nothing when ``quiet``."""

    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet

    def __call__(self, message: str = "") -> None:
        """Print one line (or several, joined by newlines)."""
        if not self.quiet:
            print(message)

    def table(self, rows: list[dict[str, Any]]) -> None:
        """A blank line, then ``rows`` as an aligned table."""
        self("")
        self(format_table(rows))

    def wrote(self, files: Sequence[str | Path]) -> None:
        """The line naming the files a bench wrote."""
        self("wrote " + ", ".join(str(p) for p in files))

    @contextmanager
    def bar(self, desc: str, total: float, unit: str = "s") -> Iterator[Progress | None]:
        """A tqdm bar up to ``total`` (training seconds, or iterations with ``unit="it"``);
        yields the callback that sets how far it got (None when quiet: no bar)."""
        if self.quiet:
            yield None
            return
        from tqdm.auto import tqdm

        bar = tqdm(
            total=round(total, 1),
            desc=desc,
            unit=unit,
            leave=False,
            bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total:.0f} " + unit,
        )
        try:
            yield lambda done: bar.update(round(done, 1) - bar.n)
        finally:
            bar.close()
