from pathlib import Path

import pytest
import torch

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return FIXTURES


@pytest.fixture
def release_fixture() -> dict:
    """A reduced-size model built by the release, with its input and the outputs it computed."""
    return torch.load(FIXTURES / "official_refiner_tiny.pt", weights_only=True)
