"""One progress line for a whole study: cells finished of all, what is running, speed, ETA.

On a resumed run the bar starts at the cells whose results are already stored.

The ETA is the mean time of each kind of cell measured so far, times the cells of
that kind still to run, divided by the cells that run at once; it shows `?` until
every remaining kind has been timed once. Pre-training speed (tokens/s) is the last
finished pre-training cell's, read from its result rows.
"""

from __future__ import annotations

import sys
import time
from collections import Counter, defaultdict

from tqdm.auto import tqdm

from overtrain.study.plan import Cell


class StudyProgress:
    def __init__(self, name: str, cells: list[Cell], slots: int, recorded: list[Cell]) -> None:
        """recorded: the cells whose outcome is stored already; they are counted from the start."""
        self.slots = slots
        self.to_run = Counter(cell.kind for cell in cells)
        self.to_run.subtract(cell.kind for cell in recorded)
        self.seconds: dict[str, list[float]] = defaultdict(list)
        self.running: dict[str, tuple[Cell, float]] = {}
        self.tokens_per_second: float | None = None
        self.bar = tqdm(total=len(cells), initial=len(recorded), desc=f"study {name}", unit="cell", dynamic_ncols=True)

    def skipped(self, cell: Cell) -> None:
        """Will not run and was not counted at the start: its input will not appear in this run,
        or its key, once known, turned out to be finished already."""
        self.to_run[cell.kind] -= 1
        self.bar.update()

    def started(self, key: str, cell: Cell) -> None:
        self.to_run[cell.kind] -= 1
        self.running[key] = (cell, time.perf_counter())
        self._refresh()

    def finished(self, key: str, rows: list[dict] | None) -> None:
        cell, started = self.running.pop(key)
        self.seconds[cell.kind].append(time.perf_counter() - started)
        speed = [row["value"] for row in rows or [] if row["metric"] == "tokens_per_second"]
        if cell.kind == "pretrain" and speed:
            self.tokens_per_second = speed[0]
        self.bar.update()
        self._refresh()

    def note(self, message: str) -> None:
        # Where the bar is drawn (stderr), above it; a disabled bar (TQDM_DISABLE) has no stream of its own.
        tqdm.write(message, file=sys.stderr)

    def close(self) -> None:
        self.bar.close()

    def _refresh(self) -> None:
        running = ", ".join(cell.label for cell, _ in self.running.values())
        speed = f" | pretrain {self.tokens_per_second:,.0f} tok/s" if self.tokens_per_second else ""
        self.bar.set_postfix_str(f"ETA {self._eta()}{speed} | running: {running or '-'}", refresh=True)

    def _eta(self) -> str:
        mean = {kind: sum(s) / len(s) for kind, s in self.seconds.items()}
        now = time.perf_counter()
        waiting = [(kind, n) for kind, n in self.to_run.items() if n > 0]
        if any(kind not in mean for kind, _ in waiting) or any(c.kind not in mean for c, _ in self.running.values()):
            return "?"
        work = sum(mean[kind] * n for kind, n in waiting)
        work += sum(max(0.0, mean[c.kind] - (now - t)) for c, t in self.running.values())
        return _duration(work / self.slots)


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"
