import json

import pytest
import torch

import lorex
from lorex.backbones import build_backbone, preset_config
from lorex.errors import LorexError
from lorex.models import LorexModel, load_model, save_model


def _model(seed=0, tasks=("digits/mnist",)):
    torch.manual_seed(seed)
    cfg = preset_config("vit-micro")
    model = LorexModel(build_backbone(cfg), cfg)
    for t in tasks:
        model.add_head(t, [str(i) for i in range(10)])
        torch.nn.init.normal_(model.heads[model.active_head].weight)
    return model.eval()


def test_full_round_trip(tmp_path):
    model = _model(tasks=("digits/mnist", "digits/syn"))
    save_model(model, tmp_path / "m", made_by={"command": "test"}, seed=7)
    back = lorex.load_model(tmp_path / "m")
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(back(x), model(x), rtol=0, atol=0)
    torch.testing.assert_close(back.backbone(x), model.backbone(x), rtol=0, atol=0)
    assert back.tasks == ["digits/mnist", "digits/syn"] and back.active_head == "digits_syn"
    assert not back.training
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["lorex_version"] == lorex.__version__ and config["seed"] == 7
    assert not list(tmp_path.glob(".*partial"))  # no temporary directory left behind


def test_delta_model_needs_and_checks_its_base(tmp_path):
    base = _model(tasks=())
    save_model(base, tmp_path / "base")
    expert = load_model(tmp_path / "base")
    expert.add_head("t", ["a", "b"])
    torch.nn.init.normal_(expert.heads["t"].weight)
    save_model(expert, tmp_path / "experts" / "e", weights="delta", base_dir=tmp_path / "base")
    on_disk = lorex.io.load_tensors(tmp_path / "experts" / "e" / "model.safetensors")
    assert set(on_disk) == {"heads.t.weight", "heads.t.bias"}  # only what the base lacks
    x = torch.rand(3, 3, 32, 32)
    torch.testing.assert_close(load_model(tmp_path / "experts" / "e")(x), expert(x))
    # The tree moves as a whole: the base path is relative.
    (tmp_path / "moved").mkdir()
    (tmp_path / "base").rename(tmp_path / "moved" / "base")
    (tmp_path / "experts").rename(tmp_path / "moved" / "experts")
    torch.testing.assert_close(load_model(tmp_path / "moved" / "experts" / "e")(x), expert(x))
    # A changed base is refused, not silently used.
    save_model(_model(seed=1, tasks=()), tmp_path / "moved" / "base")
    with pytest.raises(LorexError, match="hash mismatch"):
        load_model(tmp_path / "moved" / "experts" / "e")


def test_bad_model_directories(tmp_path):
    with pytest.raises(LorexError, match="model directory not found"):
        load_model(tmp_path / "missing")
    save_model(_model(), tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(LorexError, match="not a valid safetensors file"):
        load_model(tmp_path / "m")
    save_model(_model(), tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["hedas"] = config.pop("heads")
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(LorexError, match="unknown field 'hedas'; did you mean 'heads'"):
        load_model(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text("{not json")
    with pytest.raises(LorexError, match="not valid JSON"):
        load_model(tmp_path / "m")


def test_nan_weights_are_refused(tmp_path):
    model = _model()
    with torch.no_grad():
        model.backbone.norm.weight[0] = float("nan")
    save_model(model, tmp_path / "m")
    with pytest.raises(LorexError, match="NaN or Inf"):
        load_model(tmp_path / "m")


def test_failed_save_keeps_the_previous_model(tmp_path, monkeypatch):
    save_model(_model(seed=0), tmp_path / "m")
    before = (tmp_path / "m" / "model.safetensors").read_bytes()

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("lorex.models.store.write_json", fail)
    with pytest.raises(OSError):
        save_model(_model(seed=1), tmp_path / "m")
    assert (tmp_path / "m" / "model.safetensors").read_bytes() == before
    assert not list(tmp_path.glob(".*partial"))


def test_wrong_input_size_is_a_clear_error():
    with pytest.raises(LorexError, match=r"expected \(B, 3, 32, 32\)"):
        _model()(torch.rand(1, 3, 28, 28))


def test_outputs_get_ordinary_permissions(tmp_path):
    import os
    import stat

    save_model(_model(), tmp_path / "m")
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE((tmp_path / "m").stat().st_mode) == 0o777 & ~mask
    assert stat.S_IMODE((tmp_path / "m" / "config.json").stat().st_mode) == 0o666 & ~mask


def test_the_store_asks_every_adapter_kind(tmp_path, monkeypatch):
    """A new adapter kind is one ``AdapterKind`` in the tuple: the store describes, saves,
    checks, rebuilds and loads it without knowing its name."""
    from lorex.models import kinds, store

    calls = []

    class Note(kinds.AdapterKind):
        field = "note"

        def describe(self, model):
            return getattr(model, "note", None)

        def rebuild(self, model, entry, source):
            model.note = entry

        def save(self, model, folder, base):
            (folder / "note.txt").write_text(model.note["text"])
            calls.append("save")

        def load(self, model, folder, entry):
            calls.append(("load", (folder / "note.txt").read_text()))

    monkeypatch.setattr(store, "ADAPTER_KINDS", (*kinds.ADAPTER_KINDS, Note()))
    monkeypatch.setattr(store, "OPTIONAL_FIELDS", store.OPTIONAL_FIELDS | {"note"})
    model = _model()
    model.note = {"text": "hello"}
    save_model(model, tmp_path / "m", seed=1)
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["note"] == {"text": "hello"} and list(config)[-2:] == ["note", "seed"]
    back = load_model(tmp_path / "m")
    assert back.note == {"text": "hello"} and calls == ["save", ("load", "hello")]
