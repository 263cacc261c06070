"""diffmic-jax: DiffMIC (dual-guidance diffusion for medical image classification) in JAX/Flax."""

import setuptools

setuptools.setup(
    name="diffmic-jax",
    version="0.1.0",
    description="DiffMIC (Yang et al., MICCAI 2023) reimplemented in JAX/Flax Linen.",
    # configs/ too: configs import each other (`from configs import default`), and a copy of
    # one anywhere resolves them from the installed package.
    packages=setuptools.find_packages(include=["diffmic_jax", "diffmic_jax.*", "configs"]),
    # The CPU handler of diffusion.sampler_weights='bfloat16', compiled on first use.
    package_data={"diffmic_jax.nn": ["*.cc"]},
    python_requires=">=3.11",
    install_requires=[
        "jax>=0.10.2",
        "flax>=0.12.8,<0.13",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12.8,<0.13",
        "tensorflow-datasets>=4.9.10",
        # tfds custom builders import it but only declare it for Python < 3.9.
        "importlib_resources",
        # Image decoding for the dataset builders; tfds encodes without TensorFlow through it.
        "pillow>=10",
        "grain>=0.2.18,<0.3",
        "numpy>=2.0",
        "ml-collections>=1.1",
        "absl-py",
        # Classification metrics (F1, kappa, AUC) and the confusion-matrix plot.
        "scikit-learn>=1.3",
        # softmax of logits on the host (predict, explanations); installed with scikit-learn.
        "scipy>=1.10",
        "matplotlib>=3.7",
        # Progress bar with ETA during training.
        "tqdm",
        # TensorBoard event files (DIR/tensorboard/) without TensorFlow.
        "tensorboardX>=2.6",
    ],
    extras_require={
        # pytest-xdist: pytest.ini runs the tests in two processes.
        "test": ["pytest>=8", "pytest-xdist>=3.5"],
        "cuda": ["jax[cuda12]>=0.10.2"],
        # Optional: weight conversion from .pth / .safetensors files (tests skip without them).
        "torch": ["torch==2.13.0", "safetensors"],
    },
)
