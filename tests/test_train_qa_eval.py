"""The README's headline numbers by hand: held-out accuracy and the prior (always the most common
training answer of a question type), per type and overall, on answers written out here."""
from types import SimpleNamespace

import pytest

from neva.data.templates import Turn
from neva.train import qa_eval


def rec(*qa, qtypes=None, qtype=None):
    turns = []
    for q, a in qa:
        turns += [Turn("user", q), Turn("assistant", a)]
    meta = {"qtypes": qtypes} if qtypes else ({"qtype": qtype} if qtype else {})
    return SimpleNamespace(turns=turns, meta=meta)


TRAIN = [
    rec(("<image>\nWhat colour?", "Red."), ("How many?", "2"), qtypes=["colour", "count"]),
    rec(("<image>\nWhat colour?", "red"), ("How many?", "3"), qtypes=["colour", "count"]),
    rec(("<image>\nWhat colour?", " RED "), qtypes=["colour"]),
    rec(("<image>\nWhat colour?", "blue"), qtype="colour"),
    rec(("<image>\nHow many?", "2"), qtype="count"),
    rec(("<image>\nWhere?", "Bottom   left."), qtype="position"),
    rec(("<image>\nDescribe it.", "A red circle.")),          # a caption: no type, not counted
]


def result(qtype, answer, pred):
    a, p = qa_eval.normalize(answer), qa_eval.normalize(pred)
    return {"qtype": qtype, "answer": a, "pred": p, "correct": p == a}


def test_normalize_strips_case_space_and_a_final_full_stop():
    assert qa_eval.normalize("  Bottom   LEFT. ") == "bottom left"
    assert qa_eval.normalize("Red.") == qa_eval.normalize(" red") == "red"
    assert qa_eval.normalize("3.5") == "3.5" and qa_eval.normalize("no") != qa_eval.normalize("not")


def test_training_answers_and_prior():
    counts = qa_eval.training_answers(TRAIN)
    assert counts == {"colour": {"red": 3, "blue": 1}, "count": {"2": 2, "3": 1}, "position": {"bottom left": 1}}
    assert qa_eval.prior_answers(counts) == {"colour": "red", "count": "2", "position": "bottom left"}


def test_score_by_hand():
    priors = {"colour": "red", "count": "2"}
    results = [result("colour", "red", "Red."),      # right, and the prior would be right
               result("colour", "red", "blue"),      # wrong, prior right
               result("colour", "blue", "blue"),     # right, prior wrong
               result("colour", "green", "yellow"),  # wrong, prior wrong (and not the prior: scores the reference)
               result("count", "3", "3"),            # right, prior wrong
               result("count", "2", " 2 "),          # right, prior right
               result("motion", "left", "right")]    # a type with no training answers: prior 0
    s = qa_eval.score(results, priors)
    assert s["per_type"] == {"colour": {"accuracy": 0.5, "prior": 0.5, "n": 4},
                             "count": {"accuracy": 1.0, "prior": 0.5, "n": 2},
                             "motion": {"accuracy": 0.0, "prior": 0.0, "n": 1}}
    assert s["overall"] == {"accuracy": round(4 / 7, 4), "prior": round(3 / 7, 4), "n": 7}
    assert list(s["per_type"]) == sorted(s["per_type"])
    assert qa_eval.score([], priors) == {"overall": {"accuracy": 0.0, "prior": 0.0, "n": 0}, "per_type": {}}


def test_a_model_that_always_gives_the_prior_scores_the_prior():
    priors = qa_eval.prior_answers(qa_eval.training_answers(TRAIN))
    refs = [("colour", "red"), ("colour", "blue"), ("count", "2"), ("count", "3"), ("position", "top")]
    s = qa_eval.score([result(t, a, priors[t]) for t, a in refs], priors)
    assert s["overall"]["accuracy"] == s["overall"]["prior"] == pytest.approx(2 / 5)
    for block in s["per_type"].values():
        assert block["accuracy"] == block["prior"]
