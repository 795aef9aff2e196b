"""Prompt templates: literal strings, and parity with the real Qwen chat template."""
import os
import pathlib

import pytest

from mars import prompts
from mars.episodes import hints

SHARED = pathlib.Path(os.environ.get(
    "MARS_SHARED_DIR", pathlib.Path(__file__).resolve().parents[1].parent / "shared"))
QWEN_MATH_DIR = SHARED / "models" / "qwen2.5-math-1.5b"

SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."
PROBLEM = "What is $1+1$?"


@pytest.fixture(scope="module")
def tokenizer():
  transformers = pytest.importorskip("transformers")
  if not QWEN_MATH_DIR.exists():
    pytest.fail(f"tokenizer files not found at {QWEN_MATH_DIR}; set MARS_SHARED_DIR")
  return transformers.AutoTokenizer.from_pretrained(str(QWEN_MATH_DIR))


def test_single_turn_literal():
  assert prompts.SINGLE_TURN_SYSTEM == SYSTEM
  assert prompts.single_turn_prompt(PROBLEM) == (
      "<|im_start|>system\n"
      "Please reason step by step, and put your final answer within \\boxed{}.<|im_end|>\n"
      "<|im_start|>user\nWhat is $1+1$?<|im_end|>\n"
      "<|im_start|>assistant\n")


def test_multi_attempt_literal():
  assert prompts.multi_attempt_system(3) == (
      "Please reason step by step, and put your final answer within \\boxed{}. "
      "You have 3 attempts to answer the questions, and you should provide the full "
      "reasoning steps in each attempt.")
  assert prompts.multi_attempt_prompt(PROBLEM, 5) == (
      "<|im_start|>system\n"
      "Please reason step by step, and put your final answer within \\boxed{}. "
      "You have 5 attempts to answer the questions, and you should provide the full "
      "reasoning steps in each attempt.<|im_end|>\n"
      "<|im_start|>user\nWhat is $1+1$?<|im_end|>\n"
      "<|im_start|>assistant\n")


def test_feedback_literal():
  assert prompts.feedback_message(2) == (
      "Your answer is incorrect. You have 2 attempts left. Try an alternative.")
  # The paper's wording is kept even where it is ungrammatical.
  assert prompts.feedback_message(1) == (
      "Your answer is incorrect. You have 1 attempts left. Try an alternative.")
  assert prompts.feedback_turn(2, close_assistant=True) == (
      "<|im_end|>\n"
      "<|im_start|>system\n"
      "Your answer is incorrect. You have 2 attempts left. Try an alternative.<|im_end|>\n"
      "<|im_start|>assistant\n")
  assert prompts.feedback_turn(1, close_assistant=False) == (
      "\n<|im_start|>system\n"
      "Your answer is incorrect. You have 1 attempts left. Try an alternative.<|im_end|>\n"
      "<|im_start|>assistant\n")


def test_lte_literals():
  base = ("<|im_start|>system\n"
          "Please reason step by step, and put your final answer within \\boxed{}.<|im_end|>\n"
          "<|im_start|>user\nWhat is $1+1$?\n\n")
  end = "<|im_end|>\n<|im_start|>assistant\n"
  assert hints.hinted_prompt(PROBLEM, hints.OVERLONG_ALL, []) == base + (
      "Note: previous attempts at this problem ran out of space before reaching a "
      "final answer. Reason concisely and reach your final answer quickly.") + end
  assert hints.hinted_prompt(PROBLEM, hints.PASS_NONE, ["3", "\\frac{1}{2}"]) == base + (
      "Hint: the following answers have been tried and are incorrect: $3$, "
      "$\\frac{1}{2}$. Do not mention or rely on these hints in your solution.") + end
  assert hints.hinted_prompt(PROBLEM, hints.OVERLONG_SOME, ["3"]) == base + (
      "Note: some previous attempts at this problem ran out of space before reaching "
      "a final answer, so reason concisely. Hint: the following answers have been "
      "tried and are incorrect: $3$. Do not mention or rely on these hints in your "
      "solution.") + end


def test_lte_templates_extend_single_turn_prompt():
  prefix = prompts.single_turn_prompt(PROBLEM)[:-len("<|im_end|>\n<|im_start|>assistant\n")]
  for text in (hints.hinted_prompt(PROBLEM, hints.OVERLONG_ALL, []), hints.hinted_prompt(PROBLEM, hints.PASS_NONE, ["7"]),
               hints.hinted_prompt(PROBLEM, hints.OVERLONG_SOME, ["7"])):
    assert text.startswith(prefix + "\n\n")
    assert text.endswith("<|im_end|>\n<|im_start|>assistant\n")


def test_hint_without_wrong_answers_is_unhinted():
  assert hints.hinted_prompt(PROBLEM, hints.PASS_NONE, []) == prompts.single_turn_prompt(PROBLEM)
  assert hints.hinted_prompt(PROBLEM, hints.OVERLONG_SOME, []) == hints.hinted_prompt(PROBLEM, hints.OVERLONG_ALL, [])


def test_render_chat_default_system_and_no_generation_prompt():
  assert prompts.render_chat([{"role": "user", "content": "hi"}],
                             add_generation_prompt=False) == (
      f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n")


CONVERSATIONS = [
    [{"role": "system", "content": SYSTEM}, {"role": "user", "content": PROBLEM}],
    [{"role": "user", "content": PROBLEM}],  # template inserts the default system turn
    [{"role": "system", "content": prompts.multi_attempt_system(4)},
     {"role": "user", "content": "Find $x$ if $2x = 6$.\n\nUse $\\frac{a}{b}$."}],
    [{"role": "system", "content": "custom"}, {"role": "user", "content": "ünïcödé ∑ 中文"},
     {"role": "assistant", "content": "The answer is \\boxed{2}."},
     {"role": "system", "content": prompts.feedback_message(2)}],
]


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_render_chat_matches_tokenizer(tokenizer, messages, add_generation_prompt):
  expected = tokenizer.apply_chat_template(
      messages, tokenize=False, add_generation_prompt=add_generation_prompt)
  assert prompts.render_chat(messages, add_generation_prompt) == expected


@pytest.mark.parametrize("problem", [PROBLEM, "Let $f(x) = x^2$.\nFind $f(3)$."])
def test_prompts_match_tokenizer(tokenizer, problem):
  def chat(system, user):
    return tokenizer.apply_chat_template(
        [{"role": "system", "content": system}, {"role": "user", "content": user}],
        tokenize=False, add_generation_prompt=True)
  assert prompts.single_turn_prompt(problem) == chat(SYSTEM, problem)
  assert prompts.multi_attempt_prompt(problem, 3) == chat(prompts.multi_attempt_system(3), problem)


@pytest.mark.parametrize("close_assistant", [True, False])
def test_feedback_injection_matches_full_transcript(tokenizer, close_assistant):
  """prompt + attempt + injected feedback == the chat template of the whole dialogue."""
  attempt = "2x = 6, so x = \\boxed{4}"
  transcript = prompts.multi_attempt_prompt(PROBLEM, 3) + attempt
  if not close_assistant:
    transcript += "<|im_end|>"  # the model ended its turn itself
  transcript += prompts.feedback_turn(2, close_assistant=close_assistant)
  expected = tokenizer.apply_chat_template(
      [{"role": "system", "content": prompts.multi_attempt_system(3)},
       {"role": "user", "content": PROBLEM},
       {"role": "assistant", "content": attempt},
       {"role": "system", "content": prompts.feedback_message(2)}],
      tokenize=False, add_generation_prompt=True)
  assert transcript == expected
