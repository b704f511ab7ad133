"""Encoder threads chosen by timing the run's own batches, not by the 1-minute load average.

The load average describes the last minute, not this run: a machine that was
busy a minute ago (or busy with clipfind's own precision timing) got 1 thread
of 2 and indexed at 14 img/s instead of 23 (issue 17). So the first batches
of a run are encoded at each candidate thread count in turn (real work, none
thrown away), the best images-per-second wins, and the choice is checked again
every RECHECK batches in case the machine got busier or quieter. Only a
couple of batches run at the slower setting, so the cost is small; on a busy
machine the measurement picks 1 thread exactly when 2 are slower.
"""

from __future__ import annotations

ROUNDS = 2  # each candidate is timed this many times; its fastest batch counts
RECHECK = 40  # batches between re-measurements


class ThreadTuner:
    """Says how many threads the next batch gets; learns from `record` of each batch's time."""

    def __init__(self, cores: int, rounds: int = ROUNDS, recheck: int = RECHECK) -> None:
        self.candidates = sorted({cores, max(1, cores - 1), max(1, cores // 2)}, reverse=True)
        self.rounds = rounds
        self.recheck = recheck
        self.chosen = self.candidates[0]
        self.rates: dict[int, float] = {}
        self._plan = self._measuring_plan()
        self._since_choice = 0
        self.history: list[dict] = []

    def _measuring_plan(self, warm_up: bool = True) -> list[tuple[int, bool]]:
        """(threads, counts) per batch: a warm-up batch first (first calls are slow at any
        setting) that does not count, then the candidates alternating."""
        if len(self.candidates) == 1:
            return []
        timed = [(threads, True) for _ in range(self.rounds) for threads in self.candidates]
        return ([(self.candidates[0], False)] if warm_up else []) + timed

    @property
    def measuring(self) -> bool:
        """Whether batches now run at trial thread counts (their times say little about decoding)."""
        return bool(self._plan)

    def next_threads(self) -> int:
        if not self._plan and self._since_choice >= self.recheck and len(self.candidates) > 1:
            self._plan, self.rates = self._measuring_plan(warm_up=False), {}
        return self._plan[0][0] if self._plan else self.chosen

    def record(self, threads: int, images: int, seconds: float) -> None:
        """One batch of `images` took `seconds` at `threads` (as `next_threads` said)."""
        if not self._plan:
            self._since_choice += 1
            return
        _, counts = self._plan.pop(0)
        if counts and images and seconds > 0:
            self.rates[threads] = max(self.rates.get(threads, 0.0), images / seconds)
        if not self._plan and self.rates:
            self.chosen = max(self.rates, key=self.rates.get)
            self._since_choice = 0
            self.history.append({k: round(v, 1) for k, v in self.rates.items()})
