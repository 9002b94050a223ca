"""bigvl: sharded JAX/Flax training of vision-language and label-efficient vision models."""

from setuptools import find_packages, setup

setup(
    name="bigvl",
    version="0.1.0",
    description="One sharded JAX/Flax codebase for SigLIP/FFF, LVLM fine-tuning, CLIP-DPO, "
                "semi-supervised, domain adaptation, segmentation and few-shot methods.",
    packages=find_packages(include=["bigvl", "bigvl.*"]),
    package_data={"bigvl.data": ["*.json"]},
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.10",
        "flax>=0.12",
        "optax>=0.2.6",
        "orbax-checkpoint>=0.12",
        "ml_collections>=1.0",
        "einops>=0.8",
        "tensorflow-datasets>=4.9.10",
        "tensorflow-cpu>=2.20",  # only to prepare TFDS builders; reading is TF-free
        "grain>=0.2.18",
        "array_record>=0.8",
        "tokenizers>=0.20",
        "tensorboardX>=2.6",
        "tqdm>=4.60",  # progress bars of the tools (CLIP-DPO generation and ranking)
        "pillow>=10",
        "absl-py>=2.0",
        "mlxtend>=0.23",
        "matplotlib>=3.7",  # training curves and evaluation figures (bigvl/plots.py)
        "pandas>=2",  # the evaluation notebook's tables
        "scikit-learn>=1.4",
        "scipy>=1.10",  # Hungarian matching of unsupervised segmentation clusters
        "ott-jax>=0.6",  # Sinkhorn of U-LFA (bigvl/tasks/lfa.py)
        "safetensors>=0.4",
        "importlib_resources",  # tfds needs it for builders defined outside tfds
    ],
    extras_require={
        # torch (CPU) + transformers: the checkpoint parity tests build tiny public models
        # nbclient + nbformat + ipykernel: the notebook test executes notebooks/evaluate.ipynb
        "test": ["pytest>=8", "pytest-xdist>=3.6", "ruff>=0.6", "torch==2.13.0",
                 "transformers>=5.0", "nbclient>=0.10", "nbformat>=5.9", "ipykernel>=6.29"],
        "tpu": ["jax[tpu]"],
        "cuda": ["jax[cuda12]"],
    },
)
