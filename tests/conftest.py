"""Shared fixtures. Device-count and XLA settings belong here (or in subprocess environments), never
in library modules."""

import jax
import numpy as np
import pytest

import graphduo
from graphduo.cli import apply_process_settings

# The suite runs what users run: the CLI's default process settings, applied as an entry point does
# (before any JAX computation) and recorded for the tests that read them.
PROCESS_SETTINGS = apply_process_settings()

# Four virtual CPU devices, so data-parallel code is tested without accelerators. Set before any
# test touches a JAX backend; single-device tests use the first.
NUM_DEVICES = 4
jax.config.update("jax_num_cpu_devices", NUM_DEVICES)


@pytest.fixture(scope="session")
def digits():
    return graphduo.load_dataset("digits")


@pytest.fixture
def tiny_batch():
    """A fixed 8-example batch of 8x8x1 images, as the digits data set has."""
    rng = np.random.default_rng(0)
    return {"image": rng.normal(size=(8, 8, 8, 1)).astype(np.float32),
            "label": rng.integers(0, 10, size=8).astype(np.int32)}


def tree_allclose(a, b, *, rtol, atol) -> bool:
    leaves = jax.tree.leaves(jax.tree.map(lambda x, y: np.allclose(x, y, rtol=rtol, atol=atol), a, b))
    return all(leaves)
