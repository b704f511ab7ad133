"""Encoder threads chosen from the run's own batch timings (index/threads.py)."""

from __future__ import annotations

from retrieval.index.threads import ThreadTuner


def drive(tuner: ThreadTuner, seconds_per_image: dict[int, float], batches: int) -> list[int]:
    """Feed the tuner batches of 32 whose time depends on the thread count; the counts it asked for."""
    asked = []
    for _ in range(batches):
        threads = tuner.next_threads()
        asked.append(threads)
        tuner.record(threads, 32, 32 * seconds_per_image[threads])
    return asked


def test_idle_machine_keeps_every_core():
    tuner = ThreadTuner(2, recheck=1000)
    asked = drive(tuner, {2: 0.04, 1: 0.07}, 30)
    assert tuner.chosen == 2 and asked[:5] == [2, 2, 1, 2, 1] and set(asked[5:]) == {2}
    assert tuner.history == [{2: 25.0, 1: 14.3}]


def test_busy_machine_measures_one_thread_faster():
    tuner = ThreadTuner(2, recheck=1000)
    asked = drive(tuner, {2: 0.2, 1: 0.14}, 20)
    assert tuner.chosen == 1 and asked.count(2) == 3  # warm-up and two timed batches at 2


def test_warm_up_batch_does_not_count():
    tuner = ThreadTuner(2)
    tuner.record(tuner.next_threads(), 32, 100.0)  # first batch: precision timing, page faults...
    drive(tuner, {2: 0.04, 1: 0.07}, 4)
    assert tuner.chosen == 2 and tuner.rates[2] == 25.0


def test_choice_is_measured_again_when_the_machine_changes():
    tuner = ThreadTuner(2, recheck=10)
    drive(tuner, {2: 0.04, 1: 0.07}, 15)
    assert tuner.chosen == 2
    drive(tuner, {2: 0.3, 1: 0.1}, 20)  # someone else started a job
    assert tuner.chosen == 1 and len(tuner.history) >= 2


def test_one_core_has_nothing_to_measure():
    tuner = ThreadTuner(1)
    assert drive(tuner, {1: 0.1}, 5) == [1] * 5 and tuner.history == []


def test_many_cores_try_all_half_and_all_but_one():
    assert ThreadTuner(8).candidates == [8, 7, 4]


def test_existing_library_keeps_the_precision_of_its_vectors(tmp_path, tiny_model_dir):
    """`auto` on a library made at int8 adds int8 vectors, whatever auto would measure today."""
    from sqlalchemy import text

    from retrieval.index.indexer import IndexOptions, index_paths
    from retrieval.media import synthetic
    from retrieval.model.spec import ModelSpec
    from retrieval.store.library import Library

    photos = tmp_path / "photos"
    synthetic.write_collection(photos / "first", per_class=1, seed=1)
    spec = ModelSpec(model_dir=str(tiny_model_dir))
    with Library.open(tmp_path / "lib") as lib:
        index_paths(lib, [str(photos)], spec, precision="int8", options=IndexOptions(workers=0))
    synthetic.write_collection(photos / "later", per_class=1, seed=2)
    with Library.open(tmp_path / "lib") as lib:
        result = index_paths(lib, [str(photos)], options=IndexOptions(workers=0))  # precision auto
        with lib.engine.connect() as conn:
            made = conn.execute(text("SELECT r.precision, count(*) FROM images i JOIN runs r "
                                     "ON r.id = i.run_id GROUP BY 1")).all()
    assert result.stats["encoded"] == len(synthetic.LABELS) and not result.warnings
    assert dict(made) == {"int8": 2 * len(synthetic.LABELS)}
    assert result.stats["threads"] >= 1
