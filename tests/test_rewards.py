"""Grading: extraction, hand-checked pairs, agreement with math-verify, canonical
forms, reference solutions."""
import collections
import json
import logging
import os
import pathlib
import re
import time

import math_verify
import pytest

from mars import rewards
import adversarial_inputs as adversarial  # tests/adversarial_inputs.py (a fixture, not library)
from mars.rewards import answers, guards

SHARED = pathlib.Path(os.environ.get(
    "MARS_SHARED_DIR", pathlib.Path(__file__).resolve().parents[1].parent / "shared"))
DATA = pathlib.Path(os.environ.get("MARS_DATA_DIR", SHARED / "data"))


def read_jsonl(relpath):
  path = DATA / relpath
  if not path.exists():
    pytest.fail(f"{path} not found; set MARS_DATA_DIR to shared/data")
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f]


# These tests check what is graded, not how fast: a generous timeout keeps a
# busy shared machine from turning a slow first parse into a "timeout".
# test_rewards_adversarial.py holds the latency bounds.
TIMEOUT_S = 10.0


@pytest.fixture(scope="module")
def pool():
  with rewards.GraderPool(num_workers=2, timeout_s=TIMEOUT_S) as p:
    yield p


@pytest.fixture(scope="module")
def last_box_pool():
  with rewards.GraderPool(num_workers=1, timeout_s=TIMEOUT_S, spare_workers=0,
                          boxes="last") as p:
    yield p


_DELIMITED = re.compile(r"(?<!\\)\$|\\boxed")


def reference(gold, response) -> bool:
  """Plain math-verify, the independent reference: verify(parse(gold), parse(response)).

  A bare ground truth is written as "$gold$", the way math-verify expects
  answers (its parse finds nothing in a bare "\\sqrt{3}"); the grader boxes it
  instead, so the two readings of the ground truth are checked against each
  other too.
  """
  if isinstance(gold, list):
    gold = ", ".join(gold)
  if not _DELIMITED.search(gold):
    gold = "$" + gold.replace("\n", " ") + "$"
  logging.disable(logging.WARNING)  # math-verify logs its own timeouts.
  try:
    return math_verify.verify(math_verify.parse(gold), math_verify.parse(response))
  finally:
    logging.disable(logging.NOTSET)


# ---- extraction

_EXTRACT_CASES = [
    ("The answer is \\boxed{42}.", "42"),
    ("\\boxed{1} then \\boxed{2}", "2"),
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),           # escaped braces are content
    ("\\boxed{a_{1}^{2}}", "a_{1}^{2}"),
    ("\\fbox{7}", "7"),
    ("\\boxed {x}", "x"),
    ("\\boxed{\\boxed{3}}", "\\boxed{3}"),           # outer box closes last
    ("$\\boxed 9$.", "9"),                           # brace-less TeX form
    ("\\boxed -12.5.", "-12.5"),
    ("\\boxed A", "A"),
    ("put the \\boxed answer last", None),            # prose, not an answer
    ("\\boxed{5} and then \\boxed{6", "5"),          # unclosed box is not an answer
    ("\\boxed{}", ""),                               # empty: answered (wrong)
    ("\\\\{\\boxed{1}", "1"),                        # \\ then a brace group
    ("no box here", None),
    ("\\boxed{12", None),
    ("\\boxed", None),
    ("", None),
    ("}}}\\boxed{3}}}", "3"),
    ("a\x00\\boxed{1\x00}", "1\x00"),
]


@pytest.mark.parametrize("text, expected", _EXTRACT_CASES)
def test_extract_boxed(text, expected):
  assert rewards.extract_boxed(text) == expected


def test_extract_boxed_is_linear_on_100kb():
  # A complexity guard, not a speed test: a linear scan takes milliseconds here,
  # while a rescan per unclosed brace (quadratic, ~2.4e9 character steps on this
  # input) or a backtracking regex takes far longer than the bound, however
  # loaded the machine is. Speed itself is measured in benchmarks/grade.py.
  text = "\\boxed{" + "\\frac{" * 20000  # 120 kB, never closes
  start = time.perf_counter()
  assert rewards.extract_boxed(text) is None
  assert rewards.extract_boxed("\\boxed{1} " * 10000 + "\\boxed{2}") == "2"
  assert rewards.extract_boxes("\\boxed{1}, " * 10000 + "\\boxed{2}") == ["1"] * 10000 + ["2"]
  assert time.perf_counter() - start < 60.0


def test_extract_boxes():
  assert rewards.extract_boxes("\\boxed{\\boxed{1}} x \\boxed 2, \\boxed{3") == [
      "1", "\\boxed{1}", "2"]  # in closing order; the unclosed one is left out
  assert rewards.extract_boxes("no box") == []


# (response, what math-verify reads from its boxes as a $...$ answer, last box)
READINGS = [
    ("so $x = \\boxed{4}$ or $x = \\boxed{-1}$.", "\\{4, -1\\}", "-1"),
    ("\\boxed{(0, 1)}, \\boxed{(1, 0)}", "(0, 1), (1, 0)", "(1, 0)"),
    ("\\boxed{a}; \\boxed{b}; \\boxed{c}", "\\{a, b, c\\}", "c"),
    ("\\boxed{7}\\boxed{7}", "7", "7"),  # a repeated box is one answer
    # A comma within 70 characters joins a self-correction too: boxes="last" is for this.
    ("I first thought \\boxed{2}, but the answer is \\boxed{3}", "\\{2, 3\\}", "3"),
    # 10+ characters and no separator between them: separate boxes.
    ("Step 1 gives \\boxed{2}. Step 2 then gives us \\boxed{3}", "3", "3"),
    ("\\boxed{1} " + "x" * 80 + " and \\boxed{2}", "2", "2"),  # 70+ characters apart
    # Boxes in separate $...$ chained by more than ", and/or": the last one alone;
    # in one math environment: all of them.
    ("$\\boxed{2}$ \\quad \\text{or} \\quad $\\boxed{5}$", "5", "5"),
    ("$$\\boxed{2} \\quad \\text{or} \\quad \\boxed{5}$$", "\\{2, 5\\}", "5"),
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}", "\\frac{1}{2}"),
    ("\\boxed 9.", "9", "9"),  # brace-less: math-verify has no box pattern for it
    ("\\boxed{1}, \\boxed{2", "1", "1"),  # an unclosed box is not an answer
]


@pytest.mark.parametrize("text, reading, last", READINGS)
def test_read_answer(text, reading, last):
  """Hand-worked from math-verify's rules, and checked against its own parse."""
  extracted, parsed = rewards.read_answer(text)
  expected = math_verify.parse(f"${reading}$")[0]
  assert parsed[0] == expected, (extracted, parsed)
  assert math_verify.parse(text)[0] == expected  # plain math-verify on the response
  extracted, parsed = rewards.read_answer(text, boxes="last")
  assert extracted == last == rewards.extract_boxed(text)
  assert parsed[0] == math_verify.parse(f"${last}$")[0]


def test_many_boxes_are_read_by_the_last():
  # math-verify's joining is quadratic in the number of boxes: past MAX_BOXES
  # the last box alone is the answer.
  few = "\\boxed{1}, " * 5 + "\\boxed{2}"
  many = "\\boxed{1}, " * guards.MAX_BOXES + "\\boxed{2}"
  assert rewards.read_answer(few)[1][0] == math_verify.parse("$\\{1, 2\\}$")[0]
  assert rewards.read_answer(many)[0] == "2"


def test_read_answer_without_a_box_is_no_answer():
  assert math_verify.parse("The answer is 5.")[0] == 5  # plain math-verify reads prose
  for text in ["The answer is 5.", "\\boxed{5", "", "\\boxed answer"]:
    for boxes in rewards.BOXES:
      assert rewards.read_answer(text, boxes) == (None, [])
  with pytest.raises(ValueError, match="boxes must be one of"):
    rewards.grade_one("\\boxed{1}", "1", boxes="first")


def test_gold_text():
  assert answers.gold_text("$\\frac12$") == "\\frac12"
  assert answers.gold_text(27.0) == "27"
  assert answers.gold_text(["$69$,$84$"]) == "69,84"
  assert answers.gold_text(["1", "2"]) == "1, 2"
  assert answers.gold_text("\\$18") == "\\$18"  # escaped dollars are content
  # A worked solution as the ground truth is read by its boxes, as a response is.
  solution = "So $x=2$ and $y=\\boxed{3}$ or $y = \\boxed{4}$."
  assert rewards.grade_one("\\boxed{4}, \\boxed{3}", solution).correct
  assert not rewards.grade_one("\\boxed{2}", solution).correct
  assert reference(solution, "\\boxed{4}, \\boxed{3}") and not reference(solution, "\\boxed{2}")


# ---- statuses

def test_statuses_in_process():
  assert rewards.grade_one("no box", "3") == rewards.Grade("no_answer", None, None)
  assert rewards.grade_one("\\boxed{3", "3").status == "no_answer"
  assert rewards.grade_one("\\boxed{}", "3") == rewards.Grade("wrong", "", "")
  assert rewards.grade_one("\\boxed{ }", " ").status == "wrong"  # empty gold never matches
  assert rewards.grade_one("\\boxed{3}", "").status == "wrong"
  assert rewards.grade_one("\\boxed{3}", "3") == rewards.Grade("correct", "3", "3")
  assert rewards.grade_one(b"\\boxed{3}", "3").status == "correct"
  g = rewards.grade_one("so \\boxed{x = 4}", "3")
  assert (g.status, g.extracted) == ("wrong", "x = 4")
  assert all(s in rewards.STATUSES for s in ("correct", "wrong", "no_answer", "timeout", "error"))


# ---- hand-checked pairs: (category, boxed answer, ground truth, correct?)

PAIRS = [
    # number
    ('number', '3', '3', True),
    ('number', '3', '4', False),
    ('number', '-3', '-3', True),
    ('number', '-3', '3', False),
    ('number', '0', '0', True),
    ('number', '0', '-0', True),
    ('number', '1000', '1,000', True),
    ('number', '1,000', '1000', True),
    ('number', '1000000', '1,000,000', True),
    ('number', '12345', '12346', False),
    ('number', '007', '7', True),
    ('number', '2^{10}', '1024', True),
    ('number', '10^3', '1000', True),
    ('number', '1024', '2^{10}', True),
    ('number', '3.0', '3', True),
    ('number', '27', '27.0', True),
    ('number', '5', '5.0', True),
    ('number', '5.01', '5', False),
    ('number', '+5', '5', True),
    ('number', '6', '\\$6', True),
    ('number', '\\$6', '6', True),
    ('number', '2\\sqrt{3}', '\\sqrt{12}', True),
    ('number', '2\\sqrt{3}', '3\\sqrt{2}', False),
    ('number', '\\pi', '\\pi', True),
    ('number', '3.14', '\\pi', False),
    ('number', 'e^2', 'e^{2}', True),
    ('number', '\\sqrt{2}', '1.41421356', True),
    ('number', '1.4142', '\\sqrt{2}', False),
    ('number', '2', '2.00001', False),
    ('number', '1/3', '0.3333333', True),
    ('number', '10^{100}', '10^{100}', True),
    ('number', '10^{100}', '10^{101}', False),
    ('number', '2^{1009}', '2^{1009}', True),
    ('number', '2^{1008}', '2^{1009}', False),
    ('number', '\\infty', '\\infty', True),
    ('number', '-\\infty', '\\infty', False),
    # fraction
    ('fraction', '\\frac{1}{2}', '\\frac12', True),
    ('fraction', '\\frac12', '\\frac{1}{2}', True),
    ('fraction', '1/2', '\\frac{1}{2}', True),
    ('fraction', '\\dfrac{1}{2}', '\\frac{1}{2}', True),
    ('fraction', '\\tfrac{1}{2}', '\\frac12', True),
    ('fraction', '\\frac{2}{4}', '\\frac{1}{2}', True),
    ('fraction', '\\frac{1}{3}', '\\frac{1}{2}', False),
    ('fraction', '-\\frac{3}{4}', '\\frac{-3}{4}', True),
    ('fraction', '\\frac{-3}{4}', '-\\dfrac34', True),
    ('fraction', '\\frac{3}{4}', '-\\frac{3}{4}', False),
    ('fraction', '\\frac{7}{2}', '3\\frac{1}{2}', True),
    ('fraction', '\\frac{\\sqrt{3}}{2}', '\\frac{\\sqrt3}{2}', True),
    ('fraction', '\\frac{\\sqrt{2}}{2}', '\\frac{1}{\\sqrt{2}}', True),
    ('fraction', '\\frac{\\sqrt{3}}{3}', '\\frac{\\sqrt{3}}{2}', False),
    ('fraction', '\\frac{\\pi}{4}', '\\frac{\\pi}{4}', True),
    ('fraction', '\\frac{\\pi}{4}', '\\frac{\\pi}{3}', False),
    ('fraction', '\\dfrac{9}{7}', '\\frac{9}{7}', True),
    ('fraction', '9/7', '\\frac{9}{7}', True),
    ('fraction', '7/9', '\\frac{9}{7}', False),
    ('fraction', '\\frac{100}{3}', '33\\frac{1}{3}', True),
    # decimal_vs_fraction
    ('decimal_vs_fraction', '0.5', '\\frac{1}{2}', True),
    ('decimal_vs_fraction', '\\frac{1}{2}', '0.5', True),
    ('decimal_vs_fraction', '.5', '\\frac12', True),
    ('decimal_vs_fraction', '0.25', '\\frac{1}{4}', True),
    ('decimal_vs_fraction', '0.2', '\\frac{1}{4}', False),
    ('decimal_vs_fraction', '0.75', '\\frac34', True),
    ('decimal_vs_fraction', '0.333333', '\\frac{1}{3}', True),
    ('decimal_vs_fraction', '0.33', '\\frac{1}{3}', False),
    ('decimal_vs_fraction', '1.5', '\\frac{3}{2}', True),
    ('decimal_vs_fraction', '2.5', '\\frac{3}{2}', False),
    ('decimal_vs_fraction', '0.125', '\\frac{1}{8}', True),
    ('decimal_vs_fraction', '-0.5', '-\\frac12', True),
    ('decimal_vs_fraction', '0.5', '-\\frac12', False),
    ('decimal_vs_fraction', '\\frac{5}{4}', '1.25', True),
    ('decimal_vs_fraction', '1.2', '\\frac{5}{4}', False),
    # percent
    ('percent', '50\\%', '50\\%', True),
    ('percent', '50', '50\\%', True),
    ('percent', '50\\%', '50', True),
    ('percent', '0.5', '50\\%', True),
    ('percent', '25\\%', '25', True),
    ('percent', '25\\%', '30\\%', False),
    ('percent', '20', '25\\%', False),
    ('percent', '12.5\\%', '12.5\\%', True),
    # math-verify reads 12.5\\% as 0.125; it equates a bare number with a
    # percent only for integers (50 == 50\\%), and so do we.
    ('percent', '12.5', '12.5\\%', False),
    ('percent', '13', '12.5\\%', False),
    ('percent', '12.5\\%', '12.5', False),
    ('percent', '\\frac18', '12.5\\%', True),
    ('percent', '7.5\\%', '0.075', True),
    ('percent', '7.5', '0.075', False),
    # degrees
    ('degrees', '30^\\circ', '30', True),
    ('degrees', '30', '30^\\circ', True),
    ('degrees', '30^{\\circ}', '30^\\circ', True),
    ('degrees', '45^\\circ', '30^\\circ', False),
    ('degrees', '90', '90^{\\circ}', True),
    ('degrees', '60^\\circ', '90^{\\circ}', False),
    ('degrees', '120^\\circ', '120', True),
    ('degrees', '135', '120^\\circ', False),
    ('degrees', '180^\\circ', '180', True),
    # text_units
    ('text_units', '10\\text{ inches}', '10', True),
    ('text_units', '10', '10\\text{ cm}', True),
    ('text_units', '10 \\text{ cm}', '10', True),
    ('text_units', '12\\text{ cm}', '10', False),
    ('text_units', '5 \\text{ meters}', '5', True),
    ('text_units', '\\text{(C)}', 'C', True),
    ('text_units', 'C', '\\text{(C)}', True),
    ('text_units', '(C)', '\\text{(C)}', True),
    ('text_units', '\\text{(B)}', '\\text{(C)}', False),
    ('text_units', 'B', 'C', False),
    ('text_units', '\\text{Evelyn}', '\\text{Evelyn}', True),
    ('text_units', 'Evelyn', '\\text{Evelyn}', True),
    ('text_units', '\\text{Bob}', '\\text{Evelyn}', False),
    ('text_units', '\\text{odd}', '\\text{even}', False),
    ('text_units', '\\text{even}', '\\text{even}', True),
    ('text_units', '18\\text{ dollars}', '18', True),
    ('text_units', '\\$18.90', '18.90', True),
    ('text_units', '18.9', '\\$18.90', True),
    ('text_units', '19', '\\$18.90', False),
    ('text_units', '3\\text{ hours}', '3', True),
    ('text_units', '4\\text{ hours}', '3', False),
    ('text_units', '6\\mbox{ cm}^2', '6', True),
    ('text_units', '42 \\mathrm{~cm}', '42', True),
    # interval
    ('interval', '[1,3)', '[1,3)', True),
    ('interval', '(1,3)', '[1,3)', False),
    ('interval', '[1,3]', '[1,3)', False),
    ('interval', '(-\\infty, 1]', '(-\\infty,1]', True),
    ('interval', '(-\\infty,1)', '(-\\infty,1]', False),
    ('interval', '(-\\infty,-2)\\cup(3,\\infty)', '(-\\infty,-2) \\cup (3,\\infty)', True),
    ('interval', '(3,\\infty)\\cup(-\\infty,-2)', '(-\\infty,-2) \\cup (3,\\infty)', True),
    ('interval', '(-\\infty,-2)\\cup(2,\\infty)', '(-\\infty,-2) \\cup (3,\\infty)', False),
    ('interval', '\\left[ 0, \\frac{\\pi}{2} \\right]', '[0,\\frac{\\pi}{2}]', True),
    ('interval', '[0,\\pi]', '[0,\\frac{\\pi}{2}]', False),
    ('interval', 'x \\in [-2,7]', '[-2,7]', True),
    ('interval', '[-2,7]', 'x \\in [-2,7]', True),
    ('interval', '[-2,8]', 'x \\in [-2,7]', False),
    ('interval', '(0,\\infty)', '(0,\\infty)', True),
    ('interval', '[0,\\infty)', '(0,\\infty)', False),
    ('interval', '\\left(\\frac{3}{5},\\frac{8}{3}\\right]', '(0.6,\\frac{8}{3}]', True),
    # An inequality is not an interval (math-verify's default; see
    # test_set_relation_option for allow_set_relation_comp=True).
    ('interval', '3 \\le x \\le 4', '[3,4]', False),
    ('interval', 'x \\ge 2', '[2,\\infty)', False),
    # tuple
    ('tuple', '(3, \\frac{\\pi}{2})', '\\left( 3, \\frac{\\pi}{2} \\right)', True),
    ('tuple', '(3,\\frac{\\pi}{3})', '\\left( 3, \\frac{\\pi}{2} \\right)', False),
    ('tuple', '(1,2)', '(1,2)', True),
    ('tuple', '(2,1)', '(1,2)', False),
    ('tuple', '(1,-16,-4,43)', '(1,-16,-4,43)', True),
    ('tuple', '(1,-16,-4,42)', '(1,-16,-4,43)', False),
    ('tuple', '(1, 2, 3)', '(1,2,3)', True),
    ('tuple', '(3,2,1)', '(1,2,3)', False),
    ('tuple', '\\left(\\frac{3}{2}, -13\\right)', '(1.5,-13)', True),
    ('tuple', '(\\frac32,13)', '(1.5,-13)', False),
    ('tuple', '(0.5, 0.25)', '(\\frac12,\\frac14)', True),
    ('tuple', '(2,-1,3)', '(2,-1,3)', True),
    # set
    ('set', '\\{1,2\\}', '\\{2,1\\}', True),
    ('set', '\\{1,2,3\\}', '\\{1,2\\}', False),
    ('set', '1,2', '2,1', True),
    ('set', '1, 2, 3', '3,2,1', True),
    ('set', '1,2', '1,2,3', False),
    ('set', '-2, 1', '1,-2', True),
    ('set', '-2,1', '2,-1', False),
    ('set', '\\{1\\pm\\sqrt{5},-2\\}', '\\{1+\\sqrt{5},1-\\sqrt{5},-2\\}', True),
    ('set', '1+\\sqrt5, 1-\\sqrt5, -2', '\\{1\\pm\\sqrt{5},-2\\}', True),
    ('set', '3, 5', '5, 3', True),
    ('set', '3, 5, 7', '5, 3', False),
    ('set', '\\frac{1}{2}, \\frac{32}{9}', '\\frac{32}{9},\\frac{1}{2}', True),
    ('set', '\\frac12', '\\frac{32}{9},\\frac{1}{2}', False),
    ('set', '3, 4', '3', False),  # hedging between answers is wrong
    ('set', '3 \\text{ or } 4', '3', False),
    ('set', '\\pm 3', '3', False),
    # matrix
    ('matrix', '\\begin{pmatrix}1\\\\2\\end{pmatrix}', '\\begin{pmatrix}1\\\\2\\end{pmatrix}', True),
    ('matrix', '\\begin{pmatrix}2\\\\1\\end{pmatrix}', '\\begin{pmatrix}1\\\\2\\end{pmatrix}', False),
    ('matrix', '\\begin{pmatrix} 1 & 2 \\\\ 3 & 4 \\end{pmatrix}', '\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}', True),
    ('matrix', '\\begin{pmatrix} 1 & 2 \\\\ 3 & 5 \\end{pmatrix}', '\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}', False),
    ('matrix', '\\begin{pmatrix} 1/2 \\\\ 0 \\end{pmatrix}', '\\begin{pmatrix}\\frac12\\\\0\\end{pmatrix}', True),
    ('matrix', '\\begin{bmatrix}1&0\\\\0&1\\end{bmatrix}', '\\begin{pmatrix}1&0\\\\0&1\\end{pmatrix}', True),
    ('matrix', '\\begin{pmatrix}0&1\\\\1&0\\end{pmatrix}', '\\begin{pmatrix}1&0\\\\0&1\\end{pmatrix}', False),
    ('matrix', '\\begin{pmatrix} -1 \\\\ 3 \\\\ 2\\end{pmatrix}', '\\begin{pmatrix}-1\\\\3\\\\2\\end{pmatrix}', True),
    ('matrix', '\\begin{pmatrix} -1 \\\\ 3 \\\\ -2\\end{pmatrix}', '\\begin{pmatrix}-1\\\\3\\\\2\\end{pmatrix}', False),
    # equation
    ('equation', 'x=3', '3', True),
    ('equation', '3', 'x=3', True),
    ('equation', 'x=4', '3', False),
    ('equation', 'y=2x+1', 'y=2x+1', True),
    ('equation', 'y=1+2x', 'y=2x+1', True),
    ('equation', '2x+1', 'y=2x+1', True),
    ('equation', 'y=2x-1', 'y=2x+1', False),
    ('equation', 'x^2+2x+1', '(x+1)^2', True),
    ('equation', '(x+1)^2', 'x^2+2x+1', True),
    ('equation', 'x^2+2x', '(x+1)^2', False),
    ('equation', 'x(x+2)', 'x^2+2x', True),
    ('equation', 'a=5', '5', True),
    ('equation', 'k = \\frac{1}{2}', '0.5', True),
    ('equation', 'k=2', '0.5', False),
    ('equation', 'y = -2x', 'y=-2x', True),
    ('equation', 'y=2x', 'y=-2x', False),
    ('equation', 'x^5 - x^4 + x^3 - x^2 + x - 1', 'x^5-x^4+x^3-x^2+x-1', True),
    ('equation', 'x^5 - x^4', 'x^5-x^4+x^3-x^2+x-1', False),
    ('equation', '(a+5)(b+2)', '(b+2)(a+5)', True),
    ('equation', '(a+5)(b+3)', '(a+5)(b+2)', False),
    ('equation', '\\sin^2 x + \\cos^2 x', '1', True),
    # multi_answer
    ('multi_answer', '(2,7,13),(1,8,19),(4,5,7)', ['$(1,8,19), (2,7,13), (4,5,7)$'], True),
    ('multi_answer', '(2,7,13),(1,8,19)', ['$(1,8,19), (2,7,13), (4,5,7)$'], False),
    ('multi_answer', '69, 84', ['$69$,$84$'], True),
    ('multi_answer', '84, 69', ['$69$,$84$'], True),
    ('multi_answer', '69', ['$69$,$84$'], False),
    ('multi_answer', '1, 3, 5', ['1,3,5'], True),
    ('multi_answer', '1,3', ['1,3,5'], False),
    ('multi_answer', '\\frac12, \\frac{32}{9}', ['$\\frac{32}{9}$,$\\frac{1}{2}$'], True),
    ('multi_answer', '\\frac{32}{9}', ['$\\frac{32}{9}$,$\\frac{1}{2}$'], False),
    ('multi_answer', '-2,0,2', ['$-2,0,2$'], True),
    ('multi_answer', '-2,2', ['$-2,0,2$'], False),
    ('multi_answer', '2', ['2'], True),
    ('multi_answer', '3', ['2'], False),
    ('multi_answer', '\\frac{1}{2n+2}', ['$\\frac{1}{2 n+2}$'], True),
    ('multi_answer', '\\frac{1}{2n+1}', ['$\\frac{1}{2 n+2}$'], False),
    ('multi_answer', '2^{1009}', ['$2^{1009}$'], True),
    ('multi_answer', 'f(x)=-x, f(x)=x', ['$f(x)=x,f(x)=-x$'], True),
    ('multi_answer', 'f(x)=x', ['$f(x)=x,f(x)=-x$'], False),
    ('multi_answer', '(3,2),(-3,2),(3,-2),(-3,-2)', ['$(3,2),(-3,2),(3,-2),(-3,-2)$'], True),
    ('multi_answer', '1, 2', ['1', '2'], True),
    ('multi_answer', '2, 1', ['1', '2'], True),
    ('multi_answer', '1', ['1', '2'], False),
]
CATEGORIES = ("number", "fraction", "decimal_vs_fraction", "percent", "degrees",
              "text_units", "interval", "tuple", "set", "matrix", "equation",
              "multi_answer")


def test_pairs_cover_every_category():
  assert len(PAIRS) >= 150
  by_category = collections.defaultdict(set)
  for category, _, _, expected in PAIRS:
    by_category[category].add(expected)
  for category in CATEGORIES:
    assert by_category[category] == {True, False}, category


def test_hand_checked_pairs(pool):
  responses = [f"Thus the final answer is $\\boxed{{{pred}}}$." for _, pred, _, _ in PAIRS]
  grades = pool.grade_batch(responses, [gold for _, _, gold, _ in PAIRS])
  mismatches = [(category, pred, gold, expected, g)
                for (category, pred, gold, expected), g in zip(PAIRS, grades)
                if (g.status == "correct") != expected]
  assert not mismatches, "\n".join(map(str, mismatches))
  assert {g.status for g in grades} <= {"correct", "wrong"}


def test_hand_checked_labels_agree_with_math_verify():
  """The hand labels above are also plain math-verify's verdicts."""
  disagree = [(category, pred, gold, expected) for category, pred, gold, expected in PAIRS
              if reference(gold, f"Thus the final answer is $\\boxed{{{pred}}}$.") != expected]
  assert not disagree, "\n".join(map(str, disagree))


# ---- the kinds the grader used to get wrong, against math-verify
# (kind, ground truth, response, correct?): hand-worked, and checked against
# plain math-verify (`reference`) as well as graded.

KINDS = [
    # several boxes against a set: math-verify joins boxes separated by a
    # comma, "and", "or" into one set answer.
    ("boxes_vs_set", "\\{-5, 3\\}", "The roots are $\\boxed{3}$ and $\\boxed{-5}$.", True),
    ("boxes_vs_set", "\\{-5, 3\\}", "So $x = \\boxed{3}$ or $x = \\boxed{-5}$.", True),
    ("boxes_vs_set", "-5, 3", "\\boxed{-5},\\boxed{3}", True),
    ("boxes_vs_set", "\\{-5, 3\\}", "The root is \\boxed{3}.", False),  # one of two
    ("boxes_vs_set", "\\{-5, 3\\}", "\\boxed{3}, \\boxed{-5}, \\boxed{7}", False),  # one too many
    ("boxes_vs_set", "3", "\\boxed{3}, \\boxed{-5}", False),  # hedging is wrong
    ("boxes_vs_set", "x=1, x=-2", "\\boxed{x = -2} \\quad \\text{or} \\quad \\boxed{x = 1}", True),
    # no separator between them: only the last box is the answer
    ("boxes_vs_set", "-5", "First \\boxed{3}. Checking it in the second equation fails so "
     "the value left is \\boxed{-5}", True),
    # tuples: a set of pairs, in any order, but each pair in order
    ("tuples", "(2,3),(3,2)", "\\boxed{(2, 3)}, \\boxed{(3, 2)}", True),
    ("tuples", "(2,3),(3,2)", "\\boxed{(3, 2)} and \\boxed{(2, 3)}", True),
    ("tuples", "(2,3),(3,2)", "\\boxed{(2, 3), (3, 2)}", True),
    ("tuples", "(2,3),(3,2)", "\\boxed{(2,3)}", False),
    ("tuples", "(2,3),(-3,-2)", "\\boxed{(2, 3)}, \\boxed{(3, 2)}", False),
    ("tuples", "(1, -1, 2)", "\\boxed{(1,-1,2)}", True),
    ("tuples", "(1, -1, 2)", "\\boxed{(-1,1,2)}", False),
    # "and"/"or" lists inside one box
    ("and_list", "9, 4", "\\boxed{4 \\text{ and } 9}", True),
    ("and_list", "9, 4", "\\boxed{4 \\text{ or } 9}", True),
    ("and_list", "\\{4, 9\\}", "\\boxed{9 \\text{ and } 4}", True),
    ("and_list", "9, 4", "\\boxed{4 \\text{ and } 8}", False),
    ("and_list", "9, 4", "\\boxed{4, 9, 16}", False),
    # percent: 35% is 0.35; a bare integer may drop the sign, a decimal may not
    ("percent", "35", "\\boxed{35\\%}", True),
    ("percent", "35\\%", "\\boxed{35}", True),
    ("percent", "35\\%", "\\boxed{0.35}", True),
    ("percent", "0.35", "\\boxed{35\\%}", True),
    ("percent", "35\\%", "\\boxed{36\\%}", False),
    ("percent", "12.5\\%", "\\boxed{\\frac{1}{8}}", True),
    ("percent", "12.5\\%", "\\boxed{12.5}", False),
    ("percent", "35\\%", "\\boxed{3.5}", False),
    # thousands separators
    ("thousands", "12345", "\\boxed{12,345}", True),
    ("thousands", "12345", "\\boxed{12{,}345}", True),
    ("thousands", "1234567", "\\boxed{1,234,567}", True),
    ("thousands", "12,345", "\\boxed{12345}", True),
    ("thousands", "12345", "\\boxed{12,346}", False),
    ("thousands", "12345", "\\boxed{12 345}", False),  # math-verify: a product, not 12345
    ("thousands", "\\{3, 5\\}", "\\boxed{3,5}", True),  # not three digits: a list
]


def test_kinds_cover_both_verdicts():
  by_kind = collections.defaultdict(set)
  for kind, _, _, expected in KINDS:
    by_kind[kind].add(expected)
  assert by_kind == {k: {True, False} for k in
                     ("boxes_vs_set", "tuples", "and_list", "percent", "thousands")}


def test_kinds_agree_with_math_verify(pool):
  grades = pool.grade_batch([r for _, _, r, _ in KINDS], [g for _, g, _, _ in KINDS])
  rows = [(kind, gold, response, expected, reference(gold, response), g.status)
          for (kind, gold, response, expected), g in zip(KINDS, grades)]
  wrong = [row for row in rows if not row[3] == row[4] == (row[5] == "correct")]
  assert not wrong, "\n".join(map(str, wrong))


def test_last_box_option(pool, last_box_pool):
  # (ground truth, response, correct by math-verify's reading, correct by the last box)
  cases = [
      ("\\{1, 2\\}", "\\boxed{1}, \\boxed{2}", True, False),
      ("2", "\\boxed{1}, \\boxed{2}", False, True),
      ("3", "I first thought \\boxed{2}, but the answer is \\boxed{3}", False, True),
      ("(2,3),(3,2)", "\\boxed{(2, 3)} and \\boxed{(3, 2)}", True, False),
      ("3", "Step 1 gives \\boxed{2}. Step 2 then gives us \\boxed{3}", True, True),
      ("3", "no box, the answer is 3", False, False),
  ]
  responses, golds = [c[1] for c in cases], [c[0] for c in cases]
  joined, last = pool.grade_batch(responses, golds), last_box_pool.grade_batch(responses, golds)
  assert [g.correct for g in joined] == [c[2] for c in cases]
  assert [g.correct for g in last] == [c[3] for c in cases]
  # The default is math-verify's own reading of the boxes; with no box at all
  # mars has no answer, where plain math-verify reads the prose.
  assert [reference(gold, r) for gold, r, _, _ in cases] == [c[2] for c in cases[:-1]] + [True]
  assert [g.extracted for g in last] == [rewards.extract_boxed(r) for r in responses]
  assert joined[0].extracted == "1,2" and last[0].extracted == "2"
  assert [g.status for g in joined][-1] == [g.status for g in last][-1] == "no_answer"
  assert rewards.grade_one(responses[1], "2", boxes="last").correct
  with pytest.raises(ValueError, match="boxes must be one of"):
    rewards.GraderPool(num_workers=1, boxes="first")


def test_set_relation_option():
  # (ground truth, answer, correct with allow_set_relation_comp=True)
  cases = [("[3,4]", "3 \\le x \\le 4", True), ("[2,\\infty)", "x \\ge 2", True),
           ("[2,\\infty)", "x > 2", False), ("(-1, 1)", "-1 < x < 1", True)]
  for gold, answer, expected in cases:
    response = f"\\boxed{{{answer}}}"
    assert not rewards.grade_one(response, gold).correct  # math-verify's default
    assert not reference(gold, response)
    assert rewards.grade_one(response, gold, allow_set_relation_comp=True).correct == expected
    assert math_verify.verify(math_verify.parse(f"${gold}$"), math_verify.parse(response),
                              allow_set_relation_comp=True) == expected


# ---- one extraction for the grade, the no-answer decision and the hints

def test_grade_reads_what_read_answer_reads(pool, last_box_pool):
  plain = [t for t, _ in _EXTRACT_CASES] + [t for t, _, _ in READINGS] + [r for _, _, r, _ in KINDS]
  nasty = [r for r, _ in adversarial.adversarial_cases(n=36, seed=3)]
  for p, boxes in ((pool, "math_verify"), (last_box_pool, "last")):
    grades = p.grade_batch(plain + nasty, ["3"] * len(plain + nasty))
    for response, g in zip(plain + nasty, grades):
      # No answer exactly when there is no complete box: what the multi-attempt
      # rules decide with extract_boxed.
      assert (g.status == "no_answer") == (g.extracted is None) == (
          rewards.extract_boxed(response) is None), (response[:80], g)
    for response, g in zip(plain, grades):
      extracted, _ = rewards.read_answer(response, boxes)
      assert g.extracted == extracted, (response, g)
      if g.status == "wrong":
        # LTE de-duplicates hints with canonical_answer(extracted).
        assert g.canonical == rewards.canonical_answer(extracted, timeout_s=None), response
    if boxes == "last":
      assert [g.extracted for g in grades] == [rewards.extract_boxed(r) for r in plain + nasty]


# ---- canonical forms (LTE de-duplicates wrong answers with these)

@pytest.mark.parametrize("group", [
    ["0.5", "\\frac12", "1/2", "\\dfrac{1}{2}", "\\tfrac{1}{2}", " \\frac{1}{2} ", "0.50"],
    ["3", "3.0", "3 "],
    ["\\{1,2\\}", "\\{2, 1\\}"],
])
def test_canonical_deduplicates(pool, group):
  in_process = {rewards.canonical_answer(a) for a in group}
  assert len(in_process) == 1, in_process
  assert set(pool.canonical_batch(group)) == in_process
  grades = pool.grade_batch([f"\\boxed{{{a}}}" for a in group], ["999"] * len(group))
  assert {g.canonical for g in grades} == in_process


def test_canonical_separates_different_answers():
  keys = {rewards.canonical_answer(a) for a in ["0.5", "\\frac13", "2", "x=3", "(1,2)", "[1,2]"]}
  assert len(keys) == 6


def test_canonical_is_cheap_on_nasty_input():
  for text in ["9^{9^{9^{9}}}", "\\frac{" * 5000, "", None, "\x00", "(" * 50 + ")" * 50]:
    assert isinstance(rewards.canonical_answer(text), str)


# ---- reference solutions

# MATH-500 rows whose reference solution is not graded correct against `answer`,
# with the reason. Empty: all 500 pass (the boxed answer of every solution
# matches its `answer` field, after extraction).
MATH500_EXCEPTIONS: dict[str, str] = {}


def _format_variant(answer: str) -> str:
  """The same answer written differently: what sympy, not string equality, must accept."""
  variant = answer.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
  variant = variant.replace("\\left", "").replace("\\right", "")
  variant = re.sub(r"\\! ?", "", variant).replace("\\,", "")
  variant = variant.replace("^\\circ", "").replace("^{\\circ}", "")
  variant = re.sub(r"(?<!\\)\\ ", " ", variant)
  variant = re.sub(r"\\text\{\s*\}", "", variant)
  return re.sub(r"\\frac\{(\d)\}\{(\d)\}", r"\\frac\1\2", variant)


def test_math500_reference_solutions(pool):
  rows = read_jsonl("eval/math500/test.jsonl")
  assert len(rows) == 500
  grades = pool.grade_batch([r["solution"] for r in rows], [r["answer"] for r in rows])
  failed = {r["unique_id"]: g for r, g in zip(rows, grades) if not g.correct}
  assert set(failed) == set(MATH500_EXCEPTIONS), failed
  assert sum(g.correct for g in grades) >= 0.99 * len(rows)
  # Reformatted answers ("\dfrac"->"\frac", no "\left", no "^\circ", ...) exercise
  # the sympy path rather than the exact-string shortcut.
  variants = [(r, _format_variant(r["answer"])) for r in rows]
  variants = [(r, v) for r, v in variants if v.replace(" ", "") != r["answer"].replace(" ", "")]
  assert len(variants) >= 40
  grades = pool.grade_batch([f"\\boxed{{{v}}}" for _, v in variants],
                            [r["answer"] for r, _ in variants])
  failed = [(r["unique_id"], r["answer"], v) for (r, v), g in zip(variants, grades)
            if not g.correct]
  assert len(failed) <= 0.01 * len(variants), failed


def test_minerva_solutions_grade_correct_against_themselves(pool):
  rows = read_jsonl("eval/minerva_math/test.jsonl")
  assert len(rows) == 272
  answers = [rewards.extract_boxed(r["solution"]) for r in rows]
  assert all(answers)
  grades = pool.grade_batch([r["solution"] for r in rows], answers)
  assert [g.status for g in grades] == ["correct"] * len(rows)
  # Again with a no-op "\displaystyle" on the ground truth: the strings now
  # differ, so each pair goes through sympy instead of the exact-string shortcut.
  grades = pool.grade_batch([r["solution"] for r in rows],
                            ["\\displaystyle " + a for a in answers])
  failed = [(a, g) for a, g in zip(answers, grades) if not g.correct]
  assert not failed, failed


def test_olympiadbench_multi_answers_in_any_order(pool):
  rows = [r for r in read_jsonl("eval/olympiadbench/test.jsonl") if r["is_multiple_answer"]]
  cases = []
  for row in rows:
    parts = [p.strip() for p in answers.gold_text(row["final_answer"]).split(",")]
    # Golds that repeat a value ("-2,-2") are compared as sets by math-verify,
    # so a partial answer can match them: leave those out of this check.
    if (len(parts) > 1 and len(set(parts)) == len(parts)
        and all(re.fullmatch(r"-?\d+", p) for p in parts)):
      cases.append((row["final_answer"], parts))
  assert len(cases) >= 15
  responses = [f"\\boxed{{{', '.join(reversed(parts))}}}" for _, parts in cases]
  partial = [f"\\boxed{{{', '.join(parts[:-1])}}}" for _, parts in cases]
  golds = [gold for gold, _ in cases]
  assert all(g.correct for g in pool.grade_batch(responses, golds))
  assert not any(g.correct for g in pool.grade_batch(partial, golds))
