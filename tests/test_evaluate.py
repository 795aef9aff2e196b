"""mars.evaluate: the pass@k estimator, attempts mode with a scripted grader,
an end-to-end CLI run with a tiny random HF model, and the bad-input errors."""
import collections
import itertools
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from mars import config as mars_config
from mars import eval_metrics, eval_report
from mars.trainer import eval_settings, evaluation
from mars.rewards import Grade, extract_boxed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QWEN = "models/qwen2.5-math-1.5b"


# ----------------------------------------------------------------------------
# pass@k.

def brute_force_pass_at_k(n, c, k):
  """Fraction of all k-subsets of the n samples holding a correct one."""
  samples = [True] * c + [False] * (n - c)
  subsets = list(itertools.combinations(samples, k))
  return sum(any(s) for s in subsets) / len(subsets)


def test_pass_at_k_matches_enumeration():
  for n in range(1, 8):
    for c in range(n + 1):
      for k in range(1, n + 1):
        assert eval_metrics.pass_at_k(n, c, k) == pytest.approx(
            brute_force_pass_at_k(n, c, k), abs=1e-12), (n, c, k)


def test_pass_at_k_table_and_stability():
  correct = [[1, 0, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0], [0, 1, 0, 1]]
  table = eval_metrics.passk_table(correct, (1, 2, 4))
  assert table["pass@1"] == pytest.approx(np.mean(correct))  # Pass@1 = mean correctness
  assert table["pass@2"] == pytest.approx((0.5 + 1 + 0 + 5 / 6) / 4)
  assert table["pass@4"] == pytest.approx(0.75)
  # The product form stays finite where C(n, k) overflows.
  assert 0.0 < eval_metrics.pass_at_k(2000, 3, 1000) < 1.0
  with pytest.raises(ValueError):
    eval_metrics.pass_at_k(4, 1, 5)


# ----------------------------------------------------------------------------
# Shared fixtures: the real Qwen tokenizer, a tiny random HF Qwen2 with its vocab.

@pytest.fixture(scope="module")
def qwen_tokenizer(shared_dir):
  from mars import tokenizer as tok_lib
  return tok_lib.load_tokenizer(str(shared_dir / QWEN))


@pytest.fixture(scope="module")
def tiny_hf_dir(shared_dir, qwen_tokenizer, tmp_path_factory):
  import torch
  import transformers
  path = tmp_path_factory.mktemp("tiny_qwen2")
  config = transformers.Qwen2Config(
      vocab_size=qwen_tokenizer.vocab_size, hidden_size=32, intermediate_size=64,
      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
      tie_word_embeddings=True, max_position_embeddings=2048)
  torch.manual_seed(0)
  transformers.Qwen2ForCausalLM(config).save_pretrained(path)
  for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
    shutil.copyfile(shared_dir / QWEN / name, path / name)
  # Real Qwen dirs ship tokenizer.json; without it every load rebuilds it from the BPE merges (~5 s).
  qwen_tokenizer.hf.backend_tokenizer.save(str(path / "tokenizer.json"))
  return str(path)


# ----------------------------------------------------------------------------
# attempts mode: a tiny "bigram" model that always answers \boxed{7}, and a
# grader scripted to accept problem p's answer at attempt SOLVE_AT[p] only.

SOLVE_AT = {"a": 1, "b": 3, "c": None, "d": 2, "e": 5}  # None: never
K = 4
EXPECTED_ACC = [0.2, 0.4, 0.6, 0.6]  # solved within k: {a}, {a,d}, {a,d,b}, {a,d,b}


def bigram_box_model(tokenizer):
  """Params whose next token depends only on the current one: any token -> `\\`,
  then `boxed`, `{`, `7`, `}`, <|im_end|>. Attention and MLP outputs are zero, so
  the residual is the token's one-hot embedding and lm_head is the bigram table."""
  from mars import models
  chain = tokenizer.encode("\\boxed{7}") + [tokenizer.im_end_id]
  assert len(set(chain)) == len(chain)
  cfg = models.tiny_config("qwen3", vocab_size=tokenizer.vocab_size, hidden_size=16,
                           intermediate_size=16, num_layers=1, num_heads=2, num_kv_heads=1,
                           head_dim=8, tie_word_embeddings=False)
  rng = np.random.default_rng(0)
  params = {"layers": {name: (rng.normal(0.0, 0.02, shape).astype(np.float32)
                              if "norm" not in name else np.ones(shape, np.float32))
                       for name, shape in models.param_shapes(cfg)["layers"].items()}}
  params["layers"]["o"][:] = 0.0     # attention adds nothing to the residual
  params["layers"]["down"][:] = 0.0  # nor does the MLP
  params["final_norm"] = np.ones((cfg.hidden_size,), np.float32)
  embed = np.zeros((cfg.vocab_size, cfg.hidden_size), np.float32)
  embed[:, 0] = 1.0                  # slot 0: any token outside the chain
  lm_head = np.zeros_like(embed)
  lm_head[chain[0], 0] = 10.0
  for slot, (cur, nxt) in enumerate(zip(chain, chain[1:]), start=1):
    embed[cur] = 0.0
    embed[cur, slot] = 1.0
    lm_head[nxt, slot] = 10.0
  params.update(embed=embed, lm_head=lm_head)
  return cfg, params


class ScriptedGrader:
  """Correct iff this is attempt SOLVE_AT[problem] of the problem's episode.

  The answer field carries the problem key; attempts are counted per rollout
  (`ResettingSampler` clears the count when an episode batch starts).
  """

  def __init__(self):
    self.seen = collections.Counter()
    self.max_seen = collections.Counter()

  def __call__(self, responses, answers):
    grades = []
    for response, answer in zip(responses, answers):
      self.seen[answer] += 1
      self.max_seen[answer] = max(self.max_seen[answer], self.seen[answer])
      ok = SOLVE_AT[answer] == self.seen[answer]
      grades.append(Grade("correct" if ok else "wrong", extracted=extract_boxed(response)))
    return grades


class ResettingSampler:
  def __init__(self, sampler, grader):
    self._sampler, self._grader = sampler, grader

  def start(self, *args, **kwargs):
    self._grader.seen.clear()
    return self._sampler.start(*args, **kwargs)

  def __getattr__(self, name):
    return getattr(self._sampler, name)


@pytest.fixture(scope="module")
def bigram_sampler(qwen_tokenizer):
  from mars import sampling
  model_cfg, params = bigram_box_model(qwen_tokenizer)
  return sampling.Sampler(model_cfg, stop_ids=qwen_tokenizer.stop_ids,
                          pad_id=qwen_tokenizer.pad_id, queue_len=128), params


@pytest.fixture(scope="module")
def attempts_run(qwen_tokenizer, bigram_sampler):
  sampler, params = bigram_sampler
  grader = ScriptedGrader()
  policy = evaluation.Policy(ResettingSampler(sampler, grader), params, qwen_tokenizer, grader)
  cfg = mars_config.default_eval_config()
  # Shapes shared with test_evaluate_for_trainer (5 prompts in the 128-token bucket, one
  # 384-column cache for every k): the compiled programs are reused.
  cfg.update(dict(mode="attempts", max_attempts=K, greedy=True, budget=128, chunk_tokens=8,
                  batch_size=len(SOLVE_AT)))
  problems = [{"id": f"toy/{p}", "problem": f"Problem {p}. " + "Find the value. " * 8, "answer": p}
              for p in SOLVE_AT]
  samples = []

  class Progress:
    total = 0

    def update(self, n):
      self.total += n

  progress = Progress()
  metrics = evaluation.run_attempts("toy", problems, cfg, policy, __import__("jax").random.key(0),
                                  samples, progress)
  return metrics, samples, grader, progress


def test_attempts_curve_matches_script(attempts_run):
  metrics, _, _, progress = attempts_run
  curve = [metrics[f"acc@{k}"] for k in range(1, K + 1)]
  assert curve == pytest.approx(EXPECTED_ACC)
  assert all(a <= b for a, b in zip(curve, curve[1:]))  # non-decreasing in k
  assert progress.total == K * len(SOLVE_AT)


def test_attempts_runs_exactly_k_attempts(attempts_run):
  _, samples, grader, _ = attempts_run
  assert len(samples) == K * len(SOLVE_AT)
  for s in samples:
    k = s["num_attempts"]
    solve = SOLVE_AT[s["answer"]]
    solved = solve is not None and solve <= k
    assert s["correct"] == solved
    # Unsolved episodes use all k attempts, each a boxed wrong answer.
    assert s["attempts_used"] == (solve if solved else k)
    assert s["answers"] == ["7"] * s["attempts_used"]
    assert s["response"].count("Your answer is incorrect.") == s["attempts_used"] - 1
    assert s["prompt"].count(f"You have {k} attempts") == 1
  assert grader.max_seen["c"] == K  # the never-solved problem saw K attempts at k = K


def test_evaluate_for_trainer(qwen_tokenizer, bigram_sampler, tmp_path):
  """The trainer's hook: same code on the live policy, flat metrics, files in the workdir."""
  import types
  import jax
  from mars import config as mars_config, demo, sharding
  sampler, params = bigram_sampler
  config = mars_config.default_config()
  config.eval.update(dict(benchmarks="candidates", mode="attempts", max_attempts=2, limit=5, n=1))
  config.episode.update(dict(budget=128, chunk_tokens=8))
  config.data.candidates_k = 3
  exact = lambda responses, answers: [
      Grade("correct" if extract_boxed(r) == a else "wrong", extract_boxed(r))
      for r, a in zip(responses, answers)]
  run = types.SimpleNamespace(
      config=config, workdir=str(tmp_path), sampler=sampler, tokenizer=qwen_tokenizer,
      state=types.SimpleNamespace(params=params), grade_fn=exact,
      mesh=sharding.make_mesh((1, 1, 1), jax.devices()[:1]))
  metrics = evaluation.evaluate_for_trainer(run, step=10)
  # The model always answers 7: an episode is solved iff 7 is the hidden answer.
  problems = eval_settings.load_problems("candidates", eval_settings.trainer_eval_config(config))
  expected = np.mean([p["answer"] == "7" for p in problems])
  assert metrics == pytest.approx({"eval/candidates/acc@1": expected, "eval/candidates/acc@2": expected,
                                   "eval/avg/acc@1": expected, "eval/avg/acc@2": expected})
  assert len(problems) == 5 and 0 < expected < 1 and all(p["id"].startswith(f"{demo.SOURCE}/") for p in problems)
  assert (tmp_path / "eval" / "step_10" / eval_report.RESULTS_JSON).exists()


# ----------------------------------------------------------------------------
# End to end: the CLI on 5 MATH-500 problems with a tiny random HF model.

@pytest.fixture(scope="module")
def cli_run(tiny_hf_dir, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("eval_out"))
  cfg = mars_config.default_eval_config()
  # seed 6 draws 5 short problems: a 128-token prompt bucket keeps the prefill cheap.
  cfg.update(dict(benchmarks="math500", mode="passk", limit=5, seed=6, n=2, ks=(1, 2),
                  max_new_tokens=8, batch_size=5, dtype="float32", mesh_shape=(1, 1, 1),
                  data_dir=str(tmp_path_factory.mktemp("tfds"))))
  results = evaluation.run_cli(cfg, tiny_hf_dir, out, label="tiny")
  return out, results


def test_cli_writes_all_outputs(cli_run):
  out, results = cli_run
  for name in (eval_report.RESULTS_JSON, eval_report.RESULTS_MD, eval_report.SAMPLES_JSONL,
               eval_report.PLOT_PNG):
    assert os.path.getsize(os.path.join(out, name)) > 0, name
  with open(os.path.join(out, eval_report.RESULTS_JSON)) as f:
    saved = json.load(f)
  assert saved["mode"] == "passk" and saved["step"] is None and saved["config"]["n"] == 2
  bench = saved["benchmarks"]["math500"]
  assert bench["num_problems"] == 5 and set(saved["average"]) == {"pass@1", "pass@2"}
  assert 0.0 <= bench["pass@1"] <= bench["pass@2"] <= 1.0
  with open(os.path.join(out, eval_report.SAMPLES_JSONL)) as f:
    samples = [json.loads(line) for line in f]
  assert len(samples) == 5 * 2
  assert {"prompt", "response", "extracted", "status", "correct", "answer"} <= set(samples[0])
  table = open(os.path.join(out, eval_report.RESULTS_MD)).read()
  assert "| Benchmark | # | Pass@1 | Pass@2 |" in table
  assert "| MATH-500 | 5 |" in table and "| Avg. |" in table
  import matplotlib.image
  image = matplotlib.image.imread(os.path.join(out, eval_report.PLOT_PNG))
  assert image.ndim == 3 and image.shape[0] > 100


def test_compare_plot_overlays_runs(cli_run, tmp_path):
  out, results = cli_run
  other = dict(results, label="single-turn", mode="attempts",
               benchmarks={"math500": {"num_problems": 5, "acc@1": 0.1, "acc@2": 0.2}},
               average={"acc@1": 0.1, "acc@2": 0.2})
  (tmp_path / "other").mkdir()
  eval_report.write_json(other, str(tmp_path / "other"))
  eval_report.write_all(results, [], str(tmp_path / "new"), compare=[str(tmp_path / "other")])
  import matplotlib.image
  assert matplotlib.image.imread(str(tmp_path / "new" / eval_report.PLOT_PNG)).size > 0


# ----------------------------------------------------------------------------
# Bad input: one clear line each, before anything loads or compiles.

def test_bad_inputs_raise_clear_errors(tmp_path, tiny_hf_dir):
  cfg = mars_config.default_eval_config()
  cfg.benchmarks = "math500,aime2024"
  with pytest.raises(eval_settings.EvalError, match="Unknown benchmark 'aime2024'; choose from"):
    evaluation.run_cli(cfg, tiny_hf_dir, str(tmp_path / "out"))
  cfg = mars_config.default_eval_config()
  cfg.n, cfg.ks = 4, (1, 8)
  with pytest.raises(eval_settings.EvalError, match="Pass@8 needs k <= n .* n=4"):
    evaluation.run_cli(cfg, tiny_hf_dir, str(tmp_path / "out"))
  (tmp_path / "empty").mkdir()
  with pytest.raises(eval_settings.EvalError, match="is empty"):
    evaluation.run_cli(mars_config.default_eval_config(), str(tmp_path / "empty"), str(tmp_path / "out"))
  (tmp_path / "run" / "checkpoints").mkdir(parents=True)
  (tmp_path / "run" / "config.json").write_text("{}")
  assert eval_settings.checkpoint_kind(str(tmp_path / "run")) == "run"
  cfg = mars_config.default_eval_config()
  cfg.benchmarks, cfg.candidates_rule = "candidates", "last"
  with pytest.raises(eval_settings.EvalError, match="Unknown candidates_rule 'last'"):
    evaluation.run_cli(cfg, str(tmp_path / "run"), str(tmp_path / "out"))
  assert not (tmp_path / "out").exists()


def test_demo_benchmark_asks_the_question_the_run_trained_on(tmp_path):
  """Eval of a run reads its task (k, rule) and episode shape from the run's config.json;
  explicit settings win, and anything else (an HF checkpoint) gets the math fallbacks."""
  assert eval_settings.run_settings(str(tmp_path)) == {}  # no config.json
  (tmp_path / "config.json").write_text(json.dumps(
      {"data": {"candidates_k": 8, "candidates_rule": "first"},
       "episode": {"budget": 30, "chunk_tokens": 6}, "rollout": {"max_new_tokens": 16},
       "sampling": {"kv_tokens": 4096}}))
  (tmp_path / "checkpoints").mkdir()
  cfg = mars_config.default_eval_config()
  cfg.chunk_tokens = 12  # set by the user: kept
  eval_settings.fill_run_defaults(cfg, str(tmp_path))
  assert (cfg.candidates_k, cfg.candidates_rule, cfg.budget, cfg.chunk_tokens,
          cfg.max_new_tokens) == (8, "first", 30, 12, 16)
  assert cfg.kv_tokens == 4096  # the run's KV pool: its compiled sampler programs fit the eval
  (tmp_path / "config.json").write_text("{not json")
  cfg = mars_config.default_eval_config()
  eval_settings.fill_run_defaults(cfg, str(tmp_path))
  assert (cfg.candidates_k, cfg.candidates_rule, cfg.budget, cfg.chunk_tokens,
          cfg.max_new_tokens, cfg.kv_tokens) == (3, "hidden", 3000, 64, 4096, 0)
  cfg = mars_config.default_eval_config()
  cfg.candidates_k, cfg.candidates_rule, cfg.limit = 8, "first", 20
  rows = eval_settings.load_problems(eval_settings.DEMO_BENCHMARK, cfg)
  assert len(rows) == 20
  assert all(r["answer"] == r["problem"].split(": ")[1].split(",")[0] for r in rows)


@pytest.mark.parametrize("args, message", [
    (["--config.benchmarks=math5000"], "Unknown benchmark 'math5000'"),
    (["--config.budget=-5"], "budget must be >= 0"),
    (["--config.n=2"], "Pass@16 needs k <= n"),
    ([], "is empty"),
])
def test_cli_exit_code_and_one_line(tmp_path, args, message):
  (tmp_path / "empty").mkdir()
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run(
      [sys.executable, "-m", "mars.evaluate", "--config=configs/eval_math.py",
       f"--checkpoint={tmp_path / 'empty'}", f"--out={tmp_path / 'out'}"] + args,
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2, proc.stderr
  errors = [line for line in proc.stderr.splitlines() if line.startswith("mars.evaluate: error:")]
  assert len(errors) == 1 and message in errors[0], proc.stderr
  assert "Traceback" not in proc.stderr
