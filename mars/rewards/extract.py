"""Final-answer extraction: which box(es) of a response hold its answer.

  extract_boxed(text)           content of the last complete box, or None
  extract_answer(text, boxes)   the answer text the grader parses, or None

Pure string code, linear in the text length (model outputs can be 100 kB of
adversarial LaTeX) and never running sympy, so it is also safe in the trainer
process. Both return None for the same texts (no complete box): that is the
"no_answer" decision, shared by the grader and the multi-attempt rules.
"""
import re

# `\boxed{` or `\fbox{` (TeX allows spaces before the brace).
_BOX_OPEN = re.compile(r"\\(?:boxed|fbox)\s*\{")
# Brace-less `\boxed 2` (valid TeX, and in a few MATH solutions): a number, a
# single letter or one control word (trailing punctuation dropped). Prose such
# as "the \boxed answer" is not an answer.
_BOX_BARE = re.compile(
    r"\\(?:boxed|fbox)(?![A-Za-z])[ \t]*"
    r"(\\[A-Za-z]+|[-+]?[0-9][^\s$\\{}]*|[A-Za-z](?![A-Za-z]))")
# The only tokens that matter for brace matching. `\\` is consumed as a pair so
# that `\\{` (line break, then a group) opens a group, while `\{` / `\}` are
# literal braces that never open or close one.
_BRACE_TOKEN = re.compile(r"\\[\\{}]|[{}]")


BOXES = ("math_verify", "last")
# math-verify joins a box to the next one only when fewer than 70 characters
# separate them (and, past 10, a comma, "and", "or" or ";" is among them): a run
# of boxes with shorter gaps holds every box it could join. The cap bounds the
# work on outputs with thousands of boxes.
_JOIN_GAP = 70
_MAX_JOINED_BOXES = 32


def _last_box(text: str):
  """(start, end, content, braced) of the complete box that closes last, plus
  the (start, end) of every complete braced box; None when there is none.

  One pass, so O(len(text)). "Last" is by closing brace, so for nested boxes
  the outer one wins.
  """
  if not text:
    return None
  best = None  # (start, end, content, braced) of the complete box ending last.
  for bare in _BOX_BARE.finditer(text):
    best = (bare.start(), bare.end(), bare.group(1).rstrip(".,;:") or bare.group(1), False)
  openers = {m.end() - 1: m.start() for m in _BOX_OPEN.finditer(text)}
  braced = []
  if openers:
    stack = []  # positions of open braces
    for token in _BRACE_TOKEN.finditer(text, min(openers)):
      char = token.group()
      if char == "{":
        stack.append(token.start())
      elif char == "}" and stack:
        open_pos = stack.pop()
        if open_pos in openers:
          braced.append((openers[open_pos], token.end()))
          if best is None or token.end() > best[1]:
            best = (openers[open_pos], token.end(), text[open_pos + 1:token.start()], True)
  return None if best is None else (best, braced)


def extract_boxed(text: str) -> str | None:
  """Content of the last complete `\\boxed{...}` / `\\fbox{...}` in `text`.

  "Last" is by closing brace, so for nested boxes the outer one wins. The
  brace-less TeX form `\\boxed 2` counts too (its content is one token). A box
  whose braces never close (truncated generation, unbalanced output) is not an
  answer and is skipped; if no box is complete the result is None ("no
  answer", which the multi-attempt reward distinguishes from "wrong").
  `\\boxed{}` yields "" — an answer, and a wrong one (the grader never marks ""
  correct).
  """
  found = _last_box(text)
  return None if found is None else found[0][2]


def extract_answer(text: str, boxes: str = "math_verify") -> str | None:
  """The answer text the grader reads: None exactly when `extract_boxed` is None.

  boxes="last": the last complete box (`extract_boxed`), the multi-attempt
    paper's reference reading.
  boxes="math_verify": what `math_verify.parse` reads from several boxes: the
    last box together with the boxes just before it that math-verify joins to
    it (a comma, "and", "or" or ";" between them, or fewer than 10 characters),
    as one comma-separated answer, which it parses as a set:
    `\\boxed{1}, \\boxed{2}` -> "1,2". The joining is math-verify's own
    (`extract_boxed_content` of latex2sympy2_extended, which math-verify calls),
    run on the trailing run of boxes only, so the cost stays linear.
  Only complete boxes count, in both modes: whether there is an answer at all
  never depends on `boxes`.
  """
  if boxes not in BOXES:
    raise ValueError(f"boxes must be one of {BOXES}, got {boxes!r}")
  found = _last_box(text)
  if found is None:
    return None
  (start, end, content, braced), spans = found
  if boxes == "last" or not braced:
    return content
  # Walk back over the boxes that close before the last one opens, nearest
  # first (a box nested in one already taken closes after that one opens and is
  # skipped), while the gaps are short enough for math-verify to join them.
  first, run = start, 1
  for s, e in sorted(spans, key=lambda span: span[1], reverse=True):
    if e > first:
      continue
    if first - e >= _JOIN_GAP or run >= _MAX_JOINED_BOXES:
      break
    first, run = s, run + 1
  if run == 1:
    return content
  # Imported here: the package pulls in sympy, which the trainer process needs
  # only for responses with several boxes.
  from latex2sympy2_extended.math_normalization import extract_boxed_content
  return extract_boxed_content(text[first:end], mode="last")
