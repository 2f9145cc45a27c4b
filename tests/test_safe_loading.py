"""Untrusted files are data, never code: pickles are refused, configs are JSON, images are capped.

Every entry point that takes weights is fed a pickle whose unpickling would run code (it writes a
marker file); each refuses it in one line naming the file, exit status 2, and the marker never
appears. A static scan of the lorex source keeps unsafe loaders out for good. Images whose header
declares too many pixels are refused before any decoding, through every reader of user images.
"""

from __future__ import annotations

import ast
import builtins
import io
import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import lorex
import lorex.data.images
from lorex.adapters import lora
from lorex.backbones.vit import VisionTransformer, ViTConfig
from lorex.cli import main
from lorex.models import LorexModel, save_model
from lorex.models.store import file_sha256

TINY = dict(type="vit", img_size=16, patch_size=8, embed_dim=8, depth=1, num_heads=2)
ROOT = Path(__file__).resolve().parents[1]


def run(capsys, *argv) -> tuple[int, str, str]:
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_refused(code: int, err: str, command: str, *names: Path | str) -> str:
    """Exit status 2 and exactly one stderr line, ``lorex CMD: error: ...`` naming each path."""
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1, err
    assert lines[0].startswith(f"lorex {command}: error: "), err
    for name in names:
        assert str(name) in lines[0], err
    return lines[0]


# --- malicious pickles -------------------------------------------------------------------------
class _Exec:
    """Unpickling calls ``exec`` with code that writes the marker file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (builtins.exec, (f"open({self.marker!r}, 'w').write('pwned')",))


class _System:
    """Unpickling runs a shell command that creates the marker file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


def evil_bytes(marker: Path, kind: str = "exec", fmt: str = "zip") -> bytes:
    """A pickle (``fmt="pickle"``: plain ``pickle.dumps``; ``"zip"``: ``torch.save``'s format)
    whose loading runs code."""
    payload = (_Exec if kind == "exec" else _System)(marker)
    if fmt == "pickle":
        return pickle.dumps(payload, protocol=4)
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return buffer.getvalue()


@pytest.mark.parametrize("kind", ["exec", "system"])
@pytest.mark.parametrize("fmt", ["pickle", "zip"])
def test_the_payloads_do_run_code_when_loaded_unsafely(tmp_path, kind, fmt):
    """The control: these files really are exploits, so the refusals below mean something."""
    marker = tmp_path / "MARKER"
    path = tmp_path / "evil.pth"
    path.write_bytes(evil_bytes(marker, kind, fmt))
    if fmt == "pickle":
        pickle.loads(path.read_bytes())
    else:
        torch.load(path, weights_only=False)
    assert marker.exists()


def _fresh(config: dict = TINY) -> LorexModel:
    return LorexModel(VisionTransformer(ViTConfig.from_dict(config)), config)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """A tiny base, two full experts and one LoRA expert, all genuine."""
    root = tmp_path_factory.mktemp("zoo")
    torch.manual_seed(0)
    base = _fresh()
    base.add_head("pretrain", ["a", "b"])
    save_model(base, root / "base")
    backbone = {k: v for k, v in base.state_dict().items() if k.startswith("backbone.")}
    for i in range(2):
        model = _fresh()
        model.load_state_dict(backbone, strict=False)
        model.add_head(f"t{i}", ["x", "y"])
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * torch.randn(p.shape))
        save_model(model, root / f"t{i}")
    model = _fresh()
    model.load_state_dict(backbone, strict=False)
    model.add_head("lora", ["x", "y"])
    lora.add_adapter(model.backbone, lora.LoraConfig(r=2, lora_alpha=4))
    save_model(model, root / "lora", weights="delta", base_dir=root / "base")
    return root


def _poisoned_copy(zoo: Path, tmp: Path, name: str, file: str, payload: bytes) -> Path:
    """A copy of ``zoo/name`` whose ``file`` is the payload; for an adapter the recorded hash is
    updated too, as an attacker who controls the folder would."""
    folder = tmp / f"evil-{name}"
    shutil.copytree(zoo / name, folder)
    (folder / file).write_bytes(payload)
    config = json.loads((folder / "config.json").read_text())
    if "base" in config:  # the copy's base is still the genuine one
        config["base"]["path"] = str((zoo / name / config["base"]["path"]).resolve())
    if file.startswith("adapter/"):
        config["adapters"][0]["sha256"] = file_sha256(folder / file)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _hf_folder(tmp: Path, file: str, payload: bytes) -> Path:
    """A Hugging Face ``save_pretrained``-style folder whose only weights are the payload."""
    folder = tmp / "evil-hf"
    folder.mkdir()
    config = {"model_type": "vit", "hidden_size": 8, "num_hidden_layers": 1}
    config.update(num_attention_heads=2, intermediate_size=16, image_size=16, patch_size=8)
    (folder / "config.json").write_text(json.dumps(config))
    (folder / file).write_bytes(payload)
    return folder


@pytest.mark.parametrize("suffix", [".pth", ".pt", ".bin", ".ckpt", ".safetensors", ""])
@pytest.mark.parametrize("kind,fmt", [("exec", "zip"), ("system", "pickle")])
def test_import_timm_refuses_a_malicious_checkpoint(tmp_path, capsys, suffix, kind, fmt):
    marker = tmp_path / "MARKER"
    checkpoint = tmp_path / f"evil{suffix}"
    checkpoint.write_bytes(evil_bytes(marker, kind, fmt))
    out = tmp_path / "out"
    code, _, err = run(capsys, "import-timm", checkpoint, "--preset", "vit-micro", "--out", out)
    assert_refused(code, err, "import-timm", checkpoint)
    assert not marker.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [checkpoint.name]  # nothing written


def test_import_timm_refusal_is_one_line_on_the_real_stderr(tmp_path):
    """Not only in-process: the command prints one line (no torch warning about protocols)."""
    marker = tmp_path / "MARKER"
    checkpoint = tmp_path / "evil.pth"
    checkpoint.write_bytes(evil_bytes(marker, "exec", "pickle"))
    argv = ["import-timm", str(checkpoint), "--preset", "vit-micro", "--out", str(tmp_path / "o")]
    proc = subprocess.run(
        [sys.executable, "-m", "lorex", *argv], capture_output=True, text=True, cwd=ROOT
    )
    assert_refused(proc.returncode, proc.stderr, "import-timm", checkpoint)
    assert not marker.exists() and not (tmp_path / "o").exists()


ADAPTER = "adapter/adapter_model.safetensors"
# Each case: (command, where the payload goes). The payload replaces a genuine file, so the
# folder is otherwise a valid model; nothing may ever unpickle it.
CASES = {
    "merge: an expert's model.safetensors": ("merge", "t1", "model.safetensors"),
    "merge: the base's model.safetensors": ("merge", "base", "model.safetensors"),
    "merge: a LoRA expert's adapter weights": (
        "merge",
        "lora",
        "adapter/adapter_model.safetensors",
    ),
    "merge: a Hugging Face expert with pytorch_model.bin": ("merge", "hf", "pytorch_model.bin"),
    "info: model.safetensors": ("info", "t1", "model.safetensors"),
    "info: a LoRA expert's adapter weights": ("info", "lora", ADAPTER),
    "info: a Hugging Face folder's pytorch_model.bin": ("info", "hf", "pytorch_model.bin"),
    "info: a Hugging Face folder's model.safetensors": ("info", "hf", "model.safetensors"),
    "train --base: model.safetensors": ("train", "base", "model.safetensors"),
    "eval --model: model.safetensors": ("eval", "t0", "model.safetensors"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_model_folders_with_a_malicious_weights_file_are_refused(zoo, tmp_path, capsys, case):
    command, name, file = CASES[case]
    marker = tmp_path / "MARKER"
    payload = evil_bytes(marker, "exec", "zip")
    if name == "hf":
        folder = _hf_folder(tmp_path, file, payload)
        named = folder  # the folder: its weights are refused as a whole
    else:
        folder = _poisoned_copy(zoo, tmp_path, name, file, payload)
        named = folder / file
    out = tmp_path / "out"
    if command == "merge":
        base = folder if name == "base" else zoo / "base"
        experts = [zoo / "t0", folder] if name != "base" else [zoo / "t0", zoo / "t1"]
        argv = ["merge", "--method", "task-arithmetic", "--base", base, "--experts", *experts]
        argv += ["--out", out]
    elif command == "train":
        argv = ["train", "--base", folder, "--data", "digits/mnist", "--out", out]
    elif command == "eval":
        argv = ["eval", "--model", folder, "--data", "digits/mnist", "--json", out]
    else:
        argv = ["info", folder]
    code, _, err = run(capsys, *argv)
    assert_refused(code, err, command, named)
    assert not marker.exists()
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporaries


def test_a_yaml_config_with_python_tags_is_not_json_and_is_refused(zoo, tmp_path, capsys):
    """Configs are read as JSON only: YAML's ``!!python/object/apply`` is just invalid JSON."""
    marker = tmp_path / "MARKER"
    folder = tmp_path / "yaml-model"
    shutil.copytree(zoo / "t0", folder)
    (folder / "config.json").write_text(f"!!python/object/apply:os.system ['touch {marker}']\n")
    code, _, err = run(capsys, "info", folder)
    line = assert_refused(code, err, "info", folder / "config.json")
    assert "not valid JSON" in line
    assert not marker.exists()


# --- the static guard ----------------------------------------------------------------------------
FORBIDDEN_MODULES = {
    "pickle": "unpickling runs code",
    "_pickle": "unpickling runs code",
    "cPickle": "unpickling runs code",
    "dill": "unpickling runs code",
    "cloudpickle": "unpickling runs code",
    "joblib": "joblib.load unpickles",
    "marshal": "marshal loads code objects",
    "shelve": "shelve unpickles",
    "jsonpickle": "unpickles",
    "yaml": "configs are JSON only (yaml.load can build objects)",
    "ruamel": "configs are JSON only",
    "imageio": "user images are decoded by lorex.data.images only (pixel cap)",
    "skimage.io": "user images are decoded by lorex.data.images only (pixel cap)",
    "cv2": "user images are decoded by lorex.data.images only (pixel cap)",
    "torchvision.io": "user images are decoded by lorex.data.images only (pixel cap)",
}
FORBIDDEN_CALLS = {
    "pickle.load": "unpickling runs code",
    "pickle.loads": "unpickling runs code",
    "pickle.Unpickler": "unpickling runs code",
    "yaml.load": "yaml.load can build objects",
    "yaml.unsafe_load": "yaml.unsafe_load builds objects",
    "yaml.full_load": "yaml.full_load builds objects",
    "torch.jit.load": "TorchScript archives carry code",
    "torch.hub.load": "downloads and runs code",
}
FORBIDDEN_METHODS = {  # any receiver
    "load_state_dict_from_url": "downloads and unpickles",
    "read_pickle": "unpickles",
}
FORBIDDEN_BUILTINS = {
    "eval": "no eval of anything",
    "exec": "no exec of anything",
    "compile": "no compiling of strings",
    "__import__": "no dynamic imports of names from data",
}
IMAGE_DECODER = Path("lorex/data/images.py")
#: The one module that reads YAML: mergekit's merge recipes (``lorex merge --config``), with
#: ``yaml.safe_load`` only (plain data, no tags; the ``yaml.*load`` calls above stay forbidden).
#: Model, adapter and run configs stay JSON.
RECIPE_READER = Path("lorex/merging/recipe.py")


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        inner = _dotted(node.value)
        return f"{inner}.{node.attr}" if inner else node.attr
    return ""


def _keyword_is(call: ast.Call, name: str, value: object) -> bool:
    return any(
        k.arg == name and isinstance(k.value, ast.Constant) and k.value.value is value
        for k in call.keywords
    )


def unsafe_loading_sites(source: str, path: Path) -> list[str]:
    """Every unsafe deserialisation or image decoding site in one module, as 'path:line: why'."""
    found = []
    tree = ast.parse(source, str(path))
    for node in ast.walk(tree):
        where = f"{path}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names.append(node.module)
                names += [f"{node.module}.{a.name}" for a in node.names]
            for name in names:
                for module, why in FORBIDDEN_MODULES.items():
                    if module == "yaml" and name == "yaml" and path == RECIPE_READER:
                        continue
                    if name == module or name.startswith(module + "."):
                        found.append(f"{where}: imports {name} ({why})")
            if isinstance(node, ast.ImportFrom) and node.module in ("torch", "numpy"):
                if any(a.name == "load" for a in node.names):
                    found.append(f"{where}: from {node.module} import load (hides the check)")
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        last = name.rsplit(".", 1)[-1]
        for call, why in FORBIDDEN_CALLS.items():
            if name == call or name.endswith("." + call):
                found.append(f"{where}: {name}() ({why})")
        if last in FORBIDDEN_METHODS:
            found.append(f"{where}: {name}() ({FORBIDDEN_METHODS[last]})")
        if isinstance(node.func, ast.Name) and name in FORBIDDEN_BUILTINS:
            found.append(f"{where}: {name}() ({FORBIDDEN_BUILTINS[name]})")
        if name == "torch.load" and not _keyword_is(node, "weights_only", True):
            found.append(f"{where}: torch.load without weights_only=True")
        if name in ("np.load", "numpy.load") and any(
            k.arg == "allow_pickle" and not _keyword_is(node, "allow_pickle", False)
            for k in node.keywords
        ):
            found.append(f"{where}: {name} with allow_pickle other than False")
        if (
            last == "from_pretrained"
            and _dotted(node.func.value) not in ("HFBackbone", "cls")
            and not _keyword_is(node, "use_safetensors", True)
        ):
            found.append(f"{where}: from_pretrained without use_safetensors=True (may unpickle)")
        if name.endswith("Image.open") and path != IMAGE_DECODER:
            found.append(f"{where}: Image.open outside {IMAGE_DECODER} (no pixel cap)")
    return found


def test_static_scan_finds_what_it_forbids():
    """The scanner itself: each forbidden pattern is caught, the safe spellings are not."""
    bad = """
import pickle
import yaml
from torch import load
import imageio
eval(text)
exec(code)
pickle.loads(blob)
yaml.load(text)
yaml.unsafe_load(text)
torch.load(path)
torch.load(path, weights_only=False)
np.load(path, allow_pickle=True)
torch.jit.load(path)
df.read_pickle(path)
getattr(tf, name).from_pretrained(path)
Image.open(path)
"""
    found = unsafe_loading_sites(bad, Path("lorex/x.py"))
    assert len(found) == 16, "\n".join(found)
    good = """
import json
model.eval()
torch.load(path, map_location="cpu", weights_only=True)
np.load(path, allow_pickle=False)
np.load(path)
getattr(tf, name).from_pretrained(path, use_safetensors=True)
HFBackbone.from_pretrained(path)
json.loads(text)
"""
    assert unsafe_loading_sites(good, Path("lorex/x.py")) == []


def test_lorex_source_has_no_unsafe_loader():
    """No pickle, no yaml, no eval/exec, torch.load only with weights_only=True, np.load never
    with allow_pickle=True, transformers only from safetensors, and PIL's Image.open only in
    the capped decoder: a regression here is a test failure, not a review comment."""
    package = Path(lorex.__file__).resolve().parent
    files = sorted(package.rglob("*.py"))
    assert len(files) > 20
    found = []
    for file in files:
        rel = file.relative_to(package.parent)
        found += unsafe_loading_sites(file.read_text(encoding="utf-8"), rel)
    assert not found, "\n".join(found)


def test_configs_are_read_with_json_only():
    """Every reader of config files goes through lorex.io.read_json (json.loads); nothing in
    lorex parses YAML, TOML or INI configs, except the merge-recipe reader (mergekit's YAML,
    read with yaml.safe_load only)."""
    package = Path(lorex.__file__).resolve().parent
    for file in package.rglob("*.py"):
        if file.relative_to(package.parent) == RECIPE_READER:
            text = file.read_text(encoding="utf-8")
            assert "yaml.safe_load(" in text and "yaml.load(" not in text
            continue
        tree = ast.parse(file.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                for bad in ("yaml", "ruamel", "toml", "tomllib", "tomli", "configparser"):
                    assert not any(n == bad or n.startswith(bad + ".") for n in names), (
                        f"{file}:{node.lineno} imports {bad}"
                    )


# --- the pixel cap ----------------------------------------------------------------------------
def _png_claiming(path: Path, width: int, height: int, array: np.ndarray | None = None) -> None:
    """A real tiny PNG whose IHDR then claims ``width`` x ``height`` (CRC fixed up)."""
    img = Image.fromarray(array if array is not None else np.zeros((4, 4, 3), np.uint8))
    img.save(path)
    data = bytearray(path.read_bytes())
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))


def _image(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def _imagefolder(root: Path) -> dict[str, Path]:
    rgb = np.full((16, 16, 3), 90, np.uint8)
    for cls in ("a", "b"):
        for n in range(2):
            _image(root / cls / f"{n}.png", rgb)
    return {"default": root / "b" / "1.png"}


def _market(root: Path) -> dict[str, Path]:
    rgb = np.full((16, 8, 3), 90, np.uint8)
    for folder, pid in (("bounding_box_train", 1), ("query", 2), ("bounding_box_test", 2)):
        for n in range(2):
            _image(root / folder / f"{pid:04d}_c{n + 1}s1_{n:06d}_00.png", rgb)
    return {"default": root / "query" / "0002_c2s1_000001_00.png"}


def _paired(root: Path) -> dict[str, Path]:
    rgb = np.full((16, 16, 3), 90, np.uint8)
    depth = np.full((16, 16), 1500, np.uint16)
    for cls in ("a", "b"):
        for n in range(2):
            _image(root / "rgb" / cls / f"{n}.png", rgb)
            _image(root / "depth" / cls / f"{n}.png", depth)
    return {"rgb": root / "rgb" / "b" / "1.png", "depth": root / "depth" / "a" / "1.png"}


LAYOUTS = {
    "imagefolder": (_imagefolder, "default"),
    "market1501": (_market, "default"),
    "paired rgb": (_paired, "rgb"),
    "paired depth": (_paired, "depth"),
}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    model = _fresh()
    model.add_head("t", ["a", "b"])
    return save_model(model, tmp_path_factory.mktemp("m") / "model")


def _read_command(layout: str, root: Path, out: Path, model: Path) -> tuple[str, list]:
    """The CLI command that reads this layout's images, writing ``out`` if it succeeded."""
    if layout == "market1501":
        return "eval", ["eval", "--model", model, "--data", root, "--json", out]
    return "data", ["data", "make", root, "--out", out]


def _decoded(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize(
    "claim,shown",
    [((5000, 5000), "5000x5000 pixels"), ((100_000, 100_000), "10000000000 pixels")],
    ids=["over-the-cap", "over-PILs-own-limit"],
)
def test_images_declaring_too_many_pixels_are_refused_before_decoding(
    tmp_path, capsys, tiny_model, layout, claim, shown
):
    make, which = LAYOUTS[layout]
    root = tmp_path / "data"
    bomb = make(root)[which]
    original = _decoded(bomb)
    _png_claiming(bomb, *claim, original)
    out = tmp_path / "out"
    command, argv = _read_command(layout, root, out, tiny_model)
    code, stdout, err = run(capsys, *argv)
    line = assert_refused(code, err, command, bomb)
    limit = lorex.data.images.MAX_IMAGE_PIXELS
    assert line.endswith(f"{bomb}: image is {shown}, more than the limit {limit}"), line
    assert stdout == ""
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["data"]  # no output, no temporaries


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_the_cap_is_one_shared_constant_read_at_call_time(
    tmp_path, capsys, tiny_model, monkeypatch, layout
):
    """A genuine image one row over a lowered cap is refused by every reader, while its
    neighbours exactly at the cap are read; with the image back at its size and the default cap
    the folder reads fine (so the refusal is the cap's doing, not a broken file)."""
    make, which = LAYOUTS[layout]
    root = tmp_path / "data"
    image = make(root)[which]
    original = _decoded(image)
    h, w = original.shape[:2]
    _image(image, np.concatenate([original, original[:1]]))  # (h + 1) x w
    out = tmp_path / "out"
    command, argv = _read_command(layout, root, out, tiny_model)
    monkeypatch.setattr(lorex.data.images, "MAX_IMAGE_PIXELS", h * w)
    code, _, err = run(capsys, *argv)
    line = assert_refused(code, err, command, image)
    assert line.endswith(f"image is {w}x{h + 1} pixels, more than the limit {h * w}"), line
    assert not out.exists()
    monkeypatch.undo()
    _image(image, original)
    code, _, err = run(capsys, *argv)
    assert code == 0, err
    assert out.exists()


def test_pils_own_warning_and_error_become_the_one_line_refusal(tmp_path, monkeypatch):
    """With PIL's global limit below lorex's, PIL warns or raises first: still a LorexError
    naming the file, never a warning on stderr or a traceback."""
    from lorex.data.imagefolder import read_image
    from lorex.errors import LorexError

    path = _image(tmp_path / "x.png", np.zeros((10, 10, 3), np.uint8))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 60)  # 100 pixels: PIL only warns
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert read_image(path).shape == (10, 10, 3)  # under lorex's own cap: decoded
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 40)  # 100 > 2 x 40: PIL raises
    with pytest.raises(LorexError, match=r"x\.png: image is 100 pixels, more than the limit"):
        read_image(path)
