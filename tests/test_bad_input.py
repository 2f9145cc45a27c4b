"""Bad input through the real CLI: one line on stderr naming the culprit, exit 2, nothing written.

Every case builds its broken input from small, ready-made fixtures (a 16x16 ViT base, two full
experts, a LoRA expert, an ImageFolder and a Market-1501 folder, all written in well under a
second) and runs ``lorex`` in-process. Whatever the failure, the directory the case works in must
be exactly as it was before: no output, no ``.partial`` or temporary entry, an existing output
byte for byte unchanged.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from lorex.adapters import lora
from lorex.backbones.vit import VisionTransformer, ViTConfig
from lorex.cli import main
from lorex.models import LorexModel
from lorex.models.store import save_model

TINY = dict(type="vit", img_size=16, patch_size=8, embed_dim=8, depth=1, num_heads=2)
QKV = "backbone.blocks.0.attn.qkv.weight"


def _fresh() -> LorexModel:
    return LorexModel(VisionTransformer(ViTConfig.from_dict(TINY)), TINY)


def _noisy_copy(backbone: dict, task: str, seed: int, shift: float = 0.02) -> LorexModel:
    model = _fresh()
    model.load_state_dict(backbone, strict=False)
    model.add_head(task, ["a", "b"])
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(shift * torch.randn(p.shape, generator=g))
    return model


def _lora_expert(backbone: dict, base_dir: Path, out: Path) -> None:
    model = _fresh()
    model.load_state_dict(backbone, strict=False)
    model.add_head("lora", ["a", "b"])
    lora.add_adapter(model.backbone, lora.LoraConfig(r=2, lora_alpha=4))
    with torch.no_grad():
        for layer in lora.lora_layers(model.backbone).values():
            layer.lora_B["default"].weight.fill_(0.01)
    save_model(model, out, weights="delta", base_dir=base_dir)


def _images(root: Path, sizes: list[int], seed: int = 0) -> Path:
    """An ImageFolder ``root/<class>/<n>.png``: classes a and b, one image per size per class."""
    rng = np.random.default_rng(seed)
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for n, size in enumerate(sizes):
            pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / c / f"{n}.png")
    return root


def _market(root: Path, extra: str | None = None) -> Path:
    rng = np.random.default_rng(1)
    names = {
        "bounding_box_train": ["0001_c1s1_000001_00.png", "0002_c2s1_000002_00.png"],
        "query": ["0001_c2s1_000003_00.png"],
        "bounding_box_test": ["0001_c1s1_000004_00.png", "0002_c1s1_000005_00.png"],
    }
    if extra:
        names["bounding_box_train"].append(extra)
    for folder, files in names.items():
        (root / folder).mkdir(parents=True)
        for name in files:
            pixels = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / folder / name)
    return root


@dataclass(frozen=True)
class Zoo:
    base: Path
    other_base: Path  # the same architecture, other weights
    experts: tuple[Path, Path]  # full experts of `base`
    lora: Path  # a LoRA expert of `base` (a delta model)
    lora_other: Path  # a LoRA expert of `other_base`
    images: Path  # ImageFolder of 16x16 images, classes a and b


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> Zoo:
    root = tmp_path_factory.mktemp("zoo")
    torch.manual_seed(0)
    base = _fresh()
    base.add_head("pretrain", ["a", "b"])
    save_model(base, root / "base")
    backbone = {k: v for k, v in base.state_dict().items() if k.startswith("backbone.")}
    experts = []
    for i in range(2):
        save_model(_noisy_copy(backbone, f"t{i}", 100 + i), root / f"t{i}")
        experts.append(root / f"t{i}")
    other = _noisy_copy(backbone, "pretrain", 7, shift=0.5)
    save_model(other, root / "other-base")
    other_backbone = {k: v for k, v in other.state_dict().items() if k.startswith("backbone.")}
    _lora_expert(backbone, root / "base", root / "lora")
    _lora_expert(other_backbone, root / "other-base", root / "lora-other")
    return Zoo(
        base=root / "base",
        other_base=root / "other-base",
        experts=(experts[0], experts[1]),
        lora=root / "lora",
        lora_other=root / "lora-other",
        images=_images(root / "images", [16, 16]),
    )


# --- ways to break a model directory (each on a copy under the case's own folder) ----------------


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_config(model: Path, edit: Callable[[dict], None]) -> Path:
    config = json.loads((model / "config.json").read_text())
    edit(config)
    (model / "config.json").write_text(json.dumps(config))
    return model


def _edit_tensors(model: Path, edit: Callable[[dict], None]) -> Path:
    tensors = load_file(model / "model.safetensors")
    edit(tensors)
    save_file(tensors, model / "model.safetensors")
    return model


def _truncate(model: Path) -> Path:
    weights = model / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    return model


def _garbage(model: Path) -> Path:
    (model / "model.safetensors").write_bytes(bytes(range(256)) * 8)
    return model


def _corrupt_adapter(model: Path) -> Path:
    """Garbage adapter weights, with the hash in config.json updated: the file itself is bad."""
    weights = model / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(b"\xff" * 40)
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    return _edit_config(model, lambda c: c["adapters"][0].update(sha256=digest))


def _header_not_an_object(model: Path) -> Path:
    """A well-framed safetensors file whose JSON header is a list, not an object."""
    header = b"[1]     "
    (model / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header)
    return model


def _rename(config: dict, old: str, new: str) -> None:
    config[new] = config.pop(old)


def _set(tensors: dict, key: str, value: torch.Tensor) -> None:
    tensors[key] = value


def _poison(tensors: dict, key: str, value: float) -> None:
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[0] = value


# --- the table -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """``build(tmp, zoo)`` makes the broken input under ``tmp`` and returns the argv, the texts the
    error line must contain (a path or a field/option name) and the output path (or None)."""

    build: Callable[[Path, Zoo], tuple[list, list, Path | None]]
    existing_output: bool = False  # pre-create the output: it must survive unchanged


def train(base, data, out, *extra):
    return ["train", "--base", base, "--data", data, "--out", out, *extra]


def merge(base, experts, out, *extra, method="average"):
    return [
        "merge",
        "--method",
        method,
        "--base",
        base,
        "--experts",
        *experts,
        "--out",
        out,
        *extra,
    ]


def eval_(model, data, out, *extra):
    return ["eval", "--model", model, "--data", data, "--json", out, *extra]


def _model_case(break_it, needle_of, command="eval", model_from=lambda z: z.experts[0]):
    """A copy of a model, broken by ``break_it``, given to ``command`` (eval, train, merge...)."""

    def build(tmp, z):
        _copy(z.base, tmp / "base")  # a LoRA expert names its base as ../base
        bad = break_it(_copy(model_from(z), tmp / "bad-model"))
        out = tmp / "out"
        argv = {
            "eval": lambda: eval_(bad, z.images, out),
            "train": lambda: train(bad, z.images, out, "--method", "lora"),
            "merge": lambda: merge(z.base, [z.experts[1], bad], out),
            "merge-base": lambda: merge(bad, list(z.experts), out),
            "info": lambda: ["info", bad],
            "merge-adapter": lambda: ["merge-adapter", bad, "--out", out],
        }[command]()
        return argv, needle_of(bad), out if command != "info" else None

    return build


def _hyper(*extra, needle, command="train", method="average"):
    def build(tmp, z):
        out = tmp / "out"
        if command == "train":
            return train(z.base, z.images, out, *extra), [needle], out
        if command == "eval":
            return eval_(z.experts[0], z.images, out, *extra), [needle], out
        return merge(z.base, list(z.experts), out, *extra, method=method), [needle], out

    return build


def _data_case(make, command="train"):
    def build(tmp, z):
        data = make(tmp)
        out = tmp / "out"
        if command == "train":
            return train(z.base, data, out, "--epochs", "1"), [str(data)], out
        return eval_(z.experts[0], data, out), [str(data)], out

    return build


def _empty_folder(tmp):
    (tmp / "empty" / "a").mkdir(parents=True)
    return tmp / "empty"


def _corrupt_image(tmp):
    root = _images(tmp / "corrupt", [16, 16])
    (root / "b" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really" * 10)
    return root


def _mixed_sizes(tmp):
    return _images(tmp / "mixed", [16, 12])


def _lora_of_other_base(tmp, z):
    out = tmp / "out"
    return merge(z.base, [z.experts[0], z.lora_other], out), [str(z.lora_other)], out


def _weights(p):
    return [str(p / "model.safetensors")]


def _config(p):
    return [str(p / "config.json")]


CASES = {
    # --- paths that do not exist ---
    "train-missing-base": Case(
        lambda t, z: (train(t / "no-base", z.images, t / "out"), [str(t / "no-base")], t / "out")
    ),
    "train-missing-data": Case(
        lambda t, z: (train(z.base, t / "no-data", t / "out"), [str(t / "no-data")], t / "out")
    ),
    "train-missing-head-from": Case(
        lambda t, z: (
            train(z.base, z.images, t / "out", "--head-from", t / "no-probe"),
            [str(t / "no-probe")],
            t / "out",
        )
    ),
    "eval-missing-model": Case(
        lambda t, z: (eval_(t / "no-model", z.images, t / "r.json"), [str(t / "no-model")], None)
    ),
    "eval-missing-data": Case(
        lambda t, z: (eval_(z.experts[0], t / "no-data", t / "r.json"), [str(t / "no-data")], None)
    ),
    "merge-missing-base": Case(
        lambda t, z: (merge(t / "no-base", z.experts, t / "out"), [str(t / "no-base")], t / "out")
    ),
    "merge-missing-expert": Case(
        lambda t, z: (
            merge(z.base, [z.experts[0], t / "no-expert"], t / "out"),
            [str(t / "no-expert")],
            t / "out",
        )
    ),
    "info-missing-model": Case(
        lambda t, z: (["info", t / "no-model"], [str(t / "no-model")], None)
    ),
    "merge-adapter-missing-model": Case(
        lambda t, z: (
            ["merge-adapter", t / "no-model", "--out", t / "out"],
            [str(t / "no-model")],
            t / "out",
        )
    ),
    "import-timm-missing-checkpoint": Case(
        lambda t, z: (
            ["import-timm", t / "no.safetensors", "--preset", "vit-micro", "--out", t / "out"],
            [str(t / "no.safetensors")],
            t / "out",
        )
    ),
    # --- model.safetensors truncated or garbage ---
    "eval-truncated-safetensors": Case(_model_case(_truncate, _weights)),
    "eval-corrupt-safetensors": Case(_model_case(_garbage, _weights)),
    "train-corrupt-base-safetensors": Case(
        _model_case(_garbage, _weights, "train", lambda z: z.base)
    ),
    "merge-truncated-expert": Case(_model_case(_truncate, _weights, "merge")),
    "merge-corrupt-expert": Case(_model_case(_garbage, _weights, "merge")),
    "merge-safetensors-header-not-an-object": Case(
        _model_case(_header_not_an_object, _weights, "merge")
    ),
    "merge-corrupt-base": Case(_model_case(_garbage, _weights, "merge-base", lambda z: z.base)),
    "merge-adapter-corrupt-adapter": Case(
        _model_case(
            _corrupt_adapter,
            lambda p: [str(p / "adapter" / "adapter_model.safetensors")],
            "merge-adapter",
            lambda z: z.lora,
        )
    ),
    # --- config.json ---
    "info-config-not-json": Case(
        _model_case(lambda p: (p / "config.json").write_text('{"heads": {') and p, _config, "info")
    ),
    "eval-config-not-an-object": Case(
        _model_case(lambda p: (p / "config.json").write_text("[1, 2]") and p, _config)
    ),
    "eval-config-unknown-field": Case(
        _model_case(
            lambda p: _edit_config(p, lambda c: _rename(c, "active_head", "activ_head")),
            lambda p: [str(p / "config.json"), "'activ_head'", "did you mean 'active_head'?"],
        )
    ),
    "eval-config-missing-field": Case(
        _model_case(
            lambda p: _edit_config(p, lambda c: c.pop("heads")),
            lambda p: [str(p / "config.json"), "'heads'"],
        )
    ),
    "eval-config-bad-backbone-field": Case(
        _model_case(
            lambda p: _edit_config(p, lambda c: c["backbone"].update(depth="one")),
            lambda p: [str(p / "config.json"), "depth"],
        )
    ),
    "eval-config-unknown-backbone-field": Case(
        _model_case(
            lambda p: _edit_config(p, lambda c: c["backbone"].update(embed_dims=8)),
            lambda p: [str(p / "config.json"), "'embed_dims'", "did you mean 'embed_dim'?"],
        )
    ),
    "merge-expert-config-unknown-field": Case(
        _model_case(
            lambda p: _edit_config(p, lambda c: _rename(c, "heads", "head")),
            lambda p: [str(p / "config.json"), "'head'", "did you mean 'heads'?"],
            "merge",
        )
    ),
    "merge-expert-config-missing-field": Case(
        _model_case(
            lambda p: _edit_config(p, lambda c: c.pop("weights")),
            lambda p: [str(p / "config.json"), "'weights'"],
            "merge",
        )
    ),
    "merge-adapter-config-unknown-field": Case(
        _model_case(
            lambda p: (
                (p / "adapter" / "adapter_config.json").write_text(
                    json.dumps({"peft_type": "LORA", "r": 2, "lora_alpa": 4})
                )
                and p
            ),
            lambda p: [str(p / "adapter" / "adapter_config.json"), "did you mean 'lora_alpha'?"],
            "merge-adapter",
            lambda z: z.lora,
        )
    ),
    # --- NaN / Inf weights ---
    "eval-nan-weights": Case(
        _model_case(
            lambda p: _edit_tensors(p, lambda t: _poison(t, QKV, float("nan"))),
            lambda p: [*_weights(p), QKV],
        )
    ),
    "train-inf-base-weights": Case(
        _model_case(
            lambda p: _edit_tensors(p, lambda t: _poison(t, QKV, float("inf"))),
            lambda p: [*_weights(p), QKV],
            "train",
            lambda z: z.base,
        )
    ),
    "merge-nan-expert": Case(
        _model_case(
            lambda p: _edit_tensors(p, lambda t: _poison(t, QKV, float("nan"))),
            lambda p: [*_weights(p), QKV],
            "merge",
        )
    ),
    "merge-inf-base": Case(
        _model_case(
            lambda p: _edit_tensors(p, lambda t: _poison(t, QKV, float("-inf"))),
            lambda p: [*_weights(p), QKV],
            "merge-base",
            lambda z: z.base,
        )
    ),
    # --- experts that do not fit the base ---
    "merge-keys-differ": Case(
        _model_case(
            lambda p: _edit_tensors(p, lambda t: t.pop("backbone.norm.bias")),
            lambda p: [str(p), "backbone.norm.bias"],
            "merge",
        )
    ),
    "merge-shapes-differ": Case(
        _model_case(
            lambda p: _edit_tensors(p, lambda t: _set(t, QKV, torch.zeros(24, 9))),
            lambda p: [str(p), QKV],
            "merge",
        )
    ),
    "merge-dtypes-differ": Case(
        _model_case(
            lambda p: _edit_tensors(p, lambda t: _set(t, QKV, t[QKV].half())),
            lambda p: [str(p), QKV, "float16"],
            "merge",
        )
    ),
    "merge-shapes-differ-existing-output": Case(
        _model_case(
            lambda p: _edit_tensors(p, lambda t: _set(t, QKV, torch.zeros(24, 9))),
            lambda p: [str(p), QKV],
            "merge",
        ),
        existing_output=True,
    ),
    "merge-base-differs": Case(_lora_of_other_base),
    # --- image folders ---
    "train-empty-imagefolder": Case(_data_case(_empty_folder)),
    "train-corrupt-image": Case(_data_case(_corrupt_image)),
    "train-mixed-image-sizes": Case(_data_case(_mixed_sizes)),
    "eval-corrupt-image": Case(_data_case(_corrupt_image, "eval")),
    "eval-mixed-image-sizes": Case(_data_case(_mixed_sizes, "eval")),
    # --- hyper-parameters out of range ---
    "lora-rank-0": Case(_hyper("--method", "lora", "--rank", "0", needle="rank")),
    "lora-rank-0-existing-output": Case(
        _hyper("--method", "lora", "--rank", "0", needle="rank"), existing_output=True
    ),
    "lora-rank-negative": Case(_hyper("--method", "lora", "--rank", "-4", needle="rank")),
    "lora-alpha-0": Case(_hyper("--method", "lora", "--alpha", "0", needle="alpha")),
    "lora-dropout-1": Case(_hyper("--method", "lora", "--lora-dropout", "1", needle="dropout")),
    "lora-bad-target-regex": Case(
        _hyper("--method", "lora", "--targets", "qkv(", needle="targets")
    ),
    "losa-rank-channel-0": Case(
        _hyper("--method", "losa", "--rank-channel", "0", needle="rank_channel")
    ),
    "losa-negative-width": Case(_hyper("--method", "losa", "--losa-width", "-1", needle="width")),
    "train-lr-negative": Case(_hyper("--lr", "-1", needle="--lr")),
    "train-lr-nan": Case(_hyper("--lr", "nan", needle="--lr")),
    "train-epochs-0": Case(_hyper("--epochs", "0", needle="--epochs")),
    "train-batch-size-0": Case(_hyper("--batch-size", "0", needle="--batch-size")),
    "train-max-samples-0": Case(_hyper("--max-samples", "0", needle="--max-samples")),
    "train-weight-decay-negative": Case(_hyper("--weight-decay", "-0.1", needle="--weight-decay")),
    "train-weight-decay-inf": Case(_hyper("--weight-decay", "inf", needle="--weight-decay")),
    "train-seed-too-large": Case(_hyper("--seed", str(2**70), needle="--seed")),
    "train-num-instances-0": Case(
        _hyper("--objective", "reid", "--num-instances", "0", needle="--num-instances")
    ),
    "eval-max-samples-0": Case(
        _hyper("--max-samples", "0", needle="--max-samples", command="eval")
    ),
    "merge-ties-density-1.5": Case(
        _hyper("--density", "1.5", needle="density", command="merge", method="ties")
    ),
    "merge-dare-drop-1": Case(
        _hyper("--drop", "1.0", needle="drop", command="merge", method="dare")
    ),
    "merge-scale-nan": Case(
        _hyper("--scale", "nan", needle="scale", command="merge", method="task-arithmetic")
    ),
    "merge-doge-steps-negative": Case(
        _hyper("--steps", "-1", needle="steps", command="merge", method="doge")
    ),
    "merge-doge-mask-0": Case(_hyper("--mask", "0", needle="mask", command="merge", method="doge")),
    "merge-option-of-another-method": Case(
        _hyper("--density", "0.5", needle="--density", command="merge")
    ),
    # --- re-ID folders ---
    "eval-market-unparsable-name": Case(
        lambda t, z: (
            eval_(z.experts[0], _market(t / "market", "abc_c1s1_000451_03.png"), t / "r.json"),
            [str(t / "market" / "bounding_box_train" / "abc_c1s1_000451_03.png")],
            None,
        )
    ),
    "train-reid-market-unparsable-name": Case(
        lambda t, z: (
            train(
                z.base,
                _market(t / "market", "abc_c1s1_000451_03.png"),
                t / "out",
                "--objective",
                "reid",
            ),
            [str(t / "market" / "bounding_box_train" / "abc_c1s1_000451_03.png")],
            t / "out",
        )
    ),
}


def _snapshot(root: Path) -> dict[str, bytes | None]:
    """Every entry under ``root``: a file's bytes, None for a directory."""
    return {
        str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None)
        for p in sorted(root.rglob("*"))
    }


def test_the_unbroken_inputs_work(zoo, tmp_path, capsys):
    """The control: what the cases break works as it is, so each failure is the breakage's."""
    market = _market(tmp_path / "market")
    for argv in (
        eval_(zoo.experts[0], zoo.images, tmp_path / "eval.json"),
        eval_(zoo.experts[0], market, tmp_path / "reid.json"),
        merge(zoo.base, [*zoo.experts, zoo.lora], tmp_path / "merged", method="ties"),
        ["merge-adapter", zoo.lora, "--out", tmp_path / "folded"],
        train(zoo.base, zoo.images, tmp_path / "lora", "--method", "lora", "--epochs", "1"),
    ):
        assert main([str(a) for a in argv]) == 0, capsys.readouterr().err


@pytest.mark.parametrize("case", [pytest.param(case, id=name) for name, case in CASES.items()])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case, zoo, tmp_path, capsys):
    argv, needles, out = case.build(tmp_path, zoo)
    argv = [str(a) for a in argv]
    if case.existing_output:
        out.mkdir()
        (out / "config.json").write_text('{"keep": "me"}\n')
        (out / "model.safetensors").write_bytes(b"previous weights")
    before = _snapshot(tmp_path)
    zoo_before = _snapshot(zoo.base.parent)
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own usage errors
        code = exc.code
    _, err = capsys.readouterr()
    assert code == 2, err
    assert "Traceback" not in err, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].strip() and err.endswith("\n"), err
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    # Nothing written: no output, no temporary or .partial entry, an old output intact.
    if out is not None and not case.existing_output:
        assert not out.exists()
    assert _snapshot(tmp_path) == before
    assert _snapshot(zoo.base.parent) == zoo_before
