import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def lorex_cache(tmp_path_factory):
    """One generated-data cache per test session, never the user's own cache."""
    path = tmp_path_factory.mktemp("lorex-cache")
    old = os.environ.get("LOREX_CACHE_DIR")
    os.environ["LOREX_CACHE_DIR"] = str(path)
    yield path
    if old is None:
        os.environ.pop("LOREX_CACHE_DIR", None)
    else:
        os.environ["LOREX_CACHE_DIR"] = old


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory):
    """A vit-micro base pretrained for one short epoch on 300 MNIST images."""
    from lorex.training.config import TrainConfig
    from lorex.training.expert_jobs import pretrain

    out = tmp_path_factory.mktemp("models") / "base"
    pretrain(
        "vit-micro", out, TrainConfig(epochs=1, max_samples=300, batch_size=64), data="digits/mnist"
    )
    return out


class StopAfter(Exception):
    """Stands in for a kill: raised right after the n-th checkpoint is on disk."""


@pytest.fixture
def stop_after_saves(monkeypatch):
    """``stop(n)``: the n-th checkpoint save of any training loop raises ``StopAfter`` once it
    is written, so a test can stop a run at a chosen step and resume it."""
    from lorex.training.checkpoint import Checkpointer

    original = Checkpointer.save

    def stop(n: int) -> type[StopAfter]:
        count = {"saves": 0}

        def save(self, *args, **kwargs):
            original(self, *args, **kwargs)
            count["saves"] += 1
            if count["saves"] == n:
                monkeypatch.setattr(Checkpointer, "save", original)
                raise StopAfter

        monkeypatch.setattr(Checkpointer, "save", save)
        return StopAfter

    return stop
