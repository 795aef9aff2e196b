"""Launch scaffolding: manifests, xm_launch dry runs, and multi-host env detection."""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mars import distributed

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"


def _load_xm_launch():
  # launch/ is scripts, not a package: load by path (absl flags register once per module object).
  name = "mars_test_xm_launch"
  if name not in sys.modules:
    spec = importlib.util.spec_from_file_location(name, LAUNCH / "xm_launch.py")
    sys.modules[name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sys.modules[name])
  return sys.modules[name]


xl = _load_xm_launch()


def _container(js):
  pod = js["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]
  return pod, pod["containers"][0]


# --- manifests -------------------------------------------------------------

def test_jobset_names_module_flags_and_jax_env():
  js = yaml.safe_load((LAUNCH / "gke" / "jobset.yaml").read_text())
  assert js["kind"] == "JobSet" and js["apiVersion"].startswith("jobset.x-k8s.io/")
  job = js["spec"]["replicatedJobs"][0]["template"]["spec"]
  pod, c = _container(js)
  argv = c["command"] + c["args"]
  assert argv[:3] == ["python", "-m", "mars.train"]
  assert any(a.startswith("--config=configs/") for a in argv)
  assert any(a.startswith("--workdir=gs://") for a in argv)
  env = {e["name"]: e for e in c["env"]}
  assert {"JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"} <= set(env)
  # v5e 4x4: 4 hosts x 4 chips, one JAX process per host.
  assert pod["nodeSelector"]["cloud.google.com/gke-tpu-topology"] == "4x4"
  assert pod["nodeSelector"]["cloud.google.com/gke-tpu-accelerator"] == "tpu-v5-lite-podslice"
  assert job["parallelism"] == job["completions"] == int(env["JAX_NUM_PROCESSES"]["value"]) == 4
  assert c["resources"]["limits"]["google.com/tpu"] == 4
  assert "job-completion-index" in env["JAX_PROCESS_ID"]["valueFrom"]["fieldRef"]["fieldPath"]
  # Coordinator = pod 0 of this JobSet's replicated job, via the headless service.
  rj = js["spec"]["replicatedJobs"][0]["name"]
  assert env["JAX_COORDINATOR_ADDRESS"]["value"].startswith(f"$(JOBSET_NAME)-{rj}-0-0.$(JOBSET_NAME):")
  assert "JOBSET_NAME" in env and list(env).index("JOBSET_NAME") < list(env).index("JAX_COORDINATOR_ADDRESS")


def test_dockerfile_installs_package():
  text = (LAUNCH / "Dockerfile").read_text()
  assert "jax[tpu]" in text and "pip install ." in text and 'ENTRYPOINT ["python"]' in text


# --- xm_launch ---------------------------------------------------------------

def test_sweep_is_cartesian_product():
  pts = xl.parse_sweep("rl.lr=1e-6,2e-6; rl.group_size=8,16,32")
  assert len(pts) == 6 and len({tuple(p.items()) for p in pts}) == 6
  assert pts[0] == {"rl.lr": "1e-6", "rl.group_size": "8"}
  assert xl.parse_sweep("") == [{}]
  for bad in ("rl.lr", "rl.lr=", "1x=2", "a=1;a=2"):
    with pytest.raises(ValueError):
      xl.parse_sweep(bad)


def test_tpu_topologies():
  s = xl.parse_tpu_topology("v5litepod-16")
  assert (s.topology, s.num_hosts, s.chips_per_host, s.machine_type) == ("4x4", 4, 4, "ct5lp-hightpu-4t")
  s = xl.parse_tpu_topology("v5p-32")  # v5p counts TensorCores: 16 chips
  assert (s.chips, s.topology, s.num_hosts, s.accelerator) == (16, "2x2x4", 4, "tpu-v5p-slice")
  s = xl.parse_tpu_topology("v6e-8")  # single host
  assert (s.topology, s.num_hosts, s.chips_per_host) == ("2x4", 1, 8)
  for bad in ("v5litepod-12", "v4-8", "v5p-7", "tpu"):
    with pytest.raises(ValueError, match="tpu_topology"):
      xl.parse_tpu_topology(bad)


def test_dry_run_local_sweep():
  jobs = xl.build_jobs("configs/tiny.py", "/tmp/exp", executor="local",
                       sweep="rl.lr=1e-6,2e-6;rl.group_size=8,16")
  assert [j.wid for j in jobs] == [1, 2, 3, 4]
  assert jobs[0].args[:4] == ["-m", "mars.train", "--config=configs/tiny.py", "--workdir=/tmp/exp/1"]
  overrides = {tuple(a for a in j.args if a.startswith("--config.")) for j in jobs}
  assert overrides == {(f"--config.rl.lr={lr}", f"--config.rl.group_size={g}")
                       for lr in ("1e-6", "2e-6") for g in ("8", "16")}
  assert all(j.manifest is None and j.tpu is None for j in jobs)


def test_dry_run_gke_renders_jobsets():
  jobs = xl.build_jobs("configs/lte_4b.py", "gs://b/exp/{wid}/run", executor="gke",
                       tpu_topology="v5p-32", image="img:1", sweep="rl.lr=1,2", experiment="LTE_4b")
  assert [j.workdir for j in jobs] == ["gs://b/exp/1/run", "gs://b/exp/2/run"]
  js = jobs[1].manifest
  assert js["metadata"]["name"] == "lte-4b-2"
  pod, c = _container(js)
  assert c["image"] == "img:1" and c["args"] == jobs[1].args and "--config.rl.lr=2" in c["args"]
  assert pod["nodeSelector"]["cloud.google.com/gke-tpu-topology"] == "2x2x4"
  env = {e["name"]: e.get("value") for e in c["env"]}
  assert env["JAX_NUM_PROCESSES"] == "4" and c["resources"]["requests"]["google.com/tpu"] == 4
  # The template itself is untouched by rendering.
  assert "IMAGE" in (LAUNCH / "gke" / "jobset.yaml").read_text()
  assert xl.job_workdir("gs://b/x", 3) == "gs://b/x/3"


def test_gke_errors_are_clear():
  with pytest.raises(ValueError, match="tpu_topology"):
    xl.build_jobs("c.py", "gs://b/x", executor="gke", tpu_topology="v5e-3", image="i")
  with pytest.raises(ValueError, match="--image"):
    xl.build_jobs("c.py", "gs://b/x", executor="gke")
  with pytest.raises(ValueError, match="gs://"):
    xl.build_jobs("c.py", "/tmp/x", executor="gke", image="i")


def test_xm_objects_when_xmanager_installed():
  pytest.importorskip("xmanager")
  from xmanager import xm
  [job] = xl.build_jobs("c.py", "gs://b/x", executor="gke", image="img:1")
  reqs = job.xm["executor"].requirements
  assert reqs.accelerator == xm.ResourceType.TPU_V5E and reqs.topology == xm.Topology("4x4")
  assert job.xm["packageable"].executable_spec.image_path == "img:1"
  [job] = xl.build_jobs("c.py", "/tmp/x", executor="local")
  assert job.xm["packageable"].args.to_list()[:2] == ["-m", "mars.train"]


def test_cli_dry_run_needs_no_credentials(tmp_path):
  # Real flag parsing end to end, in a clean env (no kube config, no GCP creds).
  env = {k: v for k, v in os.environ.items() if not k.startswith(("GOOGLE", "KUBE", "CLOUDSDK"))}
  env["HOME"] = str(tmp_path)
  out = subprocess.run(
      [sys.executable, str(LAUNCH / "xm_launch.py"), "--executor=gke", "--image=img:1",
       "--tpu_topology=v6e-16", "--workdir=gs://b/x", "--sweep=rl.lr=1,2", "--dry_run"],
      capture_output=True, text=True, env=env, timeout=60, check=True).stdout
  docs = [d for d in yaml.safe_load_all(out) if isinstance(d, dict)]
  assert len(docs) == 2 and all(d["kind"] == "JobSet" for d in docs)
  assert "--workdir=gs://b/x/2" in out


# --- mars.distributed ---------------------------------------------------------

def test_detect_nothing_means_single_process():
  assert distributed.detect({}) is None
  assert distributed.detect({"TPU_WORKER_HOSTNAMES": "host0", "TPU_WORKER_ID": "0"}) is None
  assert distributed.detect({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "1",
                             "JAX_PROCESS_ID": "0"}) is None


def test_detect_explicit_vars_win():
  env = {"JAX_COORDINATOR_ADDRESS": "mars-slice-0-0.mars:8482", "JAX_NUM_PROCESSES": "4",
         "JAX_PROCESS_ID": "2", "TPU_WORKER_HOSTNAMES": "a,b,c,d", "TPU_WORKER_ID": "3"}
  d = distributed.detect(env)
  assert d.source == "explicit"
  assert d.kwargs == dict(coordinator_address="mars-slice-0-0.mars:8482", num_processes=4, process_id=2)
  with pytest.raises(ValueError, match="JAX_PROCESS_ID"):
    distributed.detect({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2"})
  with pytest.raises(ValueError, match="out of range"):
    distributed.detect({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2"})


def test_detect_tpu_metadata_and_switch():
  assert distributed.detect({"TPU_WORKER_HOSTNAMES": "a,b", "TPU_WORKER_ID": "0"}).source == "tpu"
  assert distributed.detect({"TPU_WORKER_ID": "1"}).source == "tpu"
  assert distributed.detect({"MEGASCALE_NUM_SLICES": "2"}).source == "megascale"
  assert distributed.detect({"MARS_DISTRIBUTED": "1"}).source == "forced"
  assert distributed.detect({"MARS_DISTRIBUTED": "0", "TPU_WORKER_HOSTNAMES": "a,b"}) is None
  assert distributed.detect({"TPU_WORKER_HOSTNAMES": "a,b"}).kwargs == {}  # jax detects the rest


def test_maybe_initialize_without_env_does_not_initialize(monkeypatch):
  import jax

  def boom(*a, **k):
    raise AssertionError("initialize must not be called")
  monkeypatch.setattr(jax.distributed, "initialize", boom)
  assert distributed.maybe_initialize(environ={}) is False


def test_maybe_initialize_passes_explicit_vars_once(monkeypatch):
  import jax
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
  monkeypatch.setattr(distributed, "_initialized", False)
  env = {"JAX_COORDINATOR_ADDRESS": "localhost:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"}
  assert distributed.maybe_initialize(environ=env) and distributed.maybe_initialize(environ=env)
  assert calls == [dict(coordinator_address="localhost:1", num_processes=2, process_id=1)]


def test_rows_and_global_array_single_process():
  import jax
  import numpy as np
  assert distributed.even_rows(8, 1, 2) == slice(4, 8)
  with pytest.raises(ValueError, match="divisible"):
    distributed.even_rows(7, 0, 2)
  assert distributed.is_main_process() and distributed.process_count() == 1
  assert distributed.local_rows(6) == slice(0, 6)
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
  sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data", None))
  rows = distributed.local_rows(8, sh)
  assert rows == slice(0, 8)
  x = np.arange(16, dtype=np.int32).reshape(8, 2)
  g = distributed.global_array_from_local(x[rows], sh, (8, 2))
  assert g.shape == (8, 2) and np.array_equal(np.asarray(g), x)


def test_distributed_imports_without_jax():
  code = "import sys, mars.distributed; assert 'jax' not in sys.modules"
  subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


_WORKER = """
import numpy as np
from mars import distributed
assert distributed.maybe_initialize(cpu_collectives="gloo")
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
mesh = Mesh(np.array(jax.devices()), ("data",))
sh = NamedSharding(mesh, P("data", None))
rows = distributed.local_rows(8, sh)
assert rows == distributed.local_rows(8)  # sharding-derived rows == even split here
full = np.arange(24, dtype=np.float32).reshape(8, 3)
g = distributed.global_array_from_local(full[rows], sh, (8, 3))
tot = jax.jit(lambda x: x.sum(), out_shardings=NamedSharding(mesh, P()))(g)
print("OK", distributed.process_index(), rows.start, rows.stop, float(tot), flush=True)
"""


def test_two_processes_on_localhost(tmp_path):
  # The real thing, small: 2 processes x 2 CPU devices over gloo, global sum of per-process rows.
  import socket
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  (tmp_path / "w.py").write_text(_WORKER)
  procs = []
  for i in range(2):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2",
               JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i))
    procs.append(subprocess.Popen([sys.executable, str(tmp_path / "w.py")], env=env, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
  outs = [p.communicate(timeout=90)[0] for p in procs]
  assert all(p.returncode == 0 for p in procs), outs
  got = sorted(line.split()[1:] for o in outs for line in o.splitlines() if line.startswith("OK"))
  assert got == [["0", "0", "4", "276.0"], ["1", "4", "8", "276.0"]], outs
