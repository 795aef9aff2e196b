"""The package's shape: one-way imports, every config key read, a docstring per module.

Static checks over the source (ast), so they run in a second and need no weights.
"""
import ast
import collections
import pathlib
import re
import subprocess
import sys

import pytest

from mars import config as mars_config

REPO = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = REPO / "mars"
CLIS = ("mars.train", "mars.evaluate", "mars.export", "mars.plan")


def _module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(REPO).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict:
  return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _layer(module: str) -> int:
  if module in CLIS:
    return 3
  if module.startswith("mars.trainer"):
    return 2
  if module.startswith("mars.demo"):
    return 1
  return 0


def import_graph(modules: dict) -> dict:
  """{module: modules it imports}, counting imports inside functions too."""
  graph = collections.defaultdict(set)
  for name, path in modules.items():
    for node in ast.walk(ast.parse(path.read_text())):
      targets = []
      if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mars"):
        targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules
                   else node.module for a in node.names]
      elif isinstance(node, ast.Import):
        targets = [a.name for a in node.names if a.name.startswith("mars")]
      graph[name].update(t for t in targets if t in modules and t != name)
  return graph


def find_cycle(graph: dict):
  """One import cycle as a list of modules, or None."""
  state, stack = {}, []

  def visit(node):
    state[node] = "open"
    stack.append(node)
    for nxt in sorted(graph.get(node, ())):
      if state.get(nxt) == "open":
        return stack[stack.index(nxt):] + [nxt]
      if nxt not in state:
        found = visit(nxt)
        if found:
          return found
    stack.pop()
    state[node] = "done"
    return None

  for node in sorted(graph):
    if node not in state:
      found = visit(node)
      if found:
        return found
  return None


def test_imports_form_no_cycle_and_point_one_way():
  graph = import_graph(_modules())
  # A package importing its own submodules (mars.models -> mars.models.qwen) is not a cycle
  # unless a submodule imports back through it; the graph keeps both kinds of edge.
  assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"
  upward = sorted((a, b) for a in graph for b in graph[a] if _layer(b) > _layer(a))
  assert not upward, f"library -> demo/trainer/CLI imports: {upward}"


def test_cycle_finder_finds_a_cycle():
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
  assert find_cycle({"a": {"b"}, "b": set()}) is None


def _config_keys():
  keys = set()

  def walk(d, prefix=""):
    for k, v in d.items():
      if hasattr(v, "items"):
        walk(v, f"{prefix}{k}.")
      else:
        keys.add(f"{prefix}{k}")

  for path in sorted((REPO / "configs").glob("*.py")):
    walk(mars_config.load_config_file(str(path)))
  walk(mars_config.default_config())
  walk(mars_config.default_eval_config())
  return keys


def unread_keys(keys, source: str) -> list:
  """Keys whose last name appears in no attribute access, subscript or string of `source`."""
  return sorted(k for k in keys if not re.search(
      rf"(\.{re.escape(k.split('.')[-1])}\b|[\"']{re.escape(k.split('.')[-1])}[\"'])", source))


def test_every_config_key_is_read_by_some_code():
  # Read by the package: mars/config.py's defining lines (`c.rl.eps_low = 0.2`) don't count,
  # the validation's (mars/config_validation.py) and everything else's reads do.
  defining = re.compile(r"^\s*[co]\.[\w.]+\s*=", re.M)
  source = "\n".join(defining.sub("", p.read_text()) if p == PACKAGE / "config.py"
                     else p.read_text() for p in PACKAGE.rglob("*.py"))
  assert unread_keys(_config_keys(), source) == []
  # The check can fail: a key nothing reads is reported.
  assert unread_keys({"rl.surely_nobody_reads_this"}, source) == ["rl.surely_nobody_reads_this"]


def test_every_module_says_what_it_is_for():
  missing = [name for name, path in _modules().items()
             if not ast.get_docstring(ast.parse(path.read_text()))]
  assert not missing, f"modules without a docstring: {missing}"


@pytest.mark.parametrize("cli", [c for c in CLIS if (PACKAGE / f"{c.split('.')[1]}.py").exists()])
def test_cli_help_lists_its_flags(cli):
  out = subprocess.run([sys.executable, "-m", cli, "--helpshort"], cwd=REPO, text=True,
                       capture_output=True, timeout=300)
  assert out.returncode in (0, 1), out.stderr[-2000:]  # absl exits 1 after printing help
  flags = re.findall(r"^\s+--(?:\[no\])?(\w+):", out.stdout, re.M)
  assert flags, out.stdout
  for flag in flags:  # each flag has a description on its line or the next
    line = re.search(rf"--(?:\[no\])?{flag}:(.*)\n(.*)", out.stdout)
    assert (line.group(1) + line.group(2)).strip(), f"{cli} --{flag} has no description"
