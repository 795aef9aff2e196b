"""Grading: extraction, hand-checked pairs, canonical forms, reference solutions."""
import collections
import json
import os
import pathlib
import re

import pytest

from mars import rewards
from mars.rewards import grader

SHARED = pathlib.Path(os.environ.get(
    "MARS_SHARED_DIR", pathlib.Path(__file__).resolve().parents[1].parent / "shared"))
DATA = pathlib.Path(os.environ.get("MARS_DATA_DIR", SHARED / "data"))


def read_jsonl(relpath):
  path = DATA / relpath
  if not path.exists():
    pytest.fail(f"{path} not found; set MARS_DATA_DIR to shared/data")
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def pool():
  with rewards.GraderPool(num_workers=2, timeout_s=3.0) as p:
    yield p


# ---- extraction

@pytest.mark.parametrize("text, expected", [
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
])
def test_extract_boxed(text, expected):
  assert rewards.extract_boxed(text) == expected


def test_extract_boxed_is_linear_on_100kb():
  import time
  text = "\\boxed{" + "\\frac{" * 20000  # 120 kB, never closes
  start = time.perf_counter()
  assert rewards.extract_boxed(text) is None
  assert rewards.extract_boxed("\\boxed{1} " * 10000 + "\\boxed{2}") == "2"
  assert time.perf_counter() - start < 1.0


def test_gold_text():
  assert grader.gold_text("$\\frac12$") == "\\frac12"
  assert grader.gold_text(27.0) == "27"
  assert grader.gold_text(["$69$,$84$"]) == "69,84"
  assert grader.gold_text(["1", "2"]) == "1, 2"
  assert grader.gold_text("\\$18") == "\\$18"  # escaped dollars are content


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
    ('percent', '12.5', '12.5\\%', True),
    ('percent', '13', '12.5\\%', False),
    ('percent', '12.5\\%', '12.5', True),
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
    ('interval', '3 \\le x \\le 4', '[3,4]', True),
    ('interval', 'x \\ge 2', '[2,\\infty)', True),
    ('interval', 'x > 2', '[2,\\infty)', False),
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
    parts = [p.strip() for p in grader.gold_text(row["final_answer"]).split(",")]
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
