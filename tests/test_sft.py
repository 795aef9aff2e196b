"""The supervised warm start: masking, determinism, sharding, and that it teaches the format."""
import jax
import numpy as np
import pytest

from mars import demo, prompts, sft, sharding
from mars.rewards.extract import extract_boxed
from mars.sampling import GREEDY, Sampler
from mars.tokenizer import left_pad, load_tokenizer

# Measured (3 seeds, 64 held-out prompts): 100 steps give a boxed candidate
# 58-86% of the time, 150 steps 97-100%. About 15 s on 2 CPU cores.
STEPS, BATCH, LR = 150, 16, 3e-3


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  return load_tokenizer(demo.build_tokenizer(str(tmp_path_factory.mktemp("sft") / "tok")))


@pytest.fixture(scope="module")
def cfg(tok):
  return demo.tiny_model_config(tok.vocab_size)


def test_pack_examples_scores_only_the_response(tok):
  examples = [("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", "yo<|im_end|>"),
              (prompts.single_turn_prompt("Candidates: 1, 2, 3. Which one is it?"),
               demo.answer_text(2) + prompts.IM_END)]
  tokens, attention_mask, loss_mask = sft.pack_examples(tok, examples)
  assert tokens.shape[1] % 16 == 0
  for row, (prompt, response) in enumerate(examples):
    assert tok.decode(tokens[row][loss_mask[row]]) == response
    assert tok.decode(tokens[row][attention_mask[row]]) == prompt + response
    assert attention_mask[row, 0] and not attention_mask[row, -1]  # right-padded
    assert not (loss_mask[row] & ~attention_mask[row]).any()


def test_sft_is_deterministic_keeps_input_and_shards(tok, cfg):
  examples = demo.format_examples(demo.CandidateTask(), 32, 0, feedback_fraction=0)
  params = demo.init_demo_params(cfg, jax.random.key(0))
  run = lambda mesh=None: sft.sft_train(cfg, params, tok, examples, steps=3, batch_size=8,
                                        lr=1e-3, seed=1, mesh=mesh)
  (p1, h1), (p2, h2) = run(), run()
  assert h1 == h2
  jax.tree.map(np.testing.assert_array_equal, p1, p2)
  assert set(h1[0]) == {"step", "loss", "token_accuracy", "grad_norm", "lr"}
  np.asarray(params["embed"])  # the caller's params were not donated
  mesh = sharding.make_mesh((2, 2, 2))
  p3, h3 = run(mesh)
  np.testing.assert_allclose([h["loss"] for h in h3], [h["loss"] for h in h1], rtol=1e-4)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4), p3, p1)


def test_sft_teaches_the_answer_format(tok, cfg):
  task = demo.CandidateTask(seed=0)
  examples = demo.format_examples(task, 512, np.random.default_rng(0))
  params = demo.init_demo_params(cfg, jax.random.key(0))
  params, history = sft.sft_train(cfg, params, tok, examples, steps=STEPS, batch_size=BATCH,
                                  lr=LR, seed=0)
  losses = [h["loss"] for h in history]
  assert np.mean(losses[-10:]) < 0.05 * losses[0], losses[::10]

  held_out = demo.CandidateTask(seed=1)
  rows = [held_out[i] for i in range(16)]
  texts = [prompts.multi_attempt_prompt(r["problem"], 1 + i % 5) if i % 4
           else prompts.single_turn_prompt(r["problem"]) for i, r in enumerate(rows)]
  tokens, mask = left_pad([tok.encode(t) for t in texts], tok.pad_id)
  out = Sampler(cfg, stop_ids=tok.stop_ids, pad_id=tok.pad_id).generate(
      params, tokens, mask, key=jax.random.key(0), max_new_tokens=16, sampling=GREEDY)
  good = 0
  for i, row in enumerate(rows):
    answer = extract_boxed(tok.decode(out.response_tokens(i)))
    good += answer is not None and answer in [str(c) for c in
                                              demo.candidates_of(row["problem"])]
  assert good >= 13, good  # >= 80% of 16
