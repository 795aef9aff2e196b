"""Final-answer extraction: the content of the last complete \\boxed{...}.

Pure string code, linear in the text length (model outputs can be 100 kB of
adversarial LaTeX), with no sympy, so it is also safe in the trainer process.
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
  if not text:
    return None
  best = None  # (end, content) of the complete box ending last.
  for bare in _BOX_BARE.finditer(text):
    best = (bare.end(), bare.group(1).rstrip(".,;:") or bare.group(1))
  openers = {m.end() - 1 for m in _BOX_OPEN.finditer(text)}
  if openers:
    stack = []  # positions of open braces; one pass, so O(len(text)).
    for token in _BRACE_TOKEN.finditer(text, min(openers)):
      char = token.group()
      if char == "{":
        stack.append(token.start())
      elif char == "}" and stack:
        open_pos = stack.pop()
        if open_pos in openers and (best is None or token.end() > best[0]):
          best = (token.end(), text[open_pos + 1:token.start()])
  return None if best is None else best[1]
