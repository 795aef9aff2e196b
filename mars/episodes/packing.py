"""Token surgery: ragged episode rows <-> the padded RolloutBatch layout.

Every producer (single-turn GRPO, multi-attempt episodes, LTE) describes its
rows as `Row`s: real prompt ids, then the response (model tokens and injected
feedback tokens, in order). `pack` lays them out as the RolloutBatch contract
says: prompts left-padded to end at one column, responses right-padded after
it, positions counting real tokens. Re-attaching an LTE response to its
unhinted prompt is just `dataclasses.replace(row, prompt=unhinted_ids)`.
"""
import dataclasses
import functools
from typing import List, Optional, Sequence

import numpy as np

from mars.batch import RolloutBatch
from mars.tokenizer import LENGTH_BUCKETS_PER_OCTAVE, bucket_length


@dataclasses.dataclass
class Row:
  prompt: np.ndarray                 # [p] int32 real prompt ids
  response: np.ndarray               # [r] int32 model + injected tokens, in order
  is_model: np.ndarray               # [r] bool: sampled by the policy (trained)
  behaviour_logp: np.ndarray         # [r] f32: sampling-time policy logp (0 on injected)
  reward: float = 0.0
  group_id: int = 0
  off_policy: bool = False
  truncated: bool = False
  # [r] f32: the sampler's logp (defaults to behaviour_logp). It stays when the
  # trainer rescores behaviour_logp (LTE), so ρ = trainer / sampler can be formed.
  sampler_logp: Optional[np.ndarray] = None

  @property
  def is_injected(self) -> np.ndarray:
    return ~self.is_model

  def __post_init__(self):
    self.prompt = np.asarray(self.prompt, np.int32)
    self.response = np.asarray(self.response, np.int32)
    self.is_model = np.asarray(self.is_model, bool)
    self.behaviour_logp = np.asarray(self.behaviour_logp, np.float32)
    self.sampler_logp = (self.behaviour_logp.copy() if self.sampler_logp is None
                         else np.asarray(self.sampler_logp, np.float32))
    if not (len(self.response) == len(self.is_model) == len(self.behaviour_logp)
            == len(self.sampler_logp)):
      raise ValueError("Row: response, is_model and behaviour_logp differ in length.")


def rows_from_output(out, prompt_mask: Optional[np.ndarray] = None) -> List[Row]:
  """Compacts a sampler output ([B, S] slot-aligned buffers) into Rows.

  Gaps (columns where a row was paused or rewound) are dropped: only sampled
  and forced tokens, in column order, form the response.
  """
  rows = []
  prompt_mask = out.prompt_mask if prompt_mask is None else prompt_mask
  for b in range(out.tokens.shape[0]):
    keep = out.gen_mask[b] | out.forced_mask[b]
    rows.append(Row(prompt=out.tokens[b][prompt_mask[b].astype(bool)],
                    response=out.tokens[b][keep], is_model=out.gen_mask[b][keep],
                    behaviour_logp=out.logp[b][keep], truncated=bool(out.truncated[b])))
  return rows


def total_length(prompt_len: int, response_len: int, min_bucket: int = 16) -> int:
  """The packed row length T for a prompt column P and longest response R."""
  return bucket_length(prompt_len + max(response_len, 1), min_bucket,
                       per_octave=LENGTH_BUCKETS_PER_OCTAVE)


def pack(rows: Sequence[Row], pad_id: int, prompt_len: Optional[int] = None,
         total_len: Optional[int] = None, min_bucket: int = 16) -> RolloutBatch:
  """Lays rows out as a host (numpy) RolloutBatch.

  Responses start at column P (default: the longest prompt, exactly: only the
  total length T is a compiled shape); T defaults to P + the longest
  response, rounded up to LENGTH_BUCKETS_PER_OCTAVE buckets.
  """
  if not rows:
    raise ValueError("pack: no rows.")
  P = prompt_len or max(len(r.prompt) for r in rows)
  R = max(len(r.response) for r in rows)
  T = total_len or total_length(P, R, min_bucket)
  if max(len(r.prompt) for r in rows) > P or P + R > T:
    raise ValueError(f"pack: rows need prompt {max(len(r.prompt) for r in rows)} and total "
                     f"{P + R}, more than the requested {P} / {T}.")
  B = len(rows)
  tokens = np.full((B, T), pad_id, np.int32)
  attn = np.zeros((B, T), bool)
  loss = np.zeros((B, T), bool)
  transparent = np.zeros((B, T), bool)
  blogp = np.zeros((B, T), np.float32)
  slogp = np.zeros((B, T), np.float32)
  for b, r in enumerate(rows):
    p, n = len(r.prompt), len(r.response)
    tokens[b, P - p:P] = r.prompt
    tokens[b, P:P + n] = r.response
    attn[b, P - p:P + n] = True
    loss[b, P:P + n] = r.is_model
    transparent[b, P:P + n] = ~r.is_model
    blogp[b, P:P + n] = np.where(r.is_model, r.behaviour_logp, 0.0)
    slogp[b, P:P + n] = np.where(r.is_model, r.sampler_logp, 0.0)
  positions = np.maximum(np.cumsum(attn, -1) - 1, 0).astype(np.int32)
  zeros = np.zeros((B, T), np.float32)
  return RolloutBatch(
      tokens=tokens, attention_mask=attn, positions=positions, loss_mask=loss,
      transparent_mask=transparent, behaviour_logp=blogp, old_logp=zeros,
      ref_logp=zeros.copy(), values=zeros.copy(),
      reward=np.asarray([r.reward for r in rows], np.float32),
      group_id=np.asarray([r.group_id for r in rows], np.int32),
      is_off_policy=np.asarray([r.off_policy for r in rows], bool),
      truncated=np.asarray([r.truncated for r in rows], bool),
      sampler_logp=slogp, policy_version=np.zeros((B,), np.int32))


@dataclasses.dataclass
class EpisodeResult:
  """What every rollout producer hands the trainer.

  rows: the ragged rows, meta: one dict per row (problem id, attempts used,
  success attempt, extracted answers, grades, hinted prompt, ...), metrics:
  scalars to log (success@k, all-fail fraction, ...), pad_id: for packing.
  `batch` is `pack(rows)`, made on first use: producers and the trainer's
  reshaping steps (dynamic sampling, overlong shaping) work on rows, and the
  trainer packs once per step (mars.trainer.update_phase.to_device_batch).
  """
  rows: List[Row]
  meta: List[dict]
  metrics: dict
  pad_id: int

  @functools.cached_property
  def batch(self) -> RolloutBatch:
    return pack(self.rows, self.pad_id)
