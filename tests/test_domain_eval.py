"""Scoring of grounding and multiple-choice answers: IoU and its 0.5 boundary, box parsing of answer variants,
choice extraction, and accuracies over hand-made answers whose right counts are worked out by hand below."""

import json

import pytest

from mgjax.data import formatters as F
from mgjax.eval import domain_eval as E

OPTIONS = {"A": "airport", "B": "beach", "C": "forest", "D": "river"}
REF = [100, 100, 300, 300]  # area 200 * 200 = 40000


# --- IoU ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "a, b, expected",
    [
        ([0, 0, 10, 10], [5, 5, 15, 15], 25 / 175),  # overlap 5x5; union 100 + 100 - 25
        ([0, 0, 10, 10], [0, 0, 20, 10], 0.5),  # overlap 100; union 200
        ([0, 0, 10, 10], [2, 2, 7, 7], 0.25),  # inner 5x5 box inside 10x10
        ([0, 0, 10, 10], [0, 0, 10, 10], 1.0),
        ([0, 0, 10, 10], [20, 20, 30, 30], 0.0),  # apart
        ([0, 0, 10, 10], [10, 0, 20, 10], 0.0),  # sharing an edge only
        ([5, 5, 5, 10], [0, 0, 10, 10], 0.0),  # zero width
        ([10, 10, 0, 0], [10, 10, 0, 0], 0.0),  # inverted, and no division by a zero union
        ([5, 5, 5, 5], [5, 5, 5, 5], 0.0),
    ],
)
def test_iou(a, b, expected):
    assert E.iou(a, b) == pytest.approx(expected)
    assert E.iou(b, a) == pytest.approx(expected)


def test_iou_exactly_half_is_right_and_just_below_is_wrong():
    assert E.iou([0, 0, 10, 10], [0, 0, 20, 10]) == 0.5  # exact in binary floating point
    half = E.grounding_accuracy(["[[0, 0, 20, 10]]"], [[0, 0, 10, 10]])
    below = E.grounding_accuracy(["[[0, 0, 21, 10]]"], [[0, 0, 10, 10]])  # 100 / 210
    assert (half["right"], below["right"]) == (1, 0)


# --- parsing -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("<ref>the red car</ref><box>[[100, 200, 300, 400]]</box>", [(100, 200, 300, 400)]),
        ("<box>[[100,200,300,400]]</box>", [(100, 200, 300, 400)]),
        ("[[ 100 ,200,  300 , 400 ]]", [(100, 200, 300, 400)]),
        ("[100, 200, 300, 400]", [(100, 200, 300, 400)]),
        ("The car is at [[10, 20, 30, 40]].", [(10, 20, 30, 40)]),
        ("<ref>cars</ref><box>[[1, 2, 3, 4], [5, 6, 7, 8]]</box>", [(1, 2, 3, 4), (5, 6, 7, 8)]),
        ("<box>[[1, 2, 3, 4]]</box> and <box>[[5, 6, 7, 8]]</box>", [(1, 2, 3, 4), (5, 6, 7, 8)]),
        ("[[0.5, 1.25, 3., .75]]", [(0.5, 1.25, 3.0, 0.75)]),
        ("[[-5, 0, 10, 10]]", [(-5, 0, 10, 10)]),
        ("[a, b] then [[1, 2, 3, 4]]", [(1, 2, 3, 4)]),  # InternVL's lazy regex would swallow this box
        ("<box>[[1, 2, 3, 4</box>", []),
        ("[[1, 2, 3]]", []),
        ("[1, 2, 3, 4, 5]", []),
        ("[[a, b, c, d]]", []),
        ("[[" + "9" * 400 + ", 0, 1, 1]]", []),
        ("no box here", []),
        ("", []),
        (None, []),
        (42, []),
    ],
)
def test_parse_boxes(text, expected):
    assert E.parse_boxes(text) == expected


# --- grounding ---------------------------------------------------------------------------------------------------

GROUNDING_ANSWERS = [
    "<ref>the pool</ref><box>[[100, 100, 300, 300]]</box>",  # IoU 1: right
    "<ref>the pool</ref><box>[[100, 100, 300, 200]]</box>",  # 20000 / 40000 = 0.5: right
    "[[200, 200, 400, 400]]",  # 10000 / (40000 + 40000 - 10000) = 1/7: wrong
    "I cannot find it.",  # no box: wrong, unparsed
    "<box>[[600, 600, 800, 800], [100, 100, 300, 300]]</box>",  # only the first box counts: IoU 0, wrong
]


def test_grounding_accuracy_normalised():
    references = ["<ref>the pool</ref><box>[[100, 100, 300, 300]]</box>", REF, REF, REF, REF]
    assert E.grounding_accuracy(GROUNDING_ANSWERS, references) == {
        "right": 2,
        "total": 5,
        "accuracy": 0.4,
        "unparsed": 1,
    }


def test_grounding_accuracy_pixels():
    # a 2000x1000 image: 0-1000 [100, 100, 300, 300] is pixel [200, 100, 600, 300]
    sizes = [(2000, 1000)] * 5
    references = [[200, 100, 600, 300]] * 5
    assert E.grounding_accuracy(GROUNDING_ANSWERS, references, sizes) == {
        "right": 2,
        "total": 5,
        "accuracy": 0.4,
        "unparsed": 1,
    }


def test_boxes_past_the_image_are_clamped_in_both_frames():
    # unclamped, [900, 900, 1100, 1100] against [900, 900, 1000, 1000] would be 10000 / 40000
    assert E.to_pixels([900, 900, 1100, 1100], (2000, 1000)) == (1800, 900, 2000, 1000)
    assert E.to_pixels([-50, 0, 500, 1000], (2000, 1000)) == (0, 0, 1000, 1000)
    answer = ["[[900, 900, 1100, 1100]]"]
    assert E.grounding_accuracy(answer, [[900, 900, 1000, 1000]])["right"] == 1
    assert E.grounding_accuracy(answer, [[1800, 900, 2000, 1000]], [(2000, 1000)])["right"] == 1


@pytest.mark.parametrize("reference", ["no box", "[[1, 2, 3, 4], [5, 6, 7, 8]]", [1, 2, 3], [1, 2, 3, None], 7])
def test_bad_grounding_reference_names_the_sample(reference):
    with pytest.raises(ValueError, match="sample 1: reference"):
        E.grounding_accuracy([GROUNDING_ANSWERS[0]] * 2, [REF, reference])


def test_bad_sizes_and_lengths():
    with pytest.raises(ValueError, match="image size"):
        E.grounding_accuracy(["no box"], [REF], [(0, 100)])  # even an unparsed answer checks its size
    with pytest.raises(ValueError, match="2 samples"):
        E.grounding_accuracy(["[[1, 2, 3, 4]]"] * 2, [REF])


# --- multiple choice ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("B", "B"),
        ("B.", "B"),
        ("(B)", "B"),
        ("[C]", "C"),
        ("Answer: B", "B"),
        ("B. beach", "B"),
        ("The answer is C", "C"),
        ("A", "A"),
        ("A.", "A"),
        ("beach", "B"),  # the label itself
        ("  BEACH. ", "B"),
        ("The answer is A", None),  # a lone A among more than three words may be the article
        ("A or B", None),  # two letters
        ("It is a beach", None),  # a label inside a sentence is not matched
        ("b", None),  # letters are case-sensitive
        ("E", None),  # not an option
        ("", None),
        (None, None),
    ],
)
def test_extract_choice(text, expected):
    assert E.extract_choice(text, OPTIONS) == expected


def test_choice_accuracy():
    answers = ["B", "(C) forest", "Answer: D", "I am not sure.", "forest"]
    references = ["B", "C", "A", "D", "forest"]  # the last is a label, as letters=False records answer
    # right: B, C and forest (= C); wrong: D for A; unparsed: the fourth
    assert E.choice_accuracy(answers, references, [OPTIONS] * 5) == {
        "right": 3,
        "total": 5,
        "accuracy": 0.6,
        "unparsed": 1,
    }


@pytest.mark.parametrize(
    "reference, options, match",
    [
        ("E", OPTIONS, "neither an option letter"),
        ("sand", OPTIONS, "neither an option letter"),
        ("A", {}, "non-empty mapping"),
        ("A", ["airport", "beach"], "non-empty mapping"),
    ],
)
def test_bad_choice_reference(reference, options, match):
    with pytest.raises(ValueError, match=match):
        E.choice_accuracy(["A"], [reference], [options])


# --- score -------------------------------------------------------------------------------------------------------


def test_score_grounding_results_per_id():
    records = [{"id": f"s{i}", "answer": a, "reference": REF} for i, a in enumerate(GROUNDING_ANSWERS)]
    out = E.score("grounding", records)
    assert out["summary"] == {"right": 2, "total": 5, "accuracy": 0.4, "unparsed": 1}
    assert out["results"][1] == {"id": "s1", "box": (100, 100, 300, 200), "iou": 0.5, "right": True}
    assert out["results"][3] == {"id": "s3", "box": None, "iou": None, "right": False}
    assert [r["id"] for r in out["results"]] == ["s0", "s1", "s2", "s3", "s4"]
    json.dumps(out)  # a results file can be written as is


def test_score_pixels_from_a_formatter_record():
    record = F.grounding("s1", "img.jpg", (640, 480), "the car", [64, 48, 320, 240])
    answer = record["conversations"][1]["value"]
    assert answer == "<ref>the car</ref><box>[[100, 100, 500, 500]]</box>"
    normalised = E.score("grounding", [{"id": "s1", "answer": answer, "reference": answer}])
    pixels = E.score(
        "grounding",
        [{"id": "s1", "answer": answer, "reference": [64, 48, 320, 240], "width": 640, "height": 480}],
        pixels=True,
    )
    assert normalised["results"][0]["iou"] == 1.0
    assert pixels["results"][0]["iou"] == pytest.approx(1.0)


def test_score_choice_from_a_formatter_record():
    record = F.classification("s1", "img.jpg", "beach", list(OPTIONS.values()), seed=3)
    question, letter = (t["value"] for t in record["conversations"])
    options = dict(line.split(". ", 1) for line in question.splitlines()[2:-1])
    assert options[letter] == "beach"
    out = E.score(
        "choice",
        [
            {"id": "s1", "answer": f"{letter}.", "reference": letter, "options": options},
            {"id": "s2", "answer": None, "reference": letter, "options": options},
        ],
    )
    assert out["summary"] == {"right": 1, "total": 2, "accuracy": 0.5, "unparsed": 1}
    assert out["results"][0] == {"id": "s1", "choice": letter, "reference": letter, "right": True}


def test_score_refuses_bad_input():
    record = {"id": "x", "answer": "A", "reference": "A", "options": OPTIONS}
    with pytest.raises(ValueError, match="kind"):
        E.score("caption", [record])
    with pytest.raises(ValueError, match="grounding only"):
        E.score("choice", [record], pixels=True)
    with pytest.raises(ValueError, match="repeat"):
        E.score("choice", [record, record])
    with pytest.raises(ValueError, match="no 'options'"):
        E.score("choice", [{"id": "x", "answer": "A", "reference": "A"}])
    with pytest.raises(ValueError, match="no 'width'"):
        E.score("grounding", [{"id": "x", "answer": "A", "reference": REF}], pixels=True)
    with pytest.raises(ValueError, match="sample 'x': reference"):
        E.score("choice", [{**record, "reference": "Z"}])


def test_score_of_nothing():
    assert E.score("grounding", [])["summary"] == {"right": 0, "total": 0, "accuracy": 0.0, "unparsed": 0}
