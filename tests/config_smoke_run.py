"""Real-regime smoke runs of configs/*.py with only their sizes shrunk (for tests/test_config_smoke.py).

Two halves:
  * builders the test process calls once per session: the real tokenizers
    (copied, plus the fast-tokenizer JSON built from them) and tiny Qwen
    models made by the installed transformers from the real config.json
    (`build_tiny_model`);
  * a worker, a process with ONE CPU device (the test session has 8 virtual
    devices, and a mesh over 8 devices would need 8x the prompts per step)
    that runs one config, or, as the test uses it, every config in turn
    (a spec path per stdin line; see `serve`):

        python tests/config_smoke_run.py SPEC.json
        python tests/config_smoke_run.py --serve

    It shrinks the config (`shrink_train_config` / `shrink_eval_config`),
    runs it through the trainer's own entry points (mars.trainer.loop.train,
    mars.trainer.run_state.setup, mars.trainer.evaluation.run_cli) and writes a JSON report: the
    fraction of entries of every trained matrix that moved, the largest
    straight-vs-resumed difference of every TrainState leaf, eval numbers and
    timings. The test asserts on that report and on the runs' metrics.jsonl.

The tiny models are briefly pre-trained ("warm start", see `warm_start`):
a random model never writes a correct \\boxed{} answer, so every GRPO / LTE /
DAPO group would be all-fail, every advantage exactly 0 and no weight could
move, however correct the trainer. The warm start makes the model answer
`\\boxed{a}` with `a` drawn from the answers of the first prompts the config
will draw (about 1 in 4 correct), so groups are mixed, as with a real
pretrained model.
"""
import atexit
import json
import os
import shutil
import sys
import time
import traceback

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO, "configs")

# config.model.path -> (dir in ../shared/models with config.json, dir with the tokenizer).
# Qwen3-8B-Base ships no tokenizer files; Qwen3 models share one tokenizer.
REAL_MODELS = {
    "Qwen/Qwen2.5-Math-1.5B": ("qwen2.5-math-1.5b", "qwen2.5-math-1.5b"),
    "Qwen/Qwen3-4B-Base": ("qwen3-4b-base", "qwen3-4b-base"),
    "Qwen/Qwen3-8B-Base": ("qwen3-8b-base", "qwen3-4b-base"),
}
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json")
EVAL_CONFIGS = ("eval_math",)
# eval_math evaluates an HF checkpoint: the tiny Qwen3-4B-shaped one (bf16, like
# the real checkpoints; eval_math's dtype for HF dirs is bf16 too).
EVAL_MODEL = ("Qwen/Qwen3-4B-Base", 2, "bfloat16")

# ---- The shrunk sizes (documented in tests/test_config_smoke.py).
TINY_LAYERS, TINY_HIDDEN, TINY_INTERMEDIATE, TINY_HEAD_DIM, TINY_KV_HEADS = 2, 64, 128, 8, 2
PROMPTS_PER_STEP = 2
MAX_NEW_TOKENS = 16
EPISODE_BUDGET = 32
CHUNK_TOKENS = 8
STEPS = 2
EVAL_LIMIT = 1
EVAL_N = 2
EVAL_MAX_ATTEMPTS = 2  # attempts-mode eval: Acc@1..2 (each k is its own set of episodes)
TINY_SFT_STEPS = 40      # configs/tiny.py's format warm start (200 steps): at 20 the model
                         # rarely boxes an answer, every group is all -1 and (a) fails by chance
GRADER_WORKERS = 1
KV_TOKENS_MIN = 4096     # a shrunk sampling.kv_tokens still holds every shrunk sequence


# ----------------------------------------------------------------------------
# Builders (test process).

def build_tokenizer_dir(real_dir: str, out_dir: str) -> str:
  """The real tokenizer files, byte for byte, plus tokenizer.json built from them
  (real Qwen dirs ship it; without it every load rebuilds the BPE, ~5 s)."""
  from mars import tokenizer as tok_lib
  os.makedirs(out_dir, exist_ok=True)
  for name in TOKENIZER_FILES:
    shutil.copyfile(os.path.join(real_dir, name), os.path.join(out_dir, name))
  tok = tok_lib.load_tokenizer(real_dir)
  tok.hf.backend_tokenizer.save(os.path.join(out_dir, "tokenizer.json"))
  return out_dir


def tiny_hf_config(real: dict):
  """The real config.json with only the sizes shrunk: 2 layers, hidden 64,
  intermediate 128, head_dim 8, 2 kv heads and the real GQA ratio (12/2 for
  Qwen2.5-Math-1.5B, 32/8 -> 8/2 for Qwen3). Everything else (model_type,
  vocab_size, rope_theta, tie_word_embeddings, qkv bias / q-k norm, eps,
  max positions, token ids) is the real value."""
  import transformers
  cls = {"qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config}[real["model_type"]]
  kw = {k: v for k, v in real.items()
        if k not in ("architectures", "transformers_version", "torch_dtype", "dtype")}
  ratio = real["num_attention_heads"] // real["num_key_value_heads"]
  kw.update(num_hidden_layers=TINY_LAYERS, hidden_size=TINY_HIDDEN,
            intermediate_size=TINY_INTERMEDIATE, head_dim=TINY_HEAD_DIM,
            num_key_value_heads=TINY_KV_HEADS, num_attention_heads=TINY_KV_HEADS * ratio,
            max_window_layers=min(real.get("max_window_layers", TINY_LAYERS), TINY_LAYERS))
  return cls(**kw)


def first_problems(data_name: str, seed: int, data_dir: str, batches: int = STEPS,
                   config=None):
  """The problems of the first `batches` steps of a run with this seed (the
  pipeline is seeded): mars.train's source and PromptPipeline, shrunk batch size."""
  from mars import data
  if data_name == "candidates":
    from mars.trainer import loop, policy, rollout_phase, run_state
    source = policy.make_source(config)
  else:
    source = data.load_source(data_name, "train", data_dir=data_dir)
  pipeline = data.PromptPipeline(source, PROMPTS_PER_STEP, seed=seed)
  return [p for _ in range(batches) for p in pipeline.next_batch()]


def warm_start(model, tokenizer, problems, *, steps: int = 150, lr: float = 1e-2,
               batch: int = 8, negatives: int = 2048, seed: int = 0):
  """Teaches the random model to answer `\\boxed{a}<|im_end|>` right after any
  assistant tag, `a` uniform over the answers of `problems` (so each of those
  problems is answered correctly ~1/len(problems) of the time).

  Contexts are the prompts mars renders for these problems: single-turn,
  multi-attempt with 1..5 attempts, and a multi-attempt transcript after a
  wrong attempt and its feedback turn. Cross-entropy on the answer tokens
  against the answer tokens plus `negatives` random vocabulary rows (the full
  151k-way softmax costs ~20x more); only the embedding rows of answer tokens
  and the transformer weights train (a per-row delta, written back at the end).
  """
  import numpy as np
  import torch
  from mars import prompts
  torch.manual_seed(seed)
  rng = np.random.default_rng(seed)
  gen = torch.Generator().manual_seed(seed)
  answers = [p["answer"] for p in problems]
  contexts = []
  for i, p in enumerate(problems):
    contexts.append(prompts.single_turn_prompt(p["problem"]))
    n = 1 + i % 5
    contexts.append(prompts.multi_attempt_prompt(p["problem"], n))
    contexts.append(prompts.multi_attempt_prompt(p["problem"], 3) + f"\\boxed{{{answers[i - 1]}}}"
                    + prompts.feedback_turn(2, close_assistant=True))
  ctx_ids = [tokenizer.encode(c) for c in contexts]
  targets = [tokenizer.encode(f"\\boxed{{{a}}}") + [tokenizer.im_end_id] for a in answers]
  rows = torch.tensor(sorted({t for s in targets for t in s}))
  emb_in = model.get_input_embeddings().weight
  emb_out = model.get_output_embeddings().weight
  tied = emb_in.data_ptr() == emb_out.data_ptr()
  vocab, width = emb_in.shape
  emb_in.requires_grad_(False)
  emb_out.requires_grad_(False)
  lut = torch.full((vocab,), len(rows), dtype=torch.long)
  lut[rows] = torch.arange(len(rows))
  zero = torch.zeros(1, width)
  d_in = torch.nn.Parameter(torch.zeros(len(rows), width))
  d_out = d_in if tied else torch.nn.Parameter(torch.zeros(len(rows), width))

  def embed(ids, table, delta):
    return table[ids] + torch.cat([delta, zero])[lut[ids]]

  trainable = [p for p in model.parameters() if p.requires_grad] + [d_in] + ([] if tied else [d_out])
  opt = torch.optim.Adam(trainable, lr=lr)
  model.train()
  for _ in range(steps):
    pairs = [(int(rng.integers(len(ctx_ids))), int(rng.integers(len(targets)))) for _ in range(batch)]
    seqs = [ctx_ids[i] + targets[j] for i, j in pairs]
    width_t = max(map(len, seqs))
    ids = torch.zeros((batch, width_t), dtype=torch.long)
    mask = torch.zeros((batch, width_t), dtype=torch.long)
    pos, labels = [], []
    for r, ((i, _), s) in enumerate(zip(pairs, seqs)):
      start = width_t - len(s)  # left padding, as mars's sampler lays prompts out
      ids[r, start:] = torch.tensor(s)
      mask[r, start:] = 1
      for t in range(len(ctx_ids[i]), len(s)):
        pos.append((r, start + t - 1))
        labels.append(s[t])
    hidden = model.model(inputs_embeds=embed(ids, emb_in, d_in), attention_mask=mask).last_hidden_state
    h = hidden[torch.tensor([p[0] for p in pos]), torch.tensor([p[1] for p in pos])]
    cand = torch.unique(torch.cat([rows, torch.randint(0, vocab, (negatives,), generator=gen)]))
    remap = torch.full((vocab,), -1, dtype=torch.long)
    remap[cand] = torch.arange(len(cand))
    loss = torch.nn.functional.cross_entropy(h @ embed(cand, emb_out, d_out).T,
                                             remap[torch.tensor(labels)])
    opt.zero_grad()
    loss.backward()
    opt.step()
  with torch.no_grad():
    emb_in[rows] += d_in
    if not tied:
      emb_out[rows] += d_out
  model.eval()
  return float(loss.detach())


def warm_tiny_model(model_path: str, seed: int, *, shared_dir: str, tokenizer_dir: str,
                    data_name: str, data_dir: str):
  """Tiny random Qwen (see tiny_hf_config), warm started (fp32, in torch).
  Returns (torch model, description for the report)."""
  import torch
  import transformers
  from mars import tokenizer as tok_lib
  t0 = time.perf_counter()
  torch.set_num_threads(1)  # a 2-layer, 64-wide model: more threads only add overhead
  config_dir, _ = REAL_MODELS[model_path]
  with open(os.path.join(shared_dir, "models", config_dir, "config.json")) as f:
    real = json.load(f)
  config = tiny_hf_config(real)
  torch.manual_seed(seed)
  cls = {"qwen2": transformers.Qwen2ForCausalLM, "qwen3": transformers.Qwen3ForCausalLM}
  model = cls[real["model_type"]](config)
  tokenizer = tok_lib.load_tokenizer(tokenizer_dir)
  problems = first_problems(data_name, seed, data_dir)
  loss = warm_start(model, tokenizer, problems, seed=seed)
  return model, {"warm_start_loss": loss, "answers": [p["answer"] for p in problems],
                 "warm_start_s": time.perf_counter() - t0}


def save_tiny_model(model, dtype: str, out_dir: str, tokenizer_dir: str) -> str:
  """save_pretrained in `dtype` (a copy: the fp32 model stays for other dtypes),
  with the tokenizer files next to it."""
  import copy
  import torch
  copy.deepcopy(model).to(getattr(torch, dtype)).save_pretrained(out_dir)
  for name in TOKENIZER_FILES + ("tokenizer.json",):
    shutil.copyfile(os.path.join(tokenizer_dir, name), os.path.join(out_dir, name))
  return out_dir


def build_tiny_model(model_path: str, seed: int, dtype: str, out_dir: str, *, shared_dir: str,
                     tokenizer_dir: str, data_name: str, data_dir: str) -> dict:
  """Tiny random Qwen (see tiny_hf_config) -> warm start -> save_pretrained in `dtype`,
  with the tokenizer files next to it. Returns a description for the report."""
  t0 = time.perf_counter()
  model, info = warm_tiny_model(model_path, seed, shared_dir=shared_dir,
                                tokenizer_dir=tokenizer_dir, data_name=data_name,
                                data_dir=data_dir)
  save_tiny_model(model, dtype, out_dir, tokenizer_dir)
  return dict(info, dir=out_dir, build_s=time.perf_counter() - t0)


# ----------------------------------------------------------------------------
# Shrinking.

def _set(c, key: str, value, changes: dict):
  section, _, field = key.rpartition(".")
  node = c
  for part in filter(None, section.split(".")):
    node = node[part]
  old = node[field]
  if old != value:
    node[field] = value
    changes[key] = [old, value]


def shrink_train_config(c, *, model_dir: str = "", tokenizer_dir: str = "") -> dict:
  """Shrinks a training config's sizes in place; returns {key: [old, new]}.

  Keeps: the number of optimizer updates per step (minibatch = rows / the
  config's updates per step), gradient accumulation (micro-batch = half the
  minibatch where the minibatch has >= 2 rows), the DAPO overlong buffer's
  share of the response budget, the group size, and every non-size setting.
  """
  changes = {}
  rows0 = c.data.prompts_per_step * c.rollout.group_size
  updates = rows0 // (c.rl.minibatch_size or rows0)
  if c.model.path:
    _set(c, "model.path", model_dir, changes)
    _set(c, "model.tokenizer_path", tokenizer_dir, changes)
  _set(c, "data.prompts_per_step", PROMPTS_PER_STEP, changes)
  rows = PROMPTS_PER_STEP * c.rollout.group_size
  if c.rl.minibatch_size:
    _set(c, "rl.minibatch_size", rows // updates, changes)
  mb = c.rl.minibatch_size or rows
  if c.rl.micro_batch_size:
    _set(c, "rl.micro_batch_size", max(mb // 2, 1), changes)
  max_new = min(c.rollout.max_new_tokens, MAX_NEW_TOKENS)
  if c.rl.overlong_buffer:
    _set(c, "rl.overlong_buffer", max(1, c.rl.overlong_buffer * max_new // c.rollout.max_new_tokens),
         changes)
  _set(c, "rollout.max_new_tokens", max_new, changes)
  if c.sampling.kv_tokens:  # the KV page budget shrinks with the rollout's rows
    _set(c, "sampling.kv_tokens", max(c.sampling.kv_tokens * rows // rows0, KV_TOKENS_MIN),
         changes)
  if c.episode.kind == "multi_attempt":
    _set(c, "episode.budget", min(c.episode.budget, EPISODE_BUDGET), changes)
    _set(c, "episode.chunk_tokens", min(c.episode.chunk_tokens, CHUNK_TOKENS), changes)
  if c.sft.steps:
    _set(c, "sft.steps", min(c.sft.steps, TINY_SFT_STEPS), changes)
  # The lr schedule's lengths are sizes too: an explicit schedule (the
  # multi-attempt configs: 317 warmup updates of 10560, as the reference) is
  # shrunk with the run, in proportion, else two steps would train at lr ~0.
  for opt in ("actor_optim", "critic_optim"):
    o = c[opt]
    if o.total_steps:
      scale = STEPS / c.train.steps
      _set(c, f"{opt}.warmup_steps", int(o.warmup_steps * scale), changes)
      _set(c, f"{opt}.delay_steps", int(o.delay_steps * scale), changes)
      _set(c, f"{opt}.total_steps", 0, changes)  # 0 = derived from the shrunk run
  _set(c, "train.steps", STEPS, changes)
  _set(c, "train.ckpt_every", 1, changes)
  _set(c, "train.grader_workers", min(c.train.grader_workers, GRADER_WORKERS), changes)
  _set(c, "eval.limit", EVAL_LIMIT, changes)
  _set(c, "eval.n", min(c.eval.n, EVAL_N), changes)
  if c.eval.mode == "attempts":
    _set(c, "eval.max_attempts", min(c.eval.max_attempts, EVAL_MAX_ATTEMPTS), changes)
  return changes


def shrink_eval_config(c) -> dict:
  """eval_math.py: the response budget, samples per problem (and the Pass@k
  columns they allow), problems per benchmark, workers."""
  changes = {}
  _set(c, "n", EVAL_N, changes)
  _set(c, "ks", tuple(k for k in c.ks if k <= EVAL_N), changes)
  _set(c, "max_new_tokens", MAX_NEW_TOKENS, changes)
  _set(c, "budget", EPISODE_BUDGET, changes)
  _set(c, "chunk_tokens", CHUNK_TOKENS, changes)
  _set(c, "limit", EVAL_LIMIT, changes)
  _set(c, "grader_workers", GRADER_WORKERS, changes)
  return changes


# ----------------------------------------------------------------------------
# Worker (one CPU device).

def _no_grader(responses, answers):
  raise AssertionError("setup() only: nothing is graded")


def _leaves(tree) -> dict:
  import jax
  import numpy as np
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {jax.tree_util.keystr(path): np.asarray(jax.device_get(x)) for path, x in flat}


def train_state(config, workdir: str) -> tuple:
  """({leaf: array} of the TrainState, step): fresh (empty workdir) or restored
  from the latest checkpoint, through mars.trainer.run_state.setup (the path a run takes)."""
  from mars.trainer import loop, policy, rollout_phase, run_state
  run = run_state.setup(config, workdir, grade_fn=_no_grader)
  try:
    return _leaves(run.state), run.start_step
  finally:
    run.close()


def common_prompt_tokens(config, data_dir: str, tokenizer_dir: str) -> list:
  """Token ids in every prompt of both steps (template and shared words): a
  row of an input-only embedding (untied input embedding, critic backbone)
  gets a gradient only if its token is in the batch; these certainly are."""
  from mars import prompts, tokenizer as tok_lib
  tok = tok_lib.load_tokenizer(tokenizer_dir)
  problems = first_problems(config.data.name, config.seed, data_dir, config=config)
  texts = []
  for p in problems:
    if config.episode.kind == "multi_attempt" and config.episode.max_attempts > 1:
      texts += [prompts.multi_attempt_prompt(p["problem"], n)
                for n in range(config.episode.min_attempts, config.episode.max_attempts + 1)]
    else:  # single-turn episodes (multi-attempt with N = 1 uses the plain prompt too)
      texts.append(prompts.single_turn_prompt(p["problem"]))
  common = None
  for ids in tok.encode_batch(texts):
    common = set(ids) if common is None else common & set(ids)
  return sorted(common)


def moved_fractions(initial: dict, final: dict, rows_only: dict) -> dict:
  """{leaf: fraction of entries != initial} for every params / critic_params leaf.

  kind "matrix": a >= 2-D weight (what optim.decay_mask decays: embeddings,
  lm_head, q/k/v/o, MLP); "vector": norm scales, biases, the value head (1-D in
  the HF layout; stacked per layer here). Leaves in `rows_only` are compared on
  those rows only.
  """
  import numpy as np
  out = {}
  for name, before in initial.items():
    if not (name.startswith(".params") or name.startswith(".critic_params")):
      continue
    after = final[name]
    vector = "norm" in name or "bias" in name or before.ndim < 2
    if name in rows_only:
      before, after = before[rows_only[name]], after[rows_only[name]]
    out[name] = {"moved": float(np.mean(before != after)), "dtype": str(before.dtype),
                 "shape": list(final[name].shape), "rows_only": name in rows_only,
                 "kind": "vector" if vector else "matrix"}
  return out


def resume_differences(a: dict, b: dict) -> dict:
  import numpy as np
  out = {}
  for name in sorted(set(a) | set(b)):
    if name not in a or name not in b:
      out[name] = "missing"
      continue
    x, y = a[name], b[name]
    if x.dtype == y.dtype and x.shape == y.shape and np.array_equal(
        x, y, equal_nan=x.dtype.kind in "fc"):
      out[name] = 0.0
      continue
    x, y = x.astype(np.float64), y.astype(np.float64)
    out[name] = 0.0 if np.array_equal(x, y, equal_nan=True) else float(np.max(np.abs(x - y)))
  return out


def eval_numbers(results: dict) -> dict:
  return {"benchmarks": {name: {k: v for k, v in m.items() if isinstance(v, (int, float))}
                         for name, m in results["benchmarks"].items()},
          "average": dict(results["average"])}


def run_train_config(spec: dict, report: dict) -> None:
  from mars import config as mars_config
  from mars.trainer import eval_settings, evaluation
  from mars.trainer import loop, policy, rollout_phase, run_state
  name, root = spec["config"], spec["workdir"]
  c = mars_config.load_config_file(os.path.join(CONFIGS, f"{name}.py"))
  report["shrunk"] = shrink_train_config(c, model_dir=spec.get("model_dir", ""),
                                         tokenizer_dir=spec.get("tokenizer_dir", ""))
  for key, value in spec.get("overrides", {}).items():  # diagnostics by hand; the test sets none
    _set(c, key, value, report.setdefault("overrides", {}))
  straight, resumed = os.path.join(root, "straight"), os.path.join(root, "resumed")
  times = report["times"]

  t0 = time.perf_counter()
  initial, _ = train_state(c, os.path.join(root, "initial"))
  times["setup_s"] = time.perf_counter() - t0

  t0 = time.perf_counter()
  loop.train(c, straight)
  times["straight_2_steps_s"] = time.perf_counter() - t0

  # Resume at step 1: the straight run's workdir as it stood after step 1
  # (its step-1 checkpoint, written asynchronously while step 2 ran).
  shutil.copytree(straight, resumed)
  shutil.rmtree(os.path.join(resumed, "checkpoints", str(STEPS)))
  t0 = time.perf_counter()
  loop.train(c, resumed)
  times["resume_1_step_s"] = time.perf_counter() - t0

  t0 = time.perf_counter()
  final, final_step = train_state(c, straight)
  final_resumed, resumed_step = train_state(c, resumed)
  report["final_steps"] = [final_step, resumed_step]
  # Input-only embeddings (untied, or the critic's): rows of tokens in every prompt.
  input_only = [leaf for leaf in final if leaf.endswith("['embed']") and (
      leaf.startswith(".critic_params") or ".params['lm_head']" in final)]
  rows_only = {}
  if input_only:
    rows = common_prompt_tokens(c, spec["tfds_dir"], c.model.tokenizer_path or c.model.path
                                or os.path.join(straight, "tokenizer"))
    report["rows_checked"] = len(rows)
    rows_only = {leaf: rows for leaf in input_only}
  report["moved"] = moved_fractions(initial, final, rows_only)
  report["resume"] = resume_differences(final, final_resumed)
  times["compare_s"] = time.perf_counter() - t0

  t0 = time.perf_counter()
  ecfg = eval_settings.trainer_eval_config(c)
  report["eval_config"] = ecfg.to_dict()
  results = evaluation.run_cli(ecfg, straight, os.path.join(root, "eval"), label=name)
  report["eval"] = eval_numbers(results)
  times["eval_s"] = time.perf_counter() - t0


def run_eval_config(spec: dict, report: dict) -> None:
  from mars import config as mars_config
  from mars.trainer import eval_settings, evaluation
  c = mars_config.load_config_file(os.path.join(CONFIGS, f"{spec['config']}.py"))
  report["shrunk"] = shrink_eval_config(c)
  t0 = time.perf_counter()
  results = evaluation.run_cli(c, spec["model_dir"], os.path.join(spec["workdir"], "eval"),
                             label=spec["config"])
  report["times"]["eval_s"] = time.perf_counter() - t0
  report["eval"] = {c.mode: eval_numbers(results)}
  report["eval_config"] = {c.mode: c.to_dict()}


def _compile_listener(totals: dict):
  """Accumulates JAX's compile-time events (seconds per event name) into `totals`."""
  def listen(event, duration, **kw):
    if "compil" in event or "trac" in event or "lower" in event:
      totals[event] = totals.get(event, 0.0) + duration
  return listen


_COMPILE_TOTALS = {}
# Files that make up an HF tokenizer directory (the model dirs hold weights too).
_TOKENIZER_DIR_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                        "special_tokens_map.json", "added_tokens.json", "chat_template.jinja")


def share_tokenizers() -> None:
  """mars.tokenizer.load_tokenizer, memoised on the tokenizer files' bytes.

  A run loads its tokenizer in every setup (fresh, resumed, restored for the
  comparisons) and in the eval CLI: ~7 loads of the 151,646-token BPE per
  config, 1-5 s each (transformers parses tokenizer.json in Python). The same
  files give the same tokenizer, so the worker loads each distinct one once,
  through the library's loader, and hands that object to every later call
  (mars only encodes and decodes with it)."""
  import hashlib
  from mars import tokenizer as tok_lib
  load = tok_lib.load_tokenizer
  if getattr(load, "shared_by_config_smoke", False):
    return
  loaded = {}

  def shared(path: str):
    if not os.path.isdir(path):
      return load(path)
    digest = hashlib.sha256()
    for name in _TOKENIZER_DIR_FILES:
      file = os.path.join(path, name)
      if os.path.exists(file):
        with open(file, "rb") as f:
          digest.update(name.encode() + b"\0" + hashlib.sha256(f.read()).digest())
    key = digest.hexdigest()
    if key not in loaded:
      loaded[key] = load(path)
    return loaded[key]

  shared.shared_by_config_smoke = True
  tok_lib.load_tokenizer = shared


def share_grader_pools() -> None:
  """mars.rewards.GraderPool, one pool per distinct set of arguments per worker.

  Every train() (straight, resumed) and every run_cli makes its own pool of
  math-verify processes (a worker and a spare, each importing math_verify and
  sympy: the first grade of a run waited 3-9 s for them). The library still
  builds each pool's arguments from the config (workers, timeout, boxes);
  the worker keeps the pool made with those arguments running and hands it to
  the next run that asks for the same ones (close() is then a no-op; the pools
  end with the worker). Grading is a pure function of (response, answer,
  options), so which process grades changes nothing."""
  from mars import rewards
  real = rewards.GraderPool
  if getattr(real, "shared_by_config_smoke", False):
    return
  pools = {}

  class SharedGraderPool:
    shared_by_config_smoke = True

    def __init__(self, *args, **kwargs):
      key = json.dumps([args, sorted(kwargs.items())], default=str)
      if key not in pools:
        pools[key] = real(*args, **kwargs)
        atexit.register(pools[key].close)
      self._pool = pools[key]

    def grade_batch(self, responses, answers):
      return self._pool.grade_batch(responses, answers)

    def canonical_batch(self, texts):
      return self._pool.canonical_batch(texts)

    def close(self):
      pass

    def __getattr__(self, name):
      return getattr(self._pool, name)

  rewards.GraderPool = SharedGraderPool


def init_jax(compile_cache: str = "") -> None:
  """Once per worker process: the compilation cache, shared tokenizers and
  grader pools, quiet logs."""
  import jax
  share_tokenizers()
  share_grader_pools()
  if compile_cache:  # the same programs compile once across runs and configs
    jax.config.update("jax_compilation_cache_dir", compile_cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  jax.monitoring.register_event_duration_secs_listener(_compile_listener(_COMPILE_TOTALS))
  from mars import train
  from mars.trainer import loop, policy, rollout_phase, run_state
  train.quiet_library_logs()


def run_spec(spec: dict) -> dict:
  """Runs one config; writes and returns its report (errors are reported, not raised)."""
  import jax
  report = {"config": spec["config"], "devices": jax.device_count(), "times": {}}
  before = dict(_COMPILE_TOTALS)
  t0 = time.perf_counter()
  try:
    if spec["config"] in EVAL_CONFIGS:
      run_eval_config(spec, report)
    else:
      run_train_config(spec, report)
  except Exception:  # pylint: disable=broad-except
    report["error"] = traceback.format_exc()
  report["times"]["total_s"] = time.perf_counter() - t0
  report["jax_compile_s"] = {k: v - before.get(k, 0.0) for k, v in _COMPILE_TOTALS.items()
                             if v - before.get(k, 0.0) > 0}
  tmp = spec["report"] + ".tmp"
  with open(tmp, "w") as f:
    json.dump(report, f, indent=1, default=str)
  os.replace(tmp, spec["report"])  # the test waits for this file
  return report


def main(spec_path: str) -> int:
  with open(spec_path) as f:
    spec = json.load(f)
  init_jax(spec.get("compile_cache", ""))
  run_spec(spec)
  return 0


def serve() -> int:
  """One process for many configs: a spec path per stdin line, each run in turn
  (its report file written when done). Compiled programs, the JAX runtime and
  the imports are then paid once per session, not once per config."""
  initialised = False
  for line in sys.stdin:
    path = line.strip()
    if not path:
      continue
    with open(path) as f:
      spec = json.load(f)
    if not initialised:
      init_jax(spec.get("compile_cache", ""))
      initialised = True
    run_spec(spec)
    print(f"config_smoke_run: done {spec['config']}", flush=True)
  return 0


if __name__ == "__main__":
  sys.path.insert(0, REPO)
  if sys.argv[1:] == ["--serve"]:
    sys.exit(serve())
  sys.exit(main(sys.argv[1]))
