"""Exact scoring on hand-made predictions."""

import pytest

from fp_tools.evaluation.scoring import found, score


@pytest.mark.parametrize(
    ("prediction", "answer", "expected"),
    [
        (" 6573845.", "6573845", True),
        ("The number is 6573845", "6573845", True),
        ("65738456", "6573845", False),  # a longer number is not the answer
        ("16573845", "6573845", False),
        ("6573-845", "6573845", False),
        ("Tamsin Brackwell.", "Tamsin Brackwell", True),
        ("tamsin brackwell", "Tamsin Brackwell", True),  # case-insensitive
        ("Tamsin Brackwellson", "Tamsin Brackwell", False),
        ("they are: QPWLD, XKCJE", "XKCJE", True),
        ("QPWLDX", "QPWLD", False),
        ("", "1", False),
    ],
)
def test_found(prediction, answer, expected):
    assert found(prediction, answer) is expected


def test_all_counts_the_fraction_found():
    answers = ["111", "222", "333", "444"]
    assert score("111, 222, 333 and 444", answers) == 1.0
    assert score("1. 111\n2. 333\n3. 333", answers) == 0.5
    assert score("none", answers) == 0.0
    assert score("1112223334444", answers) == 0.0


def test_any_is_one_if_one_is_found():
    assert score("Alvin Marsh or Nadia Norcott", ["Nadia Norcott", "N. Norcott"], metric="any") == 1.0
    assert score("Alvin Marsh", ["Nadia Norcott"], metric="any") == 0.0


def test_bad_arguments():
    with pytest.raises(ValueError, match="metric"):
        score("x", ["x"], metric="f1")
    with pytest.raises(ValueError, match="at least one"):
        score("x", [])
    with pytest.raises(ValueError, match="empty"):
        found("x", "  ")
