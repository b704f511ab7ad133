"""Decode workers chosen by watching the decode queue, not by a fixed rule.

The old rule (one worker per core beyond the first) is right when the encoder
is the bottleneck, and wrong when decoding is: large JPEGs, a fast runtime or
an int8 tower can leave the encoder waiting on Pillow. So a run starts with
that rule's count and watches how long the encoder waits for each batch. When,
over a window of batches, it waited more than WAIT_SHARE of its encoding time,
one more worker is tried (the loader is remade for the files not yet taken);
if that window then runs slower than the one before, the run goes back to the
previous count and stops trying. A busy machine therefore never ends up with
fewer workers than the old rule, nor keeps an extra one that did not help.
"""

from __future__ import annotations

WAIT_SHARE = 0.1  # waiting for decoded batches this share of encode time: decoding is the bottleneck
WINDOW = 6  # batches per judgement
SKIP = 2  # batches after a (re)start that are start-up, not steady state
WORSE = 0.05  # an extra worker that costs this share of the rate goes again


class WorkerTuner:
    """Says when to remake the decode loader with another worker count; learns from `record`."""

    def __init__(self, start: int, most: int, window: int = WINDOW, skip: int = SKIP) -> None:
        self.workers = max(1, start)
        self.most = max(self.workers, most)
        self.window = window
        self.skip = skip
        self.settled = self.workers >= self.most
        self.history: list[dict] = []
        self._to_skip = skip
        self._wait = self._busy = 0.0
        self._images = self._batches = 0
        self._before: tuple[int, float] | None = None

    def record(self, wait: float, encode: float, images: int) -> int | None:
        """One batch: the encoder waited `wait` s for it and encoded its `images` in `encode` s.

        Returns the worker count to remake the loader with, or None to go on as is."""
        if self.settled:
            return None
        if self._to_skip:
            self._to_skip -= 1
            return None
        self._wait += wait
        self._busy += encode
        self._images += images
        self._batches += 1
        if self._batches < self.window:
            return None
        rate = self._images / max(self._wait + self._busy, 1e-9)
        share = self._wait / max(self._busy, 1e-9)
        self.history.append({"workers": self.workers, "wait_share": round(share, 3), "img_s": round(rate, 1)})
        self._wait = self._busy = 0.0
        self._images = self._batches = 0
        if self._before is not None and rate < self._before[1] * (1 - WORSE):
            self.workers, self.settled = self._before[0], True  # the extra worker did not pay
            return self.workers
        if share > WAIT_SHARE and self.workers < self.most:
            self._before = (self.workers, rate)
            self.workers += 1
            self._to_skip = self.skip
            return self.workers
        self.settled = True
        return None
