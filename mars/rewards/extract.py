"""Final-answer extraction: the complete \\boxed{...} of a response.

  extract_boxes(text)   every complete box's content, in closing order
  extract_boxed(text)   the last one, or None: the "no answer" decision, shared
                        by the grader and the multi-attempt rules

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


def extract_boxes(text: str) -> list[str]:
  """Contents of every complete `\\boxed{...}` / `\\fbox{...}`, in closing order.

  One pass, so O(len(text)). For nested boxes the outer one closes last. The
  brace-less TeX form `\\boxed 2` counts too (its content is one token). A box
  whose braces never close (truncated generation, unbalanced output) is not an
  answer and is skipped.
  """
  if not text:
    return []
  found = []  # (end, content)
  for bare in _BOX_BARE.finditer(text):
    found.append((bare.end(), bare.group(1).rstrip(".,;:") or bare.group(1)))
  openers = {m.end() - 1 for m in _BOX_OPEN.finditer(text)}
  if openers:
    stack = []  # positions of open braces; one pass, so O(len(text)).
    for token in _BRACE_TOKEN.finditer(text, min(openers)):
      char = token.group()
      if char == "{":
        stack.append(token.start())
      elif char == "}" and stack:
        open_pos = stack.pop()
        if open_pos in openers:
          found.append((token.end(), text[open_pos + 1:token.start()]))
  return [content for _, content in sorted(found, key=lambda item: item[0])]


def extract_boxed(text: str) -> str | None:
  """Content of the last complete `\\boxed{...}` / `\\fbox{...}` in `text`.

  "Last" is by closing brace, so for nested boxes the outer one wins. If no box
  is complete the result is None ("no answer", which the multi-attempt reward
  distinguishes from "wrong"). `\\boxed{}` yields "" — an answer, and a wrong
  one (the grader never marks "" correct).
  """
  boxes = extract_boxes(text)
  return boxes[-1] if boxes else None
