"""Test-session settings shared by every test file."""

import os

import torch


def pytest_configure(config):
    # Under pytest-xdist each worker gets one core; more threads per worker only oversubscribe the machine.
    if os.environ.get("PYTEST_XDIST_WORKER"):
        torch.set_num_threads(1)
    torch.manual_seed(0)
