"""The search box's syntax (the CLI's, in one line) and the JSON depth scan used before parsing."""

from __future__ import annotations

import json

import pytest

from retrieval.errors import InputError
from retrieval.serve.limits import json_depth_exceeds
from retrieval.serve.querybox import parse_box


def test_terms_quotes_weights_and_negatives():
    box = parse_box('"red car" beach^2 -people --not "city at night" -0.5')
    assert box.texts == ["red car", "beach^2", "-0.5"]
    assert box.negatives == ["people", "city at night"]


@pytest.mark.parametrize("line, says", [('"open quote', "close the quote"), ("cat --not", "--not needs"),
                                        (" ".join(["w"] * 40), "at most")])
def test_mistakes_are_input_errors(line, says):
    with pytest.raises(InputError, match=says):
        parse_box(line)


def test_json_depth_scan_counts_brackets_outside_strings_only():
    assert not json_depth_exceeds(json.dumps({"text": "[[[[[[[[" * 20, "k": [1, [2]]}).encode(), limit=3)
    assert json_depth_exceeds(b"[" * 5 + b"]" * 5, limit=4)
    assert not json_depth_exceeds(b'{"a": "\\"[[[[[["}', limit=1)
