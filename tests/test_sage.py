"""SAGE-reID stages 2-4 and ``lorex adapt reid`` on tiny re-ID domains."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from lorex.adaptation.sage.classification import adapt_classification
from lorex.adaptation.sage.config import SageConfig
from lorex.adaptation.sage.merged_model import averaged_sources, gated_model, train_gate
from lorex.adaptation.sage.pipeline import adapt_reid
from lorex.adaptation.sage.relabel import class_pseudo_labels
from lorex.adaptation.sage.stages import source_names
from lorex.adaptation.sage.target_experts import adapt_source_expert
from lorex.adapters import lora
from lorex.adapters.gated import gated_layers, reset_gate
from lorex.cli import main
from lorex.data import make_reid_domain
from lorex.data.market1501 import write_market1501
from lorex.data.reid import load_reid_data
from lorex.errors import LorexError
from lorex.io import load_tensors
from lorex.models import load_model
from lorex.training.config import TrainConfig
from lorex.training.expert_jobs import train_expert, train_reid_expert
from lorex.training.methods import TRAINING_METHODS as METHODS

# Tiny: 1 epoch of 2 steps, pseudo-labels with a larger rho (few identities: docs/reid.md).
CFG = SageConfig(epochs=1, iters=2, batch_size=16, rho=0.05, gate_iters=2, k1=10)


@pytest.fixture(scope="module")
def domains(tmp_path_factory):
    root = tmp_path_factory.mktemp("reid-domains")
    out = {}
    for name in ("a", "b", "c", "d"):
        write_market1501(root / name, make_reid_domain(f"reid/{name}", num_ids=16))
        out[name] = root / name
    return out


@pytest.fixture(scope="module")
def sources(domains, tiny_base, tmp_path_factory):
    """Full re-ID experts on a, b and d (one short epoch each)."""
    root = tmp_path_factory.mktemp("sources")
    out = []
    for name in ("a", "b", "d"):
        train_reid_expert(
            tiny_base,
            str(domains[name]),
            METHODS["full"](),
            root / name,
            TrainConfig(epochs=1, batch_size=16, seed=0),
        )
        out.append(root / name)
    return out


@pytest.fixture(scope="module")
def experts(sources, domains, tmp_path_factory):
    """Each source adapted to c with LoRA on pseudo-labels (stage 2)."""
    root = tmp_path_factory.mktemp("lora-experts")
    target = load_reid_data(str(domains["c"]))
    out = []
    for source in sources:
        adapt_source_expert(source, target, root / source.name, CFG, torch.device("cpu"), False)
        out.append(root / source.name)
    return out


def test_stage2_expert_is_a_lora_delta_on_its_source(experts, sources):
    model = load_model(experts[0])
    layers = lora.lora_layers(model.backbone)
    assert len(layers) == 4 * 4  # qkv, proj, fc1, fc2 in each of vit-micro's 4 blocks
    config = lora.adapter_configs(model.backbone)["default"]
    assert (config.r, config.lora_alpha, config.bias) == (8, 32.0, "all")
    metrics = json.loads((experts[0] / "metrics.json").read_text())
    assert metrics["history"][0]["clusters"] >= 2
    assert 0 <= metrics["mAP"] <= 1
    # the classifier is the frozen centroids: unit rows
    head = model.heads[model.active_head]
    norms = head.classifier.weight.norm(dim=1)
    torch.testing.assert_close(norms, torch.ones_like(norms))
    # biases trained, weights not: the backbone's plain weights equal the source's
    source = load_model(sources[0]).backbone.state_dict()
    mine = dict(model.backbone.named_parameters())
    w = "blocks.0.attn.qkv.base_layer.weight"
    torch.testing.assert_close(mine[w], source["blocks.0.attn.qkv.weight"])
    assert not torch.equal(
        mine["blocks.0.attn.qkv.base_layer.bias"], source["blocks.0.attn.qkv.bias"]
    )


def test_stage2_is_deterministic(experts, sources, domains, tmp_path):
    target = load_reid_data(str(domains["c"]))
    adapt_source_expert(sources[0], target, tmp_path / "again", CFG, torch.device("cpu"), False)
    first = load_tensors(experts[0] / "adapter" / "adapter_model.safetensors")
    again = load_tensors(tmp_path / "again" / "adapter" / "adapter_model.safetensors")
    assert first.keys() == again.keys()
    assert all(torch.equal(first[k], again[k]) for k in first)


def test_averaged_sources_is_the_mean_of_the_backbones(sources):
    model = averaged_sources(sources)
    states = [load_model(s).backbone.state_dict() for s in sources]
    for key, value in model.backbone.state_dict().items():
        want = sum(s[key].double() for s in states) / len(states)
        torch.testing.assert_close(value.double(), want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("k", [2, 3])
def test_uniform_gated_model_equals_the_adapters_weighted_one_over_k(sources, experts, k):
    """Stage 3 against lorex's own LoRA: the averaged backbone (with the adapted experts' mean
    biases) carrying every expert's adapter, each active with weight 1/K."""
    names = source_names(sources[:k])
    gated = gated_model(sources[:k], experts[:k], names, "published")
    reference = averaged_sources(sources[:k])
    state = reference.backbone.state_dict()
    adapted = [
        {
            n.replace(".base_layer", ""): p.detach()
            for n, p in load_model(e).backbone.named_parameters()
        }
        for e in experts[:k]
    ]
    for key in [key for key in state if key.endswith("bias")]:
        state[key] = sum(a[key] for a in adapted) / k
    reference.backbone.load_state_dict(state)
    for name, path in zip(names, experts[:k], strict=True):
        lora.load_adapter(reference.backbone, path / "adapter", name)
    # the adapter files carry biases too; put back the mean biases they overwrote
    for pname, p in reference.backbone.named_parameters():
        key = pname.replace(".base_layer", "")
        if key in state and key.endswith("bias"):
            with torch.no_grad():
                p.copy_(state[key])
    lora.set_weighted_adapters(reference.backbone, {n: 1.0 / k for n in names})
    reference.heads = gated.heads
    reference.head_info, reference.active_head = gated.head_info, gated.active_head
    x = torch.rand(5, 3, 64, 32)
    torch.testing.assert_close(gated.embedding(x), reference.embedding(x), rtol=1e-4, atol=1e-5)
    assert len(gated_layers(gated.backbone)) == 16
    assert gated.backbone.gate_config.num_experts == k


def test_gate_training_moves_only_the_gate_and_is_deterministic(sources, experts, domains):
    names = source_names(sources)
    images = load_reid_data(str(domains["c"])).train.images
    runs = []
    for _ in range(2):
        model = gated_model(sources, experts, names, "light")
        before = {k: v.clone() for k, v in model.state_dict().items()}
        train_gate(model, images, CFG, torch.device("cpu"), False)
        runs.append(model.state_dict())
        changed = {
            k
            for k, v in model.state_dict().items()
            if v.shape != before[k].shape or not torch.equal(v, before[k])
        }
        # besides the gate: the BN-neck's running statistics, and the classifier, which is reset
        # to the cluster centroids
        stats = ("running_mean", "running_var", "tracked", "classifier.weight")
        params = {k for k in changed if not k.endswith(stats)}
        assert params and all(k.endswith((".gate", ".tau")) for k in params), params
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    reset_gate(model.backbone)
    assert all(
        float(layer.gate.abs().sum()) == 0 for layer in gated_layers(model.backbone).values()
    )


def test_gate_camera_term_is_used_recorded_and_deterministic(sources, experts, domains):
    names = source_names(sources)
    train = load_reid_data(str(domains["c"])).train
    cpu = torch.device("cpu")
    states, histories = [], []
    for cams in (train.cams, train.cams, None):
        model = gated_model(sources, experts, names, "light")
        result = train_gate(model, train.images, CFG, cpu, False, camera_ids=cams)
        states.append({k: v for k, v in model.state_dict().items() if k.endswith(".gate")})
        histories.append(result.history)
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert any(not torch.equal(states[0][k], states[2][k]) for k in states[0])
    assert 0 < histories[0][0]["camera_share"] < 1
    assert "camera_share" not in histories[2][0]
    with pytest.raises(LorexError, match="camera ids"):
        model = gated_model(sources, experts, names, "light")
        train_gate(model, train.images, CFG, cpu, False, camera_ids=train.cams[:-1])


def test_adapt_reid_refuses_a_one_camera_target_unless_the_camera_term_is_off(
    sources, domains, tmp_path
):
    data = load_reid_data(str(domains["c"]))
    data.train.cams = np.ones_like(data.train.cams)
    write_market1501(tmp_path / "one-camera", data)
    target = str(tmp_path / "one-camera")
    with pytest.raises(LorexError, match="same camera id.*--no-gate-camera"):
        adapt_reid(sources[:2], target, tmp_path / "o", CFG, progress=False)
    assert not (tmp_path / "o").exists()
    off = dataclasses.replace(CFG, gate_camera=False)
    metrics = adapt_reid(sources[:2], target, tmp_path / "o", off, progress=False)
    assert "camera_share" not in metrics["histories"]["gated-light"][0]


def test_adapt_reid_writes_a_loadable_model_and_every_variant(sources, domains, tmp_path):
    out = tmp_path / "adapted"
    metrics = adapt_reid(sources[:2], str(domains["c"]), out, CFG, progress=False)
    names = source_names(sources[:2])
    expected = {f"direct/{n}" for n in names} | {f"lora/{n}" for n in names}
    expected |= {"averaged", "uniform", "gated", "gated-light"}
    assert set(metrics["variants"]) == expected
    for v in metrics["variants"].values():
        assert {"mAP", "rank1", "rank5", "rank10", "mINP", "params", "infer_ms_per_image"} <= set(v)
        assert 0 <= v["mAP"] <= 1 and v["infer_ms_per_image"] > 0
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk["variants"]["gated-light"]["mAP"] == metrics["variants"]["gated-light"]["mAP"]
    assert (out / "report.md").is_file() and (out / "gate_weights.png").stat().st_size > 1000
    model = load_model(out)
    assert model.backbone.gate_config.kind == "light"
    weights = metrics["gate_weights"]["gated-light"]
    assert len(weights) == 16 and all(abs(sum(w) - 1) < 1e-5 for w in weights.values())
    costs = metrics["costs"]
    assert costs["gate_params"]["gated-light"] < costs["gate_params"]["gated"]
    # a rerun reuses every stage
    again = adapt_reid(sources[:2], str(domains["c"]), out, CFG, progress=False)
    assert not any(k.startswith(("lora/", "gated")) for k in again["stage_seconds"])
    assert again["variants"]["gated"]["mAP"] == metrics["variants"]["gated"]["mAP"]


def _one_line_error(code, err, *needles):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_cli_adapt_reid(sources, domains, tmp_path, capsys):
    out = tmp_path / "cli"
    argv = ["adapt", "reid", "--sources", *map(str, sources[:2]), "--target", str(domains["c"])]
    argv += ["--out", str(out), "--epochs", "1", "--iters", "2", "--batch-size", "16"]
    argv += ["--rho", "0.05", "--k1", "10", "--gate-iters", "2", "--gate", "published"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "gated-light" in printed and "wrote" in printed
    assert load_model(out).backbone.gate_config.kind == "published"
    assert main(["info", str(out)]) == 0
    info = capsys.readouterr().out
    assert "gate       published: 2 LoRA experts" in info


def test_cli_adapt_reid_bad_input(sources, domains, tmp_path, capsys):
    base = ["adapt", "reid", "--target", str(domains["c"]), "--out", str(tmp_path / "o")]
    _one_line_error(
        main([*base, "--sources", str(sources[0])]), capsys.readouterr().err, "at least 2"
    )
    missing = tmp_path / "nope"
    code = main([*base, "--sources", str(sources[0]), str(missing)])
    _one_line_error(code, capsys.readouterr().err, str(missing))
    code = main(
        [
            "adapt",
            "reid",
            "--sources",
            *map(str, sources[:2]),
            "--target",
            "digits/mnist",
            "--out",
            str(tmp_path / "o"),
        ]
    )
    _one_line_error(code, capsys.readouterr().err, "classification dataset")
    assert not (tmp_path / "o").exists()
    with pytest.raises(LorexError, match="gate"):
        SageConfig(gate="big")


def test_source_names_are_unique(tmp_path):
    assert source_names([tmp_path / "x", tmp_path / "y" / "x", tmp_path / "z"]) == ["x", "x-2", "z"]


# --------------------------------------------------------------------------------------------
# the classification variant (digit domains)
# --------------------------------------------------------------------------------------------


def _shot_loop(features, probs, rounds):
    """SHOT's labelling written out one class and one image at a time."""
    x = [f / max(np.linalg.norm(f), 1e-12) for f in features]
    weights = [list(p) for p in probs]
    labels = []
    for _ in range(rounds):
        cents = []
        for c in range(len(weights[0])):
            total = sum(w[c] for w in weights)
            cent = sum(w[c] * xi for w, xi in zip(weights, x, strict=True)) / max(total, 1e-12)
            cents.append(cent / max(np.linalg.norm(cent), 1e-12))
        labels = [int(np.argmax([xi @ c for c in cents])) for xi in x]
        weights = [[1.0 if c == lab else 0.0 for c in range(len(cents))] for lab in labels]
    return labels


@pytest.mark.parametrize("rounds", [1, 2, 3])
def test_class_pseudo_labels_match_a_loop(rounds):
    rng = np.random.default_rng(rounds)
    feats = rng.normal(size=(40, 6))
    probs = rng.dirichlet(np.ones(4), size=40)
    got = class_pseudo_labels(feats, probs, rounds)
    assert got.tolist() == _shot_loop(feats, probs, rounds)


def test_adapt_classification_scores_every_variant(tiny_base, tmp_path):
    srcs = []
    for name in ("digits/mnist", "digits/optdigits"):
        out = tmp_path / name.split("/")[1]
        train_expert(
            tiny_base, name, METHODS["full"](), out, TrainConfig(epochs=1, max_samples=200)
        )
        srcs.append(out)
    cfg = SageConfig(epochs=1, iters=2, batch_size=16, gate_iters=2, max_target_samples=200)
    metrics = adapt_classification(srcs, "digits/syn", tmp_path / "adapted", cfg, progress=False)
    assert set(metrics["variants"]) == {
        "direct/mnist", "direct/optdigits", "averaged", "lora/mnist", "lora/optdigits",
        "uniform", "gated", "gated-light",
    }  # fmt: skip
    assert all(0 <= v["accuracy"] <= 1 for v in metrics["variants"].values())
    model = load_model(tmp_path / "adapted")
    assert model.backbone.gate_config.experts == ["mnist", "optdigits"]
    assert model.classes == [str(i) for i in range(10)]


@pytest.mark.slow  # a whole bench
def test_bench_sage_end_to_end_on_tiny_settings(tiny_base, tmp_path, monkeypatch):
    """``lorex bench sage``'s whole chain (people base, sources, leave-one-out target, report)
    at a toy size; the numbers mean nothing here, the structure does."""
    from lorex.data import reid_synth
    from lorex.experiments.sage_bench import SageBenchSettings, run_sage_bench

    # Toy-sized built-in domains, in a cache of this test's own (never the session's).
    monkeypatch.setenv("LOREX_CACHE_DIR", str(tmp_path / "cache"))
    for name in ("reid/a", "reid/b", "reid/d", reid_synth.PRETRAIN_DOMAIN):
        spec = reid_synth.DOMAINS[name]
        monkeypatch.setitem(reid_synth.DOMAINS, name, dataclasses.replace(spec, num_ids=40))

    settings = SageBenchSettings(
        targets=("reid/a",),
        source_epochs=1,
        source_samples=120,
        sage=SageConfig(
            epochs=1, iters=2, batch_size=16, rho=0.05, k1=10, gate_iters=2, max_target_samples=120
        ),
        pretrain_epochs=1,
        pretrain_samples=120,
        vit_b_timing=False,
        domains=("reid/a", "reid/b", "reid/d"),
    )
    summary = run_sage_bench(tmp_path / "bench", settings=settings, base=tiny_base, progress=False)
    on_disk = json.loads((tmp_path / "bench" / "results.json").read_text())
    variants = on_disk["reid/a"]
    assert set(variants) == {
        "direct/b", "direct/d", "averaged", "lora/b", "lora/d", "uniform", "gated", "gated-light",
    }  # fmt: skip
    assert all(set(v) == {"mAP", "rank1", "mINP", "mAP_se"} for v in variants.values())
    assert all(0 < v["mAP_se"] < v["mAP"] for v in variants.values())  # over the queries
    assert summary["goals"]["targets"] == 1
    assert "reid/a" in summary["goals"]["per_target"]
    text = (tmp_path / "bench" / "results.md").read_text()
    assert "gated-light" in text and "Goals" in text
    assert (tmp_path / "bench" / "gate_weights.png").stat().st_size > 1000


def _same_files(a, b, names=("model.safetensors",)):
    for name in names:
        x, y = load_tensors(a / name), load_tensors(b / name)
        assert x.keys() == y.keys()
        assert all(torch.equal(x[k], y[k]) for k in x), name


@pytest.mark.slow  # whole adaptations, twice
@pytest.mark.parametrize("saves", [3, 9])
def test_adapt_reid_stopped_mid_stage_resumes_bit_identically(
    sources, domains, tmp_path, stop_after_saves, saves
):
    """Stopped in the first expert's second epoch (3 saves), or after the first step of the
    first gate (9: 4 steps per expert, then the gate's camera term and its first values)."""
    from lorex.training.checkpoint import CheckpointOptions

    cfg = SageConfig(epochs=2, iters=2, batch_size=16, rho=0.05, gate_iters=2, k1=10)
    target = str(domains["c"])
    ref = adapt_reid(sources[:2], target, tmp_path / "ref", cfg, progress=False)
    out, every = tmp_path / "out", CheckpointOptions(every=1)
    with pytest.raises(stop_after_saves(saves)):
        adapt_reid(sources[:2], target, out, cfg, progress=False, checkpoint=every)
    assert not out.exists()
    resume = CheckpointOptions(every=1, resume=True)
    got = adapt_reid(sources[:2], target, out, cfg, progress=False, checkpoint=resume)
    _same_files(tmp_path / "ref", out)
    second = "experts/" + source_names(sources[:2])[1]
    for name, file in ((f"{second}/adapter", "adapter_model.safetensors"), ("gated", None)):
        _same_files(tmp_path / f"ref.parts/{name}", tmp_path / f"out.parts/{name}",
                    [file or "model.safetensors"])  # fmt: skip
    assert got["variants"] == {
        k: {**v, "infer_ms_per_image": got["variants"][k]["infer_ms_per_image"]}
        for k, v in ref["variants"].items()
    }

    def untimed(histories):
        return {k: [{**e, "label_seconds": 0} for e in h] for k, h in histories.items()}

    assert untimed(got["histories"]) == untimed(ref["histories"])
    assert not (tmp_path / "out.parts" / "checkpoints").exists()


def test_classification_expert_stopped_mid_epoch_resumes_bit_identically(
    tiny_base, tmp_path, stop_after_saves
):
    from lorex.adaptation.sage.classification import adapt_source_expert_classification
    from lorex.data import load_dataset
    from lorex.training.checkpoint import CheckpointOptions

    cfg = SageConfig(epochs=2, iters=3, batch_size=16)
    target = load_dataset("digits/syn", "train", 64, 0)  # tiny_base's head has the same classes
    cpu = torch.device("cpu")
    adapt_source_expert_classification(tiny_base, target, tmp_path / "ref", cfg, cpu, False)
    work = CheckpointOptions(tmp_path / "work", every=1)
    with pytest.raises(stop_after_saves(5)):  # the 2nd step of the 2nd epoch
        adapt_source_expert_classification(
            tiny_base, target, tmp_path / "out", cfg, cpu, False, work
        )
    resume = CheckpointOptions(tmp_path / "work", every=1, resume=True)
    got = adapt_source_expert_classification(
        tiny_base, target, tmp_path / "out", cfg, cpu, False, resume
    )
    _same_files(tmp_path / "ref" / "adapter", tmp_path / "out" / "adapter",
                ["adapter_model.safetensors"])  # fmt: skip
    assert len(got["history"]) == 2 and not (tmp_path / "work").exists()
