"""Raw data files (JSON Lines, a JSON array, a directory of JSON files) as rows, and the
field readers builders normalize them with; a row that cannot be read is a BadRow."""
import glob
import json
import os
import re

from mars.rewards.extract import extract_boxed


class MalformedRowError(ValueError):
  """A raw row that cannot be normalized; the message names file and line."""


class BadRow(Exception):
  """Raised by a builder's `normalize`, re-raised with file/line context."""


def read_rows(path: str):
  """Yields (line_number, row dict or BadRow) from a raw file.

  Handles JSON Lines, a JSON array (SimpleRL's original file) and a directory
  of one-JSON-object files (the Hendrycks MATH tarball). Bad JSON is reported
  per row, so the caller decides between raising and skipping.
  """
  if os.path.isdir(path):
    files = sorted(glob.glob(os.path.join(path, "**", "*.json"), recursive=True),
                   key=_natural_key)
    for number, name in enumerate(files, start=1):
      with open(name, encoding="utf-8") as f:
        yield number, _loads(f.read())
    return
  with open(path, encoding="utf-8") as f:
    text = f.read()
  if text.lstrip().startswith("["):
    try:
      rows = json.loads(text)
    except json.JSONDecodeError as e:
      yield e.lineno, BadRow(f"bad JSON: {e.msg}")
      return
    for number, row in enumerate(rows, start=1):
      yield number, row
    return
  for number, line in enumerate(text.splitlines(), start=1):
    if line.strip():
      yield number, _loads(line)


def _loads(text: str):
  try:
    return json.loads(text)
  except json.JSONDecodeError as e:
    return BadRow(f"bad JSON: {e.msg} (column {e.colno})")


def _natural_key(path: str):
  return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path)]


def text_field(row: dict, *keys: str, allow_empty: bool = False) -> str:
  """The first present, non-empty field among `keys`, as a stripped string.

  allow_empty: accept a field that is present but "" (returned as "").
  """
  empty = None
  for key in keys:
    value = row.get(key)
    if value is None:
      continue
    if isinstance(value, float) and value.is_integer():
      value = int(value)  # AMC stores 27.0
    value = str(value).strip()
    if value:
      return value
    empty = value
  if allow_empty and empty is not None:
    return empty
  raise BadRow(f"missing field {' / '.join(repr(k) for k in keys)}")


def level_number(value) -> int:
  """MATH's "Level 3" (or 3) -> 3; "Level ?" -> 0."""
  match = re.search(r"\d+", str(value or ""))
  return int(match.group()) if match else 0


def boxed_answer(solution: str, allow_empty: bool = False) -> str:
  """Last box of a reference solution; no box at all is malformed."""
  answer = extract_boxed(solution)
  if answer is None or not (answer.strip() or allow_empty):
    raise BadRow("no \\boxed{} answer in 'solution'")
  return answer.strip()
