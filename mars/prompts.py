"""Every prompt template mars uses, as small pure functions returning text.

All renderings use Qwen's ChatML layout, byte-for-byte what the Qwen2.5-Math
tokenizer's `apply_chat_template` produces for system/user/assistant turns
(tests/test_prompts.py checks this against the real tokenizer):

  <|im_start|>{role}\n{content}<|im_end|>\n ... <|im_start|>assistant\n

Templates:
  * single-turn (both papers' baseline): system = SINGLE_TURN_SYSTEM, user = problem.
  * multi-attempt ("Learning from Failures in Multi-Attempt RL"): the system turn
    announces N attempts; after a wrong attempt a *system* turn with
    `feedback_message(n)` is injected into the running transcript
    (`feedback_turn`), and the model continues in a fresh assistant turn.
  * LTE ("Learning to Reason from Trial and Error"): Concise / Hint / ConciseHint
    extend the single-turn prompt with a note appended to the user turn. The
    paper gives the idea, not the wording; the wording below is ours.
"""
from collections.abc import Sequence

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"

SINGLE_TURN_SYSTEM = (
    "Please reason step by step, and put your final answer within \\boxed{}.")


def multi_attempt_system(n: int) -> str:
  """System prompt announcing `n` attempts (the paper's wording)."""
  return (f"{SINGLE_TURN_SYSTEM} You have {n} attempts to answer the questions, "
          "and you should provide the full reasoning steps in each attempt.")


def feedback_message(n: int) -> str:
  """Feedback after a wrong attempt; `n` = attempts still left.

  Kept literally as in the paper, so n=1 reads "You have 1 attempts left." —
  the model was trained on this exact string, so we do not fix the grammar.
  """
  return (f"Your answer is incorrect. You have {n} attempts left. "
          "Try an alternative.")


def render_chat(messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
  """Renders messages like the Qwen2.5(-Math) chat template (no tool calls).

  As in the real template, a conversation that does not start with a system
  turn gets the default system prompt (SINGLE_TURN_SYSTEM for Qwen2.5-Math).
  """
  parts = []
  if not messages or messages[0]["role"] != "system":
    parts.append(_turn("system", SINGLE_TURN_SYSTEM))
  for message in messages:
    parts.append(_turn(message["role"], message["content"]))
  if add_generation_prompt:
    parts.append(f"{IM_START}assistant\n")
  return "".join(parts)


def _turn(role: str, content: str) -> str:
  return f"{IM_START}{role}\n{content}{IM_END}\n"


def single_turn_prompt(problem: str) -> str:
  return render_chat([{"role": "system", "content": SINGLE_TURN_SYSTEM},
                      {"role": "user", "content": problem}])


def multi_attempt_prompt(problem: str, n: int) -> str:
  return render_chat([{"role": "system", "content": multi_attempt_system(n)},
                      {"role": "user", "content": problem}])


def feedback_turn(n: int, close_assistant: bool) -> str:
  """Text forced into a running episode after a wrong attempt.

  Args:
    n: attempts left after this one.
    close_assistant: True when the attempt ended mid-turn at a complete
      \\boxed{} (the assistant turn is still open, so we close it); False when
      the model already emitted <|im_end|> itself (we only add the newline the
      chat template puts after it).
  """
  prefix = f"{IM_END}\n" if close_assistant else "\n"
  return prefix + _turn("system", feedback_message(n)) + f"{IM_START}assistant\n"


# ---- LTE's notes, appended to the problem (mars.episodes.hints builds the hinted prompts).

CONCISE_NOTE = (
    "Note: previous attempts at this problem ran out of space before reaching "
    "a final answer. Reason concisely and reach your final answer quickly.")

HINT_NOTE = (
    "Hint: the following answers have been tried and are incorrect: {answers}. "
    "Do not mention or rely on these hints in your solution.")

CONCISE_HINT_NOTE = (
    "Note: some previous attempts at this problem ran out of space before "
    "reaching a final answer, so reason concisely. Hint: the following answers "
    "have been tried and are incorrect: {answers}. Do not mention or rely on "
    "these hints in your solution.")


def format_wrong_answers(wrong_answers: Sequence[str]) -> str:
  """`$a1$, $a2$, ...`: each answer as inline math, in the given order."""
  return ", ".join(f"${answer}$" for answer in wrong_answers)
