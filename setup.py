"""Installs conadv_jax: `pip install -e '.[test]'`."""
import setuptools

setuptools.setup(
    name="conadv_jax",
    version="0.1.0",
    description=("Concurrent Adversarial Learning (ConAdv, ICLR 2022) for "
                 "large-batch training in JAX/Flax."),
    packages=setuptools.find_packages(include=["conadv_jax", "conadv_jax.*"]),
    python_requires=">=3.11",
    install_requires=[
        "absl-py>=2.1,<3",
        "clu>=0.0.12,<0.1",
        "etils[epath]>=1.7",
        "importlib_resources>=6",  # TFDS builders need it; etils no longer pulls it in.
        "flax>=0.10,<0.13",
        "jax>=0.6,<0.13",
        "ml-collections>=1.0,<2",
        "numpy>=1.26,<3",
        "optax>=0.2.4,<0.3",
        "orbax-checkpoint>=0.11,<0.13",
        "tensorboard>=2.16,<3",
        # Only the tf.data / TFDS input side needs TensorFlow; the CPU build is enough.
        "tensorflow-cpu>=2.16,<2.22; platform_machine=='x86_64'",
        "tensorflow>=2.16,<2.22; platform_machine!='x86_64'",
        "tensorflow-datasets>=4.9.6,<5",
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-xdist>=3.5", "Pillow>=10",
                 "matplotlib>=3.8,<4"],
    },
)
