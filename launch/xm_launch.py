r"""Launch `python -m mars.train` locally or on a multi-host GKE TPU slice, with sweeps.

  python launch/xm_launch.py --executor=gke --tpu_topology=v5litepod-16 \
    --image=us-docker.pkg.dev/PROJECT/mars/mars:latest \
    --config=configs/lte_4b.py --workdir=gs://BUCKET/mars/lte \
    --sweep='rl.lr=1e-6,2e-6;rl.group_size=8,16' --dry_run

Every sweep point is one work unit (ids 1..N) with its own workdir
(`--workdir` + `/{wid}`, or wherever a `{wid}` placeholder in it says) and the
point's values passed as `--config.KEY=VALUE` overrides.

`--dry_run` prints the job specs (and, for gke, the JobSet manifests) and
needs no credentials, docker or xmanager.

Why GKE does not go through XManager's own Kubernetes backend: it creates one
single-pod batch Job per xm.Job and ignores TPU requirements (no
google.com/tpu request, no TPU node selectors), so it cannot place a
multi-host slice. The gke executor therefore renders launch/gke/jobset.yaml
per work unit and `kubectl apply`s it; the xm objects (executor with TPU
requirements, container packageable) are still built when xmanager is
installed, to describe the experiment the XManager way. The local executor
runs through xm_local when xmanager is installed, else plain subprocesses;
either way all work units start at once (on one accelerator, sweep one point
per invocation).
xmanager is optional (`pip install xmanager`) and imported lazily.
"""
from __future__ import annotations

import copy
import dataclasses
import itertools
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from absl import app, flags, logging

MODULE = "mars.train"
JOBSET_TEMPLATE = Path(__file__).resolve().parent / "gke" / "jobset.yaml"

# name prefix -> (generation, GKE accelerator label, machine type, TensorCores per chip, chips -> topology)
_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8",
       256: "4x8x8", 512: "8x8x8", 1024: "8x8x16", 2048: "8x16x16", 4096: "16x16x16"}
_GENERATIONS = {
    "v5litepod": ("v5e", "tpu-v5-lite-podslice", "ct5lp-hightpu-{n}t", 1, _2D),
    "v5e": ("v5e", "tpu-v5-lite-podslice", "ct5lp-hightpu-{n}t", 1, _2D),  # common alias
    "v5p": ("v5p", "tpu-v5p-slice", "ct5p-hightpu-{n}t", 2, _3D),  # v5p-N counts TensorCores
    "v6e": ("v6e", "tpu-v6e-slice", "ct6e-standard-{n}t", 1, _2D),
}


@dataclasses.dataclass(frozen=True)
class TpuSlice:
  name: str          # as given, e.g. v5litepod-16
  generation: str    # v5e | v5p | v6e
  chips: int
  topology: str      # cloud.google.com/gke-tpu-topology
  accelerator: str   # cloud.google.com/gke-tpu-accelerator
  machine_type: str  # node pool machine type
  num_hosts: int     # = jax processes = pods
  chips_per_host: int  # google.com/tpu request per pod


def parse_tpu_topology(name: str) -> TpuSlice:
  """'v5litepod-16' -> TpuSlice; a clear ValueError listing valid sizes otherwise."""
  m = re.fullmatch(r"(v5litepod|v5e|v5p|v6e)-(\d+)", name.strip().lower())
  valid = "; ".join(
      f"{p}-{{{','.join(str(c * cores) for c in table)}}}"
      for p, (_, _, _, cores, table) in _GENERATIONS.items() if p != "v5e")
  if not m:
    raise ValueError(f"--tpu_topology={name!r} is not a TPU slice name. Expected one of: {valid}")
  gen, acc, machine, cores, table = _GENERATIONS[m.group(1)]
  n = int(m.group(2))
  chips = n // cores
  if n % cores or chips not in table:
    raise ValueError(f"--tpu_topology={name!r}: unsupported size {n} for {gen}. Expected one of: {valid}")
  # v5e/v6e slices of up to 8 chips fit one host; bigger ones (and all v5p) use 4-chip hosts.
  per_host = chips if (gen != "v5p" and chips <= 8) else min(chips, 4)
  return TpuSlice(name=name, generation=gen, chips=chips, topology=table[chips], accelerator=acc,
                  machine_type=machine.format(n=per_host), num_hosts=chips // per_host,
                  chips_per_host=per_host)


def parse_sweep(sweep: str) -> list[dict[str, str]]:
  """'a.b=1,2;c=x,y' -> cartesian product [{a.b:1,c:x}, {a.b:1,c:y}, ...]; '' -> [{}].

  Values stay strings: ml_collections' --config.KEY=VALUE parses them by the field's type.
  """
  axes = []
  for part in filter(None, (p.strip() for p in (sweep or "").split(";"))):
    key, sep, values = part.partition("=")
    key = key.strip()
    vals = [v.strip() for v in values.split(",") if v.strip()]
    if not sep or not re.fullmatch(r"[A-Za-z_][\w.]*", key) or not vals:
      raise ValueError(f"bad --sweep axis {part!r}; expected 'field.path=v1,v2'.")
    if key in (k for k, _ in axes):
      raise ValueError(f"--sweep names {key!r} twice.")
    axes.append((key, vals))
  return [dict(zip([k for k, _ in axes], point))
          for point in itertools.product(*(v for _, v in axes))]


@dataclasses.dataclass
class JobSpec:
  """One work unit: what runs, where, with which overrides. Plain data, no credentials."""
  wid: int
  name: str                # k8s-safe, unique per work unit
  executor: str            # local | gke
  args: list[str]          # argv after the python executable
  workdir: str
  overrides: dict[str, str]
  image: str | None = None
  tpu: TpuSlice | None = None
  manifest: dict | None = None  # the JobSet (gke)
  xm: dict[str, Any] | None = None  # real xmanager objects, when xmanager is installed

  @property
  def command(self) -> list[str]:
    return ["python", *self.args]


def job_workdir(workdir: str, wid: int) -> str:
  """{workdir}/{wid}, through epath so gs:// paths join correctly."""
  if "{wid}" in workdir:
    return workdir.replace("{wid}", str(wid))
  from etils import epath  # pylint: disable=g-import-not-at-top
  return str(epath.Path(workdir) / str(wid))


def render_jobset(name: str, args: list[str], image: str, tpu: TpuSlice,
                  template: Path = JOBSET_TEMPLATE) -> dict:
  """The checked-in JobSet with this work unit's name, image, args and slice shape."""
  import yaml  # pylint: disable=g-import-not-at-top
  js = copy.deepcopy(yaml.safe_load(template.read_text()))
  js["metadata"]["name"] = name
  job = js["spec"]["replicatedJobs"][0]["template"]["spec"]
  job["parallelism"] = job["completions"] = tpu.num_hosts
  pod = job["template"]["spec"]
  pod["nodeSelector"]["cloud.google.com/gke-tpu-accelerator"] = tpu.accelerator
  pod["nodeSelector"]["cloud.google.com/gke-tpu-topology"] = tpu.topology
  c = pod["containers"][0]
  c["image"] = image
  c["command"] = ["python"]
  c["args"] = list(args)
  c["resources"] = {k: {"google.com/tpu": tpu.chips_per_host} for k in ("requests", "limits")}
  for e in c["env"]:
    if e["name"] == "JAX_NUM_PROCESSES":
      e["value"] = str(tpu.num_hosts)
  return js


def _k8s_name(experiment: str, wid: int) -> str:
  # JobSet names become pod hostnames (+ '-slice-0-N'), so keep them short DNS labels.
  base = re.sub(r"[^a-z0-9-]+", "-", experiment.lower()).strip("-")[:40] or "mars"
  return f"{base if base[0].isalpha() else 'mars-' + base}-{wid}"


def _xm_objects(executor: str, tpu: TpuSlice | None, image: str | None, args: list[str]):
  """Real xmanager objects for one job, or None when xmanager is not installed."""
  try:
    from xmanager import xm  # pylint: disable=g-import-not-at-top
    from xmanager import xm_local  # pylint: disable=g-import-not-at-top
    if executor == "local":
      ex = xm_local.Local()
      pkg = xm.binary(executor_spec=xm_local.Local.Spec(), path=sys.executable, args=args)
    else:
      reqs = xm.JobRequirements({getattr(xm.ResourceType, f"TPU_{tpu.generation.upper()}"):
                                 xm.Topology(tpu.topology)}, replicas=tpu.num_hosts)
      ex = xm_local.Kubernetes(requirements=reqs)  # imports the k8s client; no credentials
      pkg = xm.container(executor_spec=xm_local.Kubernetes.Spec(), image_path=image, args=args)
  except ImportError as e:  # Not installed, or installed without some backend's deps.
    logging.log_first_n(logging.INFO, "xmanager unavailable (%s): plain job specs only.", 1, e)
    return None
  return {"executor": ex, "packageable": pkg}


def build_jobs(config: str, workdir: str, *, executor: str = "local", sweep: str = "",
               tpu_topology: str = "v5litepod-16", image: str | None = None,
               experiment: str = "mars", extra_args: tuple[str, ...] = ()) -> list[JobSpec]:
  """Expands the sweep into JobSpecs. Validates everything before anything launches."""
  if executor not in ("local", "gke"):
    raise ValueError(f"--executor={executor!r}; expected local or gke.")
  if not config or not workdir:
    raise ValueError("--config and --workdir are required.")
  tpu = parse_tpu_topology(tpu_topology) if executor == "gke" else None
  if executor == "gke":
    if not image:
      raise ValueError("--executor=gke needs --image (see launch/README.md to build and push it).")
    if not re.fullmatch(r"gs://.+", workdir):
      # Pods share nothing but GCS; a local path would split checkpoints across hosts.
      raise ValueError(f"--executor=gke needs a gs:// --workdir, got {workdir!r}.")
  jobs = []
  for wid, point in enumerate(parse_sweep(sweep), start=1):
    wd = job_workdir(workdir, wid)
    args = ["-m", MODULE, f"--config={config}", f"--workdir={wd}",
            *(f"--config.{k}={v}" for k, v in point.items()), *extra_args]
    name = _k8s_name(experiment, wid)
    spec = JobSpec(wid=wid, name=name, executor=executor, args=args, workdir=wd,
                   overrides=dict(point), image=image, tpu=tpu)
    if executor == "gke":
      spec.manifest = render_jobset(name, args, image, tpu)
    spec.xm = _xm_objects(executor, tpu, image, args)
    jobs.append(spec)
  return jobs


def launch(jobs: list[JobSpec], experiment: str = "mars") -> None:
  """Starts the jobs (needs credentials for gke: kubectl's current context)."""
  import yaml  # pylint: disable=g-import-not-at-top
  for j in jobs:
    if j.executor == "gke":
      subprocess.run(["kubectl", "apply", "-f", "-"], input=yaml.safe_dump(j.manifest),
                     text=True, check=True)
  local = [j for j in jobs if j.executor == "local"]
  if not local:
    return
  if local[0].xm is None:
    # No xmanager: start every work unit at once, as xm_local does, and wait for all.
    procs = [subprocess.Popen([sys.executable, *j.args]) for j in local]
    failed = [j.wid for j, p in zip(local, procs) if p.wait()]
    if failed:
      raise RuntimeError(f"work units {failed} failed.")
    return
  from xmanager import xm  # pylint: disable=g-import-not-at-top
  from xmanager import xm_local  # pylint: disable=g-import-not-at-top
  with xm_local.create_experiment(experiment_title=experiment) as exp:
    for j in local:
      [exe] = exp.package([j.xm["packageable"]])
      exp.add(xm.Job(executable=exe, executor=j.xm["executor"]))


def describe(jobs: list[JobSpec]) -> str:
  """Local: one shell command per work unit. GKE: a YAML stream (`... --dry_run | kubectl apply -f -`)."""
  import yaml  # pylint: disable=g-import-not-at-top
  out = []
  for j in jobs:
    out.append(f"# work unit {j.wid} ({j.executor}) {j.overrides or ''}".rstrip())
    if j.manifest:
      out.append(f"# {' '.join(j.command)}\n---\n" + yaml.safe_dump(j.manifest, sort_keys=False).rstrip())
    else:
      out.append(" ".join(j.command))
  return "\n".join(out)


FLAGS = flags.FLAGS
flags.DEFINE_string("config", "configs/lte_4b.py", "Config file, as mars.train takes it (path inside the image for gke).")
flags.DEFINE_string("workdir", None, "Run directory (gs://... works); each work unit gets /{wid} under it.")
flags.DEFINE_enum("executor", "local", ["local", "gke"], "Where to run.")
flags.DEFINE_string("tpu_topology", "v5litepod-16", "TPU slice for gke: v5litepod-N, v5p-N or v6e-N.")
flags.DEFINE_string("image", None, "Docker image for gke (built from launch/Dockerfile).")
flags.DEFINE_string("sweep", "", "'field=v1,v2;other=a,b': cartesian product of --config.field overrides.")
flags.DEFINE_string("experiment", "mars", "Experiment name (prefix of the JobSet names).")
flags.DEFINE_bool("dry_run", False, "Print the job specs and manifests; launch nothing.")


def run(argv) -> list[JobSpec]:
  """Builds (and unless --dry_run, launches) the jobs from parsed flags; returns them."""
  jobs = build_jobs(FLAGS.config, FLAGS.workdir, executor=FLAGS.executor, sweep=FLAGS.sweep,
                    tpu_topology=FLAGS.tpu_topology, image=FLAGS.image,
                    experiment=FLAGS.experiment, extra_args=tuple(argv[1:]))
  print(describe(jobs))
  if FLAGS.dry_run:
    logging.info("dry run: %d work unit(s), nothing launched.", len(jobs))
  else:
    launch(jobs, FLAGS.experiment)
  return jobs


def main(argv):
  try:
    run(argv)  # absl exits with main's return value, so return nothing.
  except ValueError as e:  # Bad flags: a usage message, not a traceback.
    sys.exit(f"xm_launch: {e}")


if __name__ == "__main__":
  flags.mark_flag_as_required("workdir")
  app.run(main)
