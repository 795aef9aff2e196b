"""Rollout engine: prefill + on-device decode loop, logprobs, forced tokens."""
from mars.sampling.decode import DecodeState
from mars.sampling.engine import SampleOutput, Sampler, compile_count
from mars.sampling.select import GREEDY, SamplingParams, filter_logits, select_tokens
