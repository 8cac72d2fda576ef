import pytest


@pytest.fixture(scope="session")
def tiny_assets():
    """The tiny model and data (created once, atomically, by the asset recipe)."""
    from gpart_ds import assets

    return assets.ensure("tiny")
