"""The embedded CPU demo: a synthetic task, its tokenizer and a tiny model.

Outside the library: a config selects it with data.name="candidates" and an
empty model.path, and only the trainer layer (mars.trainer.policy) imports it.
"""
from mars.demo.model import INIT_STD, init_demo_params, tiny_model_config
from mars.demo.task import (RULES, SOURCE, CandidateTask, answer_text, candidates_of,
                            format_examples, problem_text)
from mars.demo.tokenizer import (BOXED_DIGIT_TOKENS, HINT_DIGIT_TOKENS, SPECIAL_TOKENS,
                                 TokenizerDirError, build_tokenizer, tokenizer_corpus)
