"""A deterministic set of nasty model outputs for grader tests and benchmarks.

Each family targets one way grading can hang or crash: power towers sympy
would evaluate, deep or unbalanced brace nesting, NUL bytes, empty boxes,
astronomically large numbers, random LaTeX token soup, big symbolic
determinants, 100 kB responses with thousands of boxes, and unicode noise.
"""
import random

GOLDS = ("3", "\\frac{1}{2}", "(1,2)", "[0,1)", "x=2", "\\{1,2\\}", "10\\%",
         "30^\\circ", "\\begin{pmatrix}1\\\\2\\end{pmatrix}", ["$1$,$2$"])

_TOKENS = ("\\frac", "\\sqrt", "^", "_", "{", "}", "\\left(", "\\right]",
           "\\begin{pmatrix}", "\\end{pmatrix}", "&", "\\\\", "x", "1", "\\pi",
           "\\infty", ",", "=", "\\cup", "\\text{", "\\%", "^\\circ", "$",
           "\\dfrac{", "(", ")")

_HUGE = ("10^{10^{10}}", "100000!", "(10^{10})!", "2^{2^{2^{2^{2^{2}}}}}",
         "\\sum_{n=1}^{10^{12}} n", "\\prod_{k=1}^{10^{9}} k",
         "\\int_0^\\infty e^{-x^2} dx", "\\lim_{x\\to 0} \\frac{\\sin x}{x}",
         "e^{e^{e^{e^{10}}}}", "\\sqrt[10^{9}]{2}", "10^{-10^{10}}")


def _families(rng: random.Random):
  def tower():
    text = str(rng.randint(2, 99))
    for _ in range(rng.randint(2, 6)):
      text = f"{rng.randint(2, 99)}^{{{text}}}"
    return "\\boxed{" + text + "}"

  def frac_nest():
    depth = rng.choice([8, 20, 200, 2000, 15000])  # 15000 levels is ~100 kB
    return "\\boxed{" + "\\frac{" * depth + "1" + "}{2}" * depth + "}"

  def huge_number():
    choice = rng.randrange(len(_HUGE) + 2)
    if choice == len(_HUGE):
      return "\\boxed{" + "9" * rng.randint(1000, 5000) + "}"
    if choice == len(_HUGE) + 1:
      return "\\boxed{0." + "3" * rng.randint(1000, 5000) + "}"
    return "\\boxed{" + _HUGE[choice] + "}"

  def determinant():
    k = rng.randint(5, 30)
    rows = " \\\\ ".join(
        " & ".join(rng.choice(["x", "y", "1", "\\pi", "x^2"]) for _ in range(k))
        for _ in range(k))
    return "\\boxed{\\det\\begin{pmatrix}" + rows + "\\end{pmatrix}}"

  return [
      tower,
      lambda: "\\boxed{9^{9^{9^{9}}}}",
      frac_nest,
      lambda: "\\boxed{" + "\\frac{" * rng.randint(1000, 20000),  # unclosed
      lambda: "\\boxed{" + "".join(rng.choice("{}{}x^_1") for _ in range(rng.randint(1, 3000))),
      lambda: ("a\x00b\\boxed{" + "\x00" * rng.randint(0, 5) + str(rng.randint(0, 9))
               + "\x00}" + "\x00" * 3),
      lambda: rng.choice(["\\boxed{}", "\\boxed{ }", "\\boxed{\n}", "\\fbox{}", "\\boxed",
                          "\\boxed{{}}", "\\boxed{\\}", "}}}{{{\\boxed{", "\\boxed{\\\\}"]),
      huge_number,
      lambda: "\\boxed{" + "".join(rng.choice(_TOKENS) for _ in range(rng.randint(5, 400))) + "}",
      determinant,
      lambda: "so " + "\\boxed{1} " * rng.randint(1000, 10000) + f"\\boxed{{{rng.randint(0, 3)}}}",
      lambda: "\\boxed{" + "".join(chr(rng.randint(1, 0x2FFF)) for _ in range(rng.randint(1, 500))) + "}",
  ]


def adversarial_cases(n: int = 240, seed: int = 0) -> list[tuple[str, object]]:
  """`n` (response, ground truth) pairs cycling through the families."""
  rng = random.Random(seed)
  families = _families(rng)
  return [(families[i % len(families)](), GOLDS[rng.randrange(len(GOLDS))])
          for i in range(n)]
