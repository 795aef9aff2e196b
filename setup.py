"""mars: RL post-training of reasoning LLMs that learn from their own failures."""
import setuptools

# The jax mars is tested with; the "tpu" extra pins libtpu's jax to it.
JAX_VERSION = "0.10.2"

setuptools.setup(
    name="mars",
    version="0.1.0",
    description="JAX/Flax RL post-training: multi-attempt PPO and LTE/GRPO for Qwen models.",
    packages=setuptools.find_packages(include=["mars", "mars.*"]),
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.4.35",
        "flax>=0.10",
        "optax>=0.2.3",
        "orbax-checkpoint>=0.6",
        "transformers>=5.0",
        "safetensors>=0.4",
        "ml_dtypes>=0.4",
        "tensorflow-datasets>=4.9.7",
        "array-record>=0.5",
        "importlib_resources",
        "math-verify[antlr4-13-2]>=0.7",
        "ml-collections>=0.1.1",
        "absl-py",
        "etils[epath]",
        "tqdm",
        "tensorboardX",
        "matplotlib",
        "numpy",
    ],
    extras_require={
        # torch is only the HF reference in tests/benchmarks; the CPU build is on disk.
        # libtpu for mars.plan's TPU topologies (AOT compiles, no TPU needed); libtpu
        # must match jaxlib, hence the same jax version.
        "tpu": [f"jax[tpu]=={JAX_VERSION}"],
        "test": ["torch==2.13.0", "pytest>=8", "scipy", "pytest-xdist", "nbclient", "nbformat", "ipykernel"],
    },
)
