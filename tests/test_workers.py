"""Decode workers chosen by watching how long the encoder waits for decoded batches (index/workers.py).

The tuner is fed batch timings directly: the choices are checked by logic and
ratios, never by wall-clock bounds.
"""

from __future__ import annotations

from retrieval.index.workers import SKIP, WAIT_SHARE, WINDOW, WorkerTuner


def feed(tuner: WorkerTuner, wait: float, encode: float, batches: int, images: int = 32) -> list[int]:
    changes = []
    for _ in range(batches):
        more = tuner.record(wait, encode, images)
        if more is not None:
            changes.append(more)
    return changes


def test_an_encoder_that_never_waits_keeps_the_starting_count():
    tuner = WorkerTuner(start=1, most=2)
    assert feed(tuner, wait=0.001, encode=1.0, batches=SKIP + WINDOW) == []
    assert tuner.settled and tuner.workers == 1
    assert tuner.history[0]["wait_share"] < WAIT_SHARE


def test_an_encoder_waiting_on_decoding_gets_another_worker_and_keeps_it_when_it_pays():
    tuner = WorkerTuner(start=1, most=3)
    assert feed(tuner, wait=0.5, encode=1.0, batches=SKIP + WINDOW) == [2]
    # with two workers the waits shrink and the rate rises: kept, and with waits gone it stops
    assert feed(tuner, wait=0.01, encode=1.0, batches=SKIP + WINDOW) == []
    assert tuner.workers == 2 and tuner.settled
    assert tuner.history[1]["img_s"] > tuner.history[0]["img_s"]


def test_an_extra_worker_that_slows_the_run_goes_again():
    """A busy machine: the encoder waited, but one more worker only made everything slower."""
    tuner = WorkerTuner(start=1, most=2)
    assert feed(tuner, wait=0.3, encode=1.0, batches=SKIP + WINDOW) == [2]
    assert feed(tuner, wait=0.3, encode=1.5, batches=SKIP + WINDOW) == [1]
    assert tuner.workers == 1 and tuner.settled
    assert feed(tuner, wait=5.0, encode=1.0, batches=50) == []  # settled: no more remakes


def test_it_never_goes_below_the_old_rule_nor_above_the_most():
    tuner = WorkerTuner(start=2, most=3)
    changes = feed(tuner, wait=2.0, encode=1.0, batches=10 * (SKIP + WINDOW))
    assert changes == [3] and tuner.workers == 3
    assert WorkerTuner(start=4, most=4).settled
    assert WorkerTuner(start=0, most=1).workers == 1


def test_a_remade_loader_keys_files_by_their_place_in_the_whole_list(tmp_path):
    import random

    import torch

    from retrieval.media import pipeline, synthetic

    rng = random.Random(1)
    paths = []
    for i in range(5):
        paths.append(str(tmp_path / f"{i}.png"))
        synthetic.draw("red circle", 32, rng).save(paths[-1])
    (tmp_path / "3.png").write_bytes(b"not a picture")
    loader = pipeline.make_loader(paths, lambda image: torch.zeros(3, 8, 8), 8, batch_size=2, workers=1, start=2)
    decoded = [item.key for batch in loader for item in batch.decoded]
    failed = [item.key for batch in pipeline.make_loader(paths, lambda image: torch.zeros(3, 8, 8), 8,
                                                         batch_size=2, workers=0, start=2)
              for item in batch.failed]
    assert decoded == [2, 4] and failed == [3]
