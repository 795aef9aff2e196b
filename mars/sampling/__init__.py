"""Rollout engine: paged KV cache, continuous batching, forced turns, logprobs."""
from mars.sampling.engine import Rollout, SampleOutput, Sampler, compile_count
from mars.sampling.select import GREEDY, SamplingParams, filter_logits, select_tokens
