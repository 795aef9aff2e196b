"""notebooks/quickstart.ipynb runs headless (nbclient) with a reduced step count."""
import os

import nbformat
import pytest
from nbclient import NotebookClient

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_quickstart_notebook_runs_and_plots(tmp_path):
  nb = nbformat.read(os.path.join(REPO, "notebooks", "quickstart.ipynb"), as_version=4)
  params = [c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
  assert len(params) == 1
  params[0].source = (f"STEPS = 2\nWORKDIR = {str(tmp_path / 'run')!r}\nINSTALL = False\n"
                      "REPO = ''\nEVAL_PROBLEMS = 8\nSFT_STEPS = 10")
  env_backup = dict(os.environ)
  os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
  try:
    NotebookClient(nb, timeout=900, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
  finally:
    os.environ.clear()
    os.environ.update(env_backup)
  errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
            if o.get("output_type") == "error"]
  assert not errors, errors
  images = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
            if "image/png" in o.get("data", {})]
  assert len(images) >= 2  # the reward curve and the accuracy-vs-attempts plot
  assert os.path.exists(tmp_path / "run" / "eval" / "accuracy_vs_attempts.png")
