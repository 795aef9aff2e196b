"""Tokenizer helper: load an HF tokenizer, encode chat text, left-pad batches.

Chat *rendering* (the exact Qwen ChatML strings) lives in `mars.prompts`; this
module turns text into padded id arrays. Prompt lengths are bucketed to powers
of two so a training run compiles a handful of shapes, not one per step.
"""
import os
from typing import Optional, Sequence

import numpy as np

IM_END = "<|im_end|>"
ENDOFTEXT = "<|endoftext|>"


# Finer than powers of two for the lengths that set compiled shapes (packed
# rows, multi-attempt prompts and KV caches): the update and logprob passes
# and each decode step cost more than linearly in the length (attention). On
# the demo, a logprob pass took 0.69 s at the power-of-two 256 and 0.32 s at
# 160, and a 6-token decode chunk 104 ms with a 256-slot cache and 72 ms with
# 192 (2 CPU cores, measured). Four lengths per octave waste at most 25% on
# padding, for at most 4x the compiled shapes of powers of two.
LENGTH_BUCKETS_PER_OCTAVE = 4


def bucket_length(n: int, minimum: int = 16, multiple: Optional[int] = None,
                  per_octave: int = 1) -> int:
  """Smallest bucket ≥ n (≥ minimum): a power of two, or with per_octave=s one of
  s evenly spaced lengths per octave (s=4: 128, 160, 192, 224, 256, ...); or
  n rounded up to `multiple` if given."""
  if multiple:
    return max(minimum, -(-n // multiple) * multiple)
  b = minimum
  while b < n:
    b *= 2
  if per_octave > 1 and b > minimum:
    low = b // 2
    step = max(1, low // per_octave)
    b = low + -(-(n - low) // step) * step
  return b


class Tokenizer:
  """Thin wrapper over an HF tokenizer with the ids mars needs."""

  def __init__(self, hf_tokenizer):
    self.hf = hf_tokenizer
    vocab = hf_tokenizer.get_vocab()
    self.stop_ids = tuple(sorted({vocab[t] for t in (IM_END, ENDOFTEXT) if t in vocab}))
    if not self.stop_ids:
      raise ValueError("Tokenizer has neither <|im_end|> nor <|endoftext|>; not a Qwen chat tokenizer.")
    self.im_end_id = vocab.get(IM_END, self.stop_ids[0])
    pad = hf_tokenizer.pad_token_id
    self.pad_id = pad if pad is not None else vocab.get(ENDOFTEXT, self.stop_ids[0])

  @property
  def vocab_size(self) -> int:
    return len(self.hf)

  def encode(self, text: str) -> list:
    return self.hf.encode(text, add_special_tokens=False)

  def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
    return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

  def encode_batch(self, texts: Sequence[str]) -> list:
    return [list(ids) for ids in self.hf(list(texts), add_special_tokens=False)["input_ids"]]


def load_tokenizer(path: str) -> Tokenizer:
  """Loads a tokenizer from a local HF directory (offline) or a hub id."""
  from transformers import AutoTokenizer
  if not os.path.isdir(path) and path.startswith(("/", ".")):
    raise FileNotFoundError(f"Tokenizer directory {path} does not exist.")
  return Tokenizer(AutoTokenizer.from_pretrained(path))


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int, length: Optional[int] = None,
             bucket: bool = True, min_length: int = 16):
  """Left-pads id lists to one length → (tokens int32 [B, T], mask bool [B, T]).

  Left padding puts every prompt's last token in the same column, so a batch
  can start decoding in lockstep from one shared cache index.
  """
  if not sequences:
    raise ValueError("left_pad: empty batch.")
  lengths = [len(s) for s in sequences]
  if min(lengths) == 0:
    raise ValueError(f"left_pad: row {lengths.index(0)} is an empty prompt.")
  longest = max(lengths)
  if length is None:
    length = bucket_length(longest, min_length) if bucket else longest
  if longest > length:
    raise ValueError(f"left_pad: a prompt of {longest} tokens exceeds the length {length}.")
  tokens = np.full((len(sequences), length), pad_id, np.int32)
  mask = np.zeros((len(sequences), length), bool)
  for i, s in enumerate(sequences):
    tokens[i, length - len(s):] = s
    mask[i, length - len(s):] = True
  return tokens, mask
