"""llmjax: a JAX/Flax, TPU-first stack to pretrain and fine-tune Transformer LMs."""
from setuptools import find_packages, setup

TEST = ["pytest>=8", "pytest-xdist>=3",
        # tests/test_launch.py checks rendered GKE manifests against Kubernetes' models and a
        # JSON schema of the JobSet fields used.
        # (kubernetes 37's models are pydantic: unknown fields and wrong types fail).
        "kubernetes>=37", "jsonschema>=4"]
HF = ["torch==2.13.0", "transformers>=4.50", "peft", "gguf", "tokenizers"]

setup(
    name="llmjax",
    version="0.1.0",
    description="JAX/Flax TPU-first pretraining and fine-tuning of Transformer language models",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["llmjax", "llmjax.*"]),
    package_data={"llmjax": ["py.typed"]},
    install_requires=[
        # Lowest versions the test suite passes on (jax 0.9.2 .. 0.12.0.1 tested; jax 0.8's
        # XLA:CPU cannot run the bf16 kernels' dots).
        "jax>=0.9",
        "flax>=0.12",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11",
        "tensorflow-datasets>=4.9.8",
        "sentencepiece>=0.2",
        "numpy",
        "pyyaml",
        "tqdm",
        "tensorboardX",
        "safetensors",
        # `llmjax plot` and the curves.png a run writes at its end: part of every run, so a
        # requirement rather than an extra (wheels on every platform; no GUI: Agg backend).
        "matplotlib>=3.7",
    ],
    extras_require={
        "test": TEST,
        "hf": HF,
        "tf": ["tensorflow-cpu"],
        # The TensorBoard UI for the event files every run writes (tensorboardX writes them).
        "tensorboard": ["tensorboard"],
        "tpu": ["jax[tpu]"],
        "gpu": ["jax[cuda12]"],
        # lm-evaluation-harness backend (`llmjax eval-tasks`); pulls datasets, pandas, sklearn.
        "eval": ["lm_eval>=0.4.13"],
    },
    entry_points={"console_scripts": ["llmjax=llmjax.cli:main"]},
)
