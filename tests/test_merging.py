"""Merge methods against brute-force references written here with plain loops, on tiny models."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
import torch

from lorex.adapters import lora
from lorex.backbones.vit import VisionTransformer, ViTConfig
from lorex.errors import LorexError
from lorex.merging import merge_models, method_from_name
from lorex.merging.methods import doge
from lorex.models import LorexModel, load_model
from lorex.models.store import save_model
from tests.tiny_hf import TINY_VIT

# Two blocks: the block-wise methods (DOGE, WUDI) look for repeated blocks (lorex.merging.blocks).
TINY = dict(type="vit", img_size=16, patch_size=8, embed_dim=8, depth=2, num_heads=2)
TASKS = ("t0", "t1", "t2")


def _fresh(config: dict = TINY) -> LorexModel:
    return LorexModel(VisionTransformer(ViTConfig.from_dict(config)), config)


def make_experts(root: Path, config: dict = TINY, n_full: int = 3, with_lora: bool = True):
    """A base, ``n_full`` full experts (base + noise) and optionally one LoRA expert."""
    torch.manual_seed(0)
    base = _fresh(config)
    base.add_head("pretrain", ["a", "b", "c"])
    save_model(base, root / "base")
    backbone = {k: v for k, v in base.state_dict().items() if k.startswith("backbone.")}
    experts = []
    for i in range(n_full):
        model = _fresh(config)
        model.load_state_dict(backbone, strict=False)
        model.add_head(f"t{i}", ["x", "y"])
        g = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.02 * torch.randn(p.shape, generator=g))
        save_model(model, root / f"t{i}")
        experts.append(root / f"t{i}")
    if with_lora:
        model = _fresh(config)
        model.load_state_dict(backbone, strict=False)
        model.add_head("lora", ["x", "y"])
        lora.add_adapter(model.backbone, lora.LoraConfig(r=2, lora_alpha=4))
        g = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for layer in lora.lora_layers(model.backbone).values():
                b = layer.lora_B["default"].weight
                b.copy_(0.05 * torch.randn(b.shape, generator=g))
        save_model(model, root / "lora", weights="delta", base_dir=root / "base")
        experts.append(root / "lora")
    return root / "base", experts


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    return make_experts(tmp_path_factory.mktemp("zoo"))


def backbone_state(path: Path) -> dict[str, torch.Tensor]:
    """A model's backbone weights by the ordinary loading path, LoRA folded in by the layer code."""
    model = load_model(path)
    lora.merge_and_unload(model.backbone)
    return {k: v for k, v in model.state_dict().items() if k.startswith("backbone.")}


def flat_task_vectors(base_dir, expert_dirs, keys):
    """Task vectors as plain Python lists over ``keys`` in order (float32 differences)."""
    base = backbone_state(base_dir)
    experts = [backbone_state(e) for e in expert_dirs]
    taus = [[float(v) for k in keys for v in (e[k] - base[k]).flatten()] for e in experts]
    flat_base = [float(v) for k in keys for v in base[k].flatten()]
    return base, flat_base, taus


def unflatten(values, base, keys):
    out, i = {}, 0
    for k in keys:
        n = base[k].numel()
        out[k] = torch.tensor(values[i : i + n], dtype=torch.float64).view(base[k].shape)
        i += n
    return out


def merged_state(out: Path) -> dict[str, torch.Tensor]:
    return {k: v for k, v in load_model(out).state_dict().items() if k.startswith("backbone.")}


def sign(x: float) -> float:
    return (x > 0) - (x < 0)


def assert_matches(out, reference, keys):
    got = merged_state(out)
    for k in keys:
        torch.testing.assert_close(got[k].double(), reference[k], rtol=0, atol=2e-6, msg=k)


def test_average_and_task_arithmetic_match_loops(zoo, tmp_path):
    base_dir, experts = zoo
    keys = sorted(backbone_state(base_dir))
    base, flat_base, taus = flat_task_vectors(base_dir, experts, keys)
    n = len(taus)
    merge_models(method_from_name("average"), base_dir, experts, tmp_path / "avg", progress=False)
    expected = [flat_base[j] + sum(t[j] for t in taus) / n for j in range(len(flat_base))]
    assert_matches(tmp_path / "avg", unflatten(expected, base, keys), keys)
    method = method_from_name("task-arithmetic", scale=0.4)
    merge_models(method, base_dir, experts, tmp_path / "ta", progress=False)
    expected = [flat_base[j] + 0.4 * sum(t[j] for t in taus) for j in range(len(flat_base))]
    assert_matches(tmp_path / "ta", unflatten(expected, base, keys), keys)


def reference_ties(flat_base, taus, density, scale, merge_func, trim=True):
    d = len(flat_base)
    trimmed = []
    for t in taus:
        k = d - int(d * density)
        threshold = sorted(abs(v) for v in t)[k - 1] if trim and k > 0 else 0.0
        trimmed.append([v if abs(v) >= threshold else 0.0 for v in t])
    signs = [sign(sum(tr[j] for tr in trimmed)) for j in range(d)]
    majority = sign(sum(signs))
    out = []
    for j in range(d):
        s = signs[j] if signs[j] != 0 else majority
        agree = [tr[j] for tr in trimmed if (tr[j] > 0 if s > 0 else tr[j] < 0)]
        total = sum(agree)
        out.append(
            flat_base[j] + scale * (total / max(len(agree), 1) if merge_func == "mean" else total)
        )
    return out


@pytest.mark.parametrize("density,merge_func", [(0.2, "mean"), (0.5, "sum"), (1.0, "mean")])
def test_ties_matches_loops(zoo, tmp_path, density, merge_func):
    base_dir, experts = zoo
    keys = sorted(backbone_state(base_dir))
    base, flat_base, taus = flat_task_vectors(base_dir, experts, keys)
    method = method_from_name("ties", density=density, merge_func=merge_func, scale=0.8)
    merge_models(method, base_dir, experts, tmp_path / "ties", progress=False)
    expected = reference_ties(flat_base, taus, density, 0.8, merge_func)
    assert_matches(tmp_path / "ties", unflatten(expected, base, keys), keys)


def test_trim_is_global_not_per_tensor(zoo, tmp_path):
    """A tensor that moved 10x more keeps nearly all its entries under a global top-20% trim."""
    base_dir, experts = zoo
    base = backbone_state(base_dir)
    loud = load_model(experts[0])
    key = "backbone.blocks.0.mlp.fc1.weight"
    with torch.no_grad():
        w = loud.state_dict()[key]
        w.copy_(base[key] + 10 * (w - base[key]))
    save_model(loud, tmp_path / "loud")
    method = method_from_name("ties", density=0.2)
    merge_models(method, base_dir, [tmp_path / "loud"], tmp_path / "one", progress=False)
    got = merged_state(tmp_path / "one")
    assert float((got[key] != base[key]).float().mean()) > 0.6  # a per-tensor trim: 0.2
    total = sum(int((got[k] != base[k]).sum()) for k in base)
    assert abs(total / sum(v.numel() for v in base.values()) - 0.2) < 0.01


def test_dare_keeps_rescaled_entries_and_is_seeded(zoo, tmp_path):
    base_dir, experts = zoo
    keys = sorted(backbone_state(base_dir))
    base, flat_base, taus = flat_task_vectors(base_dir, experts, keys)
    p, scale = 0.5, 0.3
    for seed, name in ((0, "a"), (0, "b"), (1, "c")):
        method = method_from_name("dare", drop=p, scale=scale, seed=seed)
        merge_models(method, base_dir, experts, tmp_path / name, progress=False)
    a, b, c = (merged_state(tmp_path / n) for n in "abc")
    assert all(torch.equal(a[k], b[k]) for k in keys)  # same seed, same merge
    assert any(not torch.equal(a[k], c[k]) for k in keys)  # another seed, other masks
    flat = [float(v) for k in keys for v in a[k].flatten()]
    hits = 0
    for j in range(len(flat)):  # each entry is the base plus a rescaled subset of the experts
        options = [
            flat_base[j] + scale * sum(taus[i][j] for i in subset) / (1 - p)
            for r in range(len(taus) + 1)
            for subset in itertools.combinations(range(len(taus)), r)
        ]
        assert min(abs(flat[j] - o) for o in options) < 2e-6, j
        hits += abs(flat[j] - flat_base[j]) > 0
    merge_models(
        method_from_name("dare", drop=0.0), base_dir, experts, tmp_path / "d0", progress=False
    )
    merge_models(
        method_from_name("task-arithmetic"), base_dir, experts, tmp_path / "ta", progress=False
    )
    d0, ta = merged_state(tmp_path / "d0"), merged_state(tmp_path / "ta")
    assert all(torch.equal(d0[k], ta[k]) for k in keys)


def test_dare_ties_without_drop_is_ties_without_trim(zoo, tmp_path):
    base_dir, experts = zoo
    keys = sorted(backbone_state(base_dir))
    base, flat_base, taus = flat_task_vectors(base_dir, experts, keys)
    merge_models(
        method_from_name("dare-ties", drop=0.0), base_dir, experts, tmp_path / "dt", progress=False
    )
    expected = reference_ties(flat_base, taus, 1.0, 1.0, "mean", trim=False)
    assert_matches(tmp_path / "dt", unflatten(expected, base, keys), keys)


def reference_doge_matrix(taus, eta, subspace, steps, lr, masks):
    """DOGE-TA for one matrix: closed-form gradient, explicit projector, Adam by its equations."""
    n = len(taus)
    m, cols = taus[0].shape
    r = min(m, cols)
    lambdas = [eta / math.sqrt(sum(float(v) ** 2 for v in t.flatten())) for t in taus]
    k_task = r // n
    u_cat = torch.zeros(m, r, dtype=torch.float64)
    for i, t in enumerate(taus):
        u_cat[:, i * k_task : (i + 1) * k_task] = torch.linalg.svd(t.double()).U[:, :k_task]
    u_c = torch.linalg.svd(u_cat).U[:, : r // subspace]
    projector = u_c @ u_c.T
    delta = torch.zeros(m, cols, dtype=torch.float64)
    first, second = torch.zeros_like(delta), torch.zeros_like(delta)
    tt = [t.double() for t in taus]
    for step in range(1, steps + 1):
        merged = sum(lam * t for lam, t in zip(lambdas, tt, strict=True)) + sum(lambdas) * delta
        grad = torch.zeros_like(delta)
        for t in tt:
            for row in range(m):
                gap = float(t[row] @ (t[row] - merged[row]))
                grad[row] += -2 * sum(lambdas) * gap * t[row]
        grad = grad - projector @ grad
        first = 0.9 * first + 0.1 * grad
        second = 0.999 * second + 0.001 * grad**2
        m_hat, v_hat = first / (1 - 0.9**step), second / (1 - 0.999**step)
        delta = delta - lr * m_hat / (v_hat.sqrt() + 1e-8)
    return sum(lam * (t + delta) * mk for lam, t, mk in zip(lambdas, tt, masks, strict=True))


def test_doge_matches_reference_and_keeps_norms_and_embeddings(zoo, tmp_path):
    base_dir, experts = zoo
    full = experts[:3]  # every full expert changes every matrix
    eta, subspace, steps, lr, keep = 0.07, 2, 25, 1e-3, 0.3
    method = method_from_name("doge", eta=eta, subspace=subspace, steps=steps, lr=lr, mask=keep)
    merge_models(method, base_dir, full, tmp_path / "doge", progress=False)
    base = backbone_state(base_dir)
    got = merged_state(tmp_path / "doge")
    matrices = sorted(
        k for k in base if ".blocks." in k and k.endswith("weight") and base[k].ndim == 2
    )
    assert matrices == [
        f"backbone.blocks.{i}.{m}.weight"
        for i in range(2)
        for m in ("attn.proj", "attn.qkv", "mlp.fc1", "mlp.fc2")
    ]
    for k in base:  # norms, biases, embeddings, patch projection: the base's values
        if k not in matrices:
            assert torch.equal(got[k], base[k]), k
    experts_sd = [backbone_state(e) for e in full]
    taus = {k: [e[k] - base[k] for e in experts_sd] for k in matrices}
    masks = {k: [] for k in matrices}
    for i in range(len(full)):  # global top-30% per task, by a sort over all matrices
        values = sorted(abs(float(v)) for k in matrices for v in taus[k][i].flatten())
        threshold = values[len(values) - int(len(values) * keep) - 1]
        for k in matrices:
            masks[k].append(taus[k][i].abs() >= threshold)
    for k in matrices:
        expected = base[k].double() + reference_doge_matrix(
            taus[k], eta, subspace, steps, lr, masks[k]
        )
        torch.testing.assert_close(got[k].double(), expected, rtol=0, atol=5e-6, msg=k)


def test_doge_gradient_is_orthogonal_to_shared_subspace_and_loss_falls():
    g = torch.Generator().manual_seed(0)
    shared = torch.randn(12, 2, generator=g)
    # Fine-tuning-sized task vectors (entries ~1e-3): at lr 1e-4 Delta can move as far as tau.
    taus = [
        1e-3 * (shared @ torch.randn(2, 10, generator=g) + 0.3 * torch.randn(12, 10, generator=g))
        for _ in range(3)
    ]
    lambdas = doge.coefficients(taus, 0.07)
    basis = doge.shared_basis(taus, subspace=3)
    assert basis.shape == (12, 10 // 3)
    torch.testing.assert_close(basis.T @ basis, torch.eye(3), atol=1e-5, rtol=0)
    seen = []
    delta, losses = doge.optimise_delta(
        torch.stack(taus), lambdas, basis, steps=400, lr=1e-4, on_grad=seen.append
    )
    assert len(seen) == 400
    for grad in seen:  # every step moves against a gradient with no shared-subspace component
        assert float((basis.T @ grad).abs().max()) < 1e-5 * max(float(grad.abs().max()), 1e-12)
    assert losses[-1] < 0.5 * losses[0]


def test_closed_form_gradient_matches_autograd_of_the_loss():
    g = torch.Generator().manual_seed(1)
    taus = torch.randn(3, 7, 5, generator=g)
    lambdas = doge.coefficients(list(taus), 0.07)
    delta = torch.randn(7, 5, generator=g, requires_grad=True)
    loss = doge.surrogate_loss(delta, taus, lambdas)
    loss.backward()
    merged0 = (lambdas[:, None, None] * taus).sum(0)
    fixed = (taus * (taus - merged0)).sum(-1)
    closed_loss, closed_grad = doge.surrogate_grad(delta.detach(), taus, lambdas, fixed)
    torch.testing.assert_close(closed_loss, loss.detach(), rtol=1e-5, atol=0)
    torch.testing.assert_close(closed_grad, delta.grad, rtol=1e-4, atol=1e-6)


def test_merge_is_deterministic(zoo, tmp_path):
    base_dir, experts = zoo
    for name in ("a", "b"):
        method = method_from_name("doge", steps=5)
        merge_models(method, base_dir, experts, tmp_path / name, progress=False)
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (
        tmp_path / "b" / "model.safetensors"
    ).read_bytes()


def test_lora_expert_task_vector_is_the_exact_update(zoo, tmp_path):
    base_dir, experts = zoo
    merge_models(
        method_from_name("task-arithmetic", scale=1.0),
        base_dir,
        experts[3:],
        tmp_path / "l",
        progress=False,
    )
    expert = load_model(experts[3])
    base, got = backbone_state(base_dir), merged_state(tmp_path / "l")
    for path, layer in lora.lora_layers(expert.backbone).items():
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        explicit = base[f"backbone.{path}.weight"] + 2.0 * b @ a  # alpha 4 / r 2
        torch.testing.assert_close(got[f"backbone.{path}.weight"], explicit, rtol=0, atol=1e-6)
    untouched = [k for k in base if "blocks" not in k or "norm" in k]
    assert all(torch.equal(got[k], base[k]) for k in untouched)


def test_merged_model_keeps_every_expert_head_and_records_provenance(zoo, tmp_path):
    base_dir, experts = zoo
    merge_models(method_from_name("ties"), base_dir, experts, tmp_path / "m", progress=False)
    model = load_model(tmp_path / "m")
    assert model.tasks == ["t0", "t1", "t2", "lora"]
    for e in experts:
        own = load_model(e)
        key = own.active_head
        torch.testing.assert_close(model.heads[key].weight, own.heads[key].weight)
    import json

    made_by = json.loads((tmp_path / "m" / "config.json").read_text())["made_by"]
    assert made_by["method"] == "ties" and made_by["settings"]["density"] == 0.2
    assert [len(e["sha256"]) for e in made_by["experts"]] == [64] * 4


def test_cli_merge_and_eval_each_task(zoo, tmp_path, capsys):
    from lorex.cli import main

    base_dir, experts = zoo
    out = tmp_path / "merged"
    args = ["merge", "--method", "dare-ties", "--base", str(base_dir), "--experts"]
    assert main([*args, *map(str, experts), "--out", str(out), "--drop", "0.3", "--seed", "4"]) == 0
    made_by = load_model(out)  # loads, with every head
    assert made_by.tasks == ["t0", "t1", "t2", "lora"]
    import json

    settings = json.loads((out / "config.json").read_text())["made_by"]["settings"]
    assert settings == {
        "drop": 0.3,
        "scale": 1.0,
        "merge_func": "mean",
        "seed": 4,
        "zero_sign": "majority",
    }


@pytest.mark.parametrize(
    "break_it,needle",
    [
        ("shape", "tensor 'backbone.blocks.0.attn.qkv.weight' is torch.float32 (24, 9)"),
        ("missing", "missing tensor 'backbone.blocks.0.mlp.fc2.bias'"),
        ("dtype", "tensor 'backbone.norm.weight' is torch.float16"),
        ("base", "fine-tuned from"),
    ],
)
def test_experts_that_do_not_fit_are_refused_in_one_line(zoo, tmp_path, capsys, break_it, needle):
    from safetensors.torch import load_file, save_file

    from lorex.cli import main

    base_dir, experts = zoo
    import shutil

    bad = tmp_path / "bad"
    if break_it == "base":  # a LoRA expert whose base is another model
        other_base, other = make_experts(tmp_path / "other", n_full=0)
        tensors = load_file(other_base / "model.safetensors")
        tensors["backbone.norm.bias"] = tensors["backbone.norm.bias"] + 1
        save_file(tensors, other_base / "model.safetensors")
        shutil.copytree(other[0], bad)
        import json

        config = json.loads((bad / "config.json").read_text())
        config["base"]["sha256"] = None  # the base is found, but it is not ours
        config["base"]["path"] = str(other_base)
        (bad / "config.json").write_text(json.dumps(config))
    else:
        shutil.copytree(experts[0], bad)
        tensors = load_file(bad / "model.safetensors")
        key = {
            "shape": "backbone.blocks.0.attn.qkv.weight",
            "missing": "backbone.blocks.0.mlp.fc2.bias",
            "dtype": "backbone.norm.weight",
        }[break_it]
        if break_it == "shape":
            tensors[key] = torch.zeros(24, 9)
        elif break_it == "missing":
            del tensors[key]
        else:
            tensors[key] = tensors[key].half()
        save_file(tensors, bad / "model.safetensors")
    out = tmp_path / "out"
    code = main(
        ["merge", "--method", "ties", "--base", str(base_dir), "--experts"]
        + [str(experts[1]), str(bad), "--out", str(out)]
    )
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and needle in err and str(bad) in err, err
    assert not out.exists() and not list(tmp_path.glob(".out.*"))  # nothing written


@pytest.mark.slow  # fresh subprocesses
def test_streaming_memory_does_not_grow_with_the_number_of_experts(tmp_path):
    """Peak RSS of a merge (fresh subprocess each) with 2 and with 6 experts of a 36 MB model."""
    import json
    import subprocess
    import sys

    config = dict(type="vit", img_size=16, patch_size=8, embed_dim=256, depth=12, num_heads=4)
    base_dir, experts = make_experts(tmp_path / "big", config=config, n_full=6, with_lora=False)
    model_mb = (base_dir / "model.safetensors").stat().st_size / 2**20
    script = (  # merge_models samples the process's RSS while it runs (peak_added_mb)
        "import json, sys\n"
        "from lorex.merging import merge_models, method_from_name\n"
        "r = merge_models(method_from_name(sys.argv[1]), sys.argv[2], sys.argv[4:], sys.argv[3],"
        " progress=False)\n"
        "print(json.dumps(r['peak_added_mb']))\n"
    )
    added = {}
    for method in ("task-arithmetic", "ties"):
        for n in (2, 6):
            proc = subprocess.run(
                [sys.executable, "-c", script, method, str(base_dir), str(tmp_path / f"o{n}")]
                + [str(e) for e in experts[:n]],
                capture_output=True,
                text=True,
                check=True,
            )
            added[method, n] = json.loads(proc.stdout.strip().splitlines()[-1])
        # Loading every expert would add 4 more models (4 x model_mb); streaming adds a few
        # copies of one layer per expert (the largest layer here is 1 MB): measured 0-17 MB.
        assert added[method, 6] - added[method, 2] < model_mb, (added, model_mb)
    assert model_mb > 30


def test_hugging_face_clip_experts_merge_with_the_same_code(tmp_path):
    """save_pretrained folders in, a save_pretrained folder out, with the base's key names."""
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import load_file

    config = transformers.CLIPVisionConfig(**TINY_VIT)
    torch.manual_seed(0)
    base = transformers.CLIPVisionModel(config).eval()
    base.save_pretrained(tmp_path / "base")
    experts = []
    for i in range(3):
        expert = transformers.CLIPVisionModel(config).eval()
        expert.load_state_dict(base.state_dict())
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for p in expert.parameters():
                p.add_(0.01 * torch.randn(p.shape, generator=g))
        expert.save_pretrained(tmp_path / f"e{i}")
        experts.append(tmp_path / f"e{i}")
    for name, options in (("task-arithmetic", {"scale": 0.3}), ("doge", {"steps": 3})):
        out = tmp_path / name
        merge_models(
            method_from_name(name, **options), tmp_path / "base", experts, out, progress=False
        )
        merged = load_file(out / "model.safetensors")
        base_sd = load_file(tmp_path / "base" / "model.safetensors")
        assert list(merged) == sorted(base_sd)  # the base's names, nothing added
        reloaded = transformers.CLIPVisionModel.from_pretrained(out)  # a loadable folder
        assert isinstance(reloaded, transformers.CLIPVisionModel)
        expert_sds = [load_file(e / "model.safetensors") for e in experts]
        for key, value in base_sd.items():
            if name == "task-arithmetic":
                expected = value + 0.3 * sum(e[key] - value for e in expert_sds)
                torch.testing.assert_close(merged[key], expected, rtol=0, atol=1e-6)
            elif not (".layers." in key and key.endswith("weight") and value.ndim == 2):
                assert torch.equal(merged[key], value), key  # DOGE keeps these at theta_0
    doge_keys = json_load(tmp_path / "doge" / "merge.json")["merged_tensors"]
    assert doge_keys == 2 * 6  # q, k, v, out_proj, fc1, fc2 per layer


def json_load(path):
    import json

    return json.loads(Path(path).read_text())


def test_doge_auto_eta_is_task_arithmetic_sized(zoo, tmp_path):
    base_dir, experts = zoo
    rec = merge_models(
        method_from_name("doge", eta="auto", steps=2), base_dir, experts[:3], tmp_path / "d", False
    )
    base = backbone_state(base_dir)
    norms = [
        float((backbone_state(e)[k] - base[k]).norm())
        for e in experts[:3]
        for k in base
        if ".blocks." in k and k.endswith("weight") and base[k].ndim == 2
    ]
    assert rec["doge_eta"] == pytest.approx(0.3 * sum(norms) / len(norms), rel=1e-5)


def test_lora_expert_with_trained_biases_merges_them(zoo, tmp_path):
    base_dir, _ = zoo
    model = load_model(base_dir)
    del model.heads["pretrain"], model.head_info["pretrain"]
    model.add_head("biased", ["x", "y"])
    lora.add_adapter(model.backbone, lora.LoraConfig(r=2, bias="lora_only"))
    lora.mark_trainable(model.backbone, "default")
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.backbone.parameters():
            if p.requires_grad:  # lora_A, lora_B and the wrapped layers' biases
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    save_model(model, tmp_path / "biased", weights="delta", base_dir=base_dir)
    method = method_from_name("task-arithmetic", scale=1.0)
    merge_models(method, base_dir, [tmp_path / "biased"], tmp_path / "m", progress=False)
    expected = backbone_state(tmp_path / "biased")  # the expert itself, adapters folded
    got = merged_state(tmp_path / "m")
    assert any(
        not torch.equal(expected[k], backbone_state(base_dir)[k]) for k in got if "bias" in k
    )
    for k, v in expected.items():
        torch.testing.assert_close(got[k], v, rtol=0, atol=1e-6, msg=k)


def test_sharded_hugging_face_folders_and_pickled_ones(tmp_path):
    """A model.safetensors.index.json with two shards reads like one file; .bin is refused."""
    import json

    from safetensors.torch import load_file, save_file

    g = torch.Generator().manual_seed(0)
    weights = {"layers.0.fc.weight": torch.randn(3, 4, generator=g), "norm.bias": torch.zeros(3)}
    for name, shift in (("base", 0.0), ("e0", 1.0), ("e1", 3.0)):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({"model_type": "vit"}))
        shards = {"a.safetensors": ["layers.0.fc.weight"], "b.safetensors": ["norm.bias"]}
        for file, keys in shards.items():
            save_file({k: weights[k] + shift for k in keys}, folder / file)
        index = {"weight_map": {k: f for f, keys in shards.items() for k in keys}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    method = method_from_name("task-arithmetic", scale=0.5)
    merge_models(method, tmp_path / "base", [tmp_path / "e0", tmp_path / "e1"], tmp_path / "m")
    merged = load_file(tmp_path / "m" / "model.safetensors")
    for key, value in weights.items():
        torch.testing.assert_close(merged[key], value + 0.5 * (1.0 + 3.0))
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text(json.dumps({"model_type": "vit"}))
    (pickled / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(LorexError, match="reads safetensors only"):
        merge_models(method, tmp_path / "base", [pickled], tmp_path / "m2")
    assert not (tmp_path / "m2").exists()


# float32 SVDs of the tiny zoo's matrices against float64 references: errors of a few 1e-7 per
# entry, so agreement to 1e-5 is tight for updates of size 0.01-0.1.
SVD_ATOL = 1e-5


def _np_task_vectors(base_dir, experts):
    base = {k: v.double().numpy() for k, v in backbone_state(base_dir).items()}
    taus = [
        {k: v.double().numpy() - base[k] for k, v in backbone_state(e).items()} for e in experts
    ]
    return base, taus


@pytest.mark.parametrize("scale", [1.0, 1.5])
def test_iso_c_matches_a_numpy_reference(zoo, tmp_path, scale):
    import numpy as np

    base_dir, experts = zoo
    merge_models(
        method_from_name("iso-c", scale=scale), base_dir, experts, tmp_path / "iso", progress=False
    )
    base, taus = _np_task_vectors(base_dir, experts)
    reference = {}
    for key, theta0 in base.items():
        total = np.zeros_like(theta0)
        for tau in taus:
            total += tau[key]
        if theta0.ndim == 2:
            u, s, vh = np.linalg.svd(total, full_matrices=False)
            update = u @ np.diag(np.full(len(s), s.mean())) @ vh
            # the update's spectrum is flat: every singular value is the mean of the sum's
            np.testing.assert_allclose(np.linalg.svd(update, compute_uv=False), s.mean())
        else:
            update = total / len(taus)
        reference[key] = torch.from_numpy(theta0 + scale * update)
    got = merged_state(tmp_path / "iso")
    assert any(v.ndim == 2 for v in reference.values())
    for k, want in reference.items():
        torch.testing.assert_close(got[k].double(), want, rtol=0, atol=SVD_ATOL, msg=k)


def test_tsv_m_matches_a_scipy_polar_reference(zoo, tmp_path):
    import numpy as np
    from scipy.linalg import polar

    base_dir, experts = zoo
    merge_models(method_from_name("tsv-m"), base_dir, experts, tmp_path / "tsv", progress=False)
    base, taus = _np_task_vectors(base_dir, experts)
    n = len(taus)
    got = merged_state(tmp_path / "tsv")
    for key, theta0 in base.items():
        if theta0.ndim != 2:
            want = theta0 + sum(tau[key] for tau in taus) / n
        else:
            m, cols = theta0.shape
            r = min(m, cols)
            k = r // n
            u_hat, s_hat, v_hat = np.zeros((m, r)), np.zeros(r), np.zeros((r, cols))
            for i, tau in enumerate(taus):
                u, s, vh = np.linalg.svd(tau[key], full_matrices=False)
                for j in range(k):
                    u_hat[:, i * k + j] = u[:, j]
                    s_hat[i * k + j] = s[j]
                    v_hat[i * k + j, :] = vh[j, :]
            u_perp = polar(u_hat)[0]  # the unitary factor: nearest orthogonal matrix
            v_perp = polar(v_hat.T)[0].T
            want = theta0 + u_perp @ np.diag(s_hat) @ v_perp
            # the merged update keeps each task's top k singular values
            kept = np.sort(np.linalg.svd(want - theta0, compute_uv=False))[::-1][: n * k]
            np.testing.assert_allclose(kept, np.sort(s_hat)[::-1], rtol=1e-10)
        torch.testing.assert_close(
            got[key].double(), torch.from_numpy(want), rtol=0, atol=SVD_ATOL, msg=key
        )


def test_tsv_m_keeps_the_mean_for_matrices_thinner_than_the_task_count():
    from lorex.merging.methods.tsv_m import TsvM

    base = torch.zeros(2, 5)
    taus = torch.randn(3, 2, 5, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(TsvM().merge("w", base, taus.clone()), taus.mean(0))


def test_iso_c_and_tsv_m_are_deterministic(zoo, tmp_path):
    base_dir, experts = zoo
    for name in ("iso-c", "tsv-m"):
        for run in ("a", "b"):
            merge_models(method_from_name(name), base_dir, experts, tmp_path / name / run)
        assert (tmp_path / name / "a" / "model.safetensors").read_bytes() == (
            tmp_path / name / "b" / "model.safetensors"
        ).read_bytes()


def test_iso_c_and_tsv_m_keep_low_rank_updates_low_rank():
    """LoRA experts' task vectors are low-rank: neither method may add round-off directions."""
    from lorex.merging.methods.iso_c import IsoC
    from lorex.merging.methods.tsv_m import TsvM

    g = torch.Generator().manual_seed(0)
    # three rank-1 task vectors of a 12 x 9 matrix: r = 9, so TSV-M's k = 3 > each rank
    taus = torch.stack([torch.outer(torch.randn(12, generator=g), torch.randn(9, generator=g))])
    taus = torch.cat(
        [
            taus,
            *[
                torch.outer(torch.randn(12, generator=g), torch.randn(9, generator=g))[None]
                for _ in range(2)
            ],
        ]
    )
    base = torch.zeros(12, 9)
    iso = IsoC().merge("w", base, taus.clone())
    s_sum = torch.linalg.svdvals(taus.sum(0).double())
    s_iso = torch.linalg.svdvals(iso.double())
    assert int((s_iso > 1e-4 * s_iso[0]).sum()) == 3  # the sum's rank, no more
    torch.testing.assert_close(s_iso[:3], s_sum[:3].mean().expand(3), rtol=1e-5, atol=0)

    # TSV-M by hand from the three nonzero triplets: [u_1 u_2 u_3] and [v_1 v_2 v_3] made
    # orthogonal (polar factor), each keeping its own singular value
    us, ss, vs = [], [], []
    for tau in taus.double():
        u, s, vh = torch.linalg.svd(tau)
        us.append(u[:, 0])
        ss.append(s[0])
        vs.append(vh[0])
    p, _, qh = torch.linalg.svd(torch.stack(us, 1), full_matrices=False)
    p2, _, qh2 = torch.linalg.svd(torch.stack(vs, 0), full_matrices=False)
    want = (p @ qh) @ torch.diag(torch.stack(ss)) @ (p2 @ qh2)
    got = TsvM().merge("w", base, taus.clone())
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-5)


def reference_wudi_matrix(taus, steps, lr):
    """WUDI for one matrix: the loss's gradient by entry-wise loops, Adam by its equations."""
    tt = [t.double() for t in taus]
    m, cols = tt[0].shape
    weights = [1.0 / sum(float(v) ** 2 for v in t.flatten()) for t in tt]
    merged = sum(tt)
    first, second = torch.zeros_like(merged), torch.zeros_like(merged)
    for step in range(1, steps + 1):
        grad = torch.zeros_like(merged)
        for w, t in zip(weights, tt, strict=True):
            # L_t = w ||(merged - t) t^T||^2; d/d merged[a, b] = 2 w sum_c E[a, c] t[c, b]
            gap = merged - t
            e = [[float(gap[a] @ t[c]) for c in range(m)] for a in range(m)]
            for a in range(m):
                for b in range(cols):
                    grad[a, b] += 2 * w * sum(e[a][c] * float(t[c, b]) for c in range(m))
        first = 0.9 * first + 0.1 * grad
        second = 0.999 * second + 0.001 * grad**2
        m_hat, v_hat = first / (1 - 0.9**step), second / (1 - 0.999**step)
        merged = merged - lr * m_hat / (v_hat.sqrt() + 1e-8)
    return merged


def test_wudi_matches_a_loop_reference_and_lowers_its_loss(zoo, tmp_path):
    from lorex.merging.methods.wudi import interference_loss

    base_dir, experts = zoo
    steps, lr = 15, 2e-3
    method = method_from_name("wudi", steps=steps, lr=lr, scale=0.8)
    merge_models(method, base_dir, experts, tmp_path / "wudi", progress=False)
    base = backbone_state(base_dir)
    experts_sd = [backbone_state(e) for e in experts]
    got = merged_state(tmp_path / "wudi")
    matrices = {k for k in base if ".blocks." in k and k.endswith("weight") and base[k].ndim == 2}
    assert len(matrices) == 8
    for k, theta0 in base.items():
        taus = [e[k].double() - theta0.double() for e in experts_sd]
        if k in matrices:
            # the LoRA expert's task vector on its adapted matrices is low-rank, elsewhere zero
            nonzero = [t for t in taus if float(t.abs().max()) > 0]
            update = reference_wudi_matrix(nonzero, steps, lr)
            start = sum(taus)
            stacked = torch.stack(taus)
            assert interference_loss(update, stacked) < 0.9 * interference_loss(start, stacked)
        else:
            update = sum(taus) / len(taus)
        want = theta0.double() + 0.8 * update
        torch.testing.assert_close(got[k].double(), want, rtol=0, atol=2e-6, msg=k)


def test_wudi_loss_is_the_sum_written_out():
    from lorex.merging.methods.wudi import interference_loss

    g = torch.Generator().manual_seed(1)
    taus = torch.randn(3, 4, 5, generator=g, dtype=torch.float64)
    taus[2] = 0  # an expert that left this matrix alone adds nothing
    merged = torch.randn(4, 5, generator=g, dtype=torch.float64)
    want = 0.0
    for t in taus[:2]:
        norm_sq = sum(float(v) ** 2 for v in t.flatten())
        for a in range(4):
            for c in range(4):
                want += sum((merged[a, b] - t[a, b]) * t[c, b] for b in range(5)) ** 2 / norm_sq
    torch.testing.assert_close(interference_loss(merged, taus), torch.tensor(float(want)).double())


@pytest.mark.parametrize("common", [0.8, 0.5])
def test_iso_cts_matches_a_numpy_reference(zoo, tmp_path, common):
    import numpy as np
    from scipy.linalg import polar

    base_dir, experts = zoo
    full = experts[:3]  # full-rank sums: the official allocation over min(shape)
    method = method_from_name("iso-cts", common=common, scale=1.5)
    merge_models(method, base_dir, full, tmp_path / "cts", progress=False)
    base, taus = _np_task_vectors(base_dir, full)
    n = len(taus)
    got = merged_state(tmp_path / "cts")
    for key, theta0 in base.items():
        if theta0.ndim != 2:
            update = sum(tau[key] for tau in taus) / n
        else:
            r = min(theta0.shape)
            per_task = min(r // n, round((r - int(r * common)) / n))
            k_c = r - n * per_task
            u, s, vh = np.linalg.svd(sum(tau[key] for tau in taus), full_matrices=False)
            u_cols, v_rows, values = list(u[:, :k_c].T), list(vh[:k_c]), list(s[:k_c])
            for tau in taus:
                residual = tau[key].copy()
                for j in range(k_c):  # project out each common direction in turn
                    residual -= np.outer(u[:, j], u[:, j] @ tau[key])
                ut, st, vth = np.linalg.svd(residual, full_matrices=False)
                u_cols += list(ut[:, :per_task].T)
                v_rows += list(vth[:per_task])
                values += list(st[:per_task])
            assert len(values) == r
            u_perp = polar(np.stack(u_cols, 1))[0]
            v_perp = polar(np.stack(v_rows, 0).T)[0].T
            update = u_perp @ v_perp * np.mean(values)
            np.testing.assert_allclose(np.linalg.svd(update, compute_uv=False), np.mean(values))
        want = torch.from_numpy(theta0 + 1.5 * update)
        torch.testing.assert_close(got[key].double(), want, rtol=0, atol=SVD_ATOL, msg=key)


def test_iso_cts_keeps_low_rank_updates_low_rank():
    """Three rank-2 (LoRA-like) task vectors of a 12 x 9 matrix: the sum has rank 6 < 9, and the
    update must have rank 6 with one flat singular value, not 9 with round-off directions."""
    from lorex.merging.methods.iso_cts import IsoCts

    g = torch.Generator().manual_seed(0)
    taus = torch.stack(
        [torch.randn(12, 2, generator=g) @ torch.randn(2, 9, generator=g) for _ in range(3)]
    )
    got = IsoCts(IsoCts.Options(common=0.5)).merge("w", torch.zeros(12, 9), taus.clone())
    s = torch.linalg.svdvals(got.double())
    assert int((s > 1e-4 * s[0]).sum()) == 6
    # rank 6: 3 common directions of the sum, then 1 per task from what the common ones miss
    u, s_sum, _ = torch.linalg.svd(taus.sum(0).double())
    u_c = u[:, :3]
    kept = list(s_sum[:3])
    for tau in taus.double():
        kept.append(torch.linalg.svdvals(tau - u_c @ (u_c.T @ tau))[0])
    torch.testing.assert_close(s[:6], torch.stack(kept).mean().expand(6), rtol=1e-5, atol=0)


def test_iso_cts_and_wudi_are_deterministic(zoo, tmp_path):
    base_dir, experts = zoo
    for name, options in (("iso-cts", {}), ("wudi", {"steps": 5, "lr": 1e-3})):
        for run in ("a", "b"):
            merge_models(
                method_from_name(name, **options), base_dir, experts, tmp_path / name / run
            )
        assert (tmp_path / name / "a" / "model.safetensors").read_bytes() == (
            tmp_path / name / "b" / "model.safetensors"
        ).read_bytes()


def test_wudi_closed_form_gradient_is_the_losss_autograd_gradient():
    from lorex.merging.methods.wudi import gradient_terms, interference_loss, inverse_square_norms

    g = torch.Generator().manual_seed(2)
    for shape in ((6, 3), (3, 6)):  # out < in and out > in
        taus = torch.randn(4, *shape, generator=g, dtype=torch.float64)
        taus[1] = 0  # an expert that left this matrix alone
        merged = torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True)
        weights = inverse_square_norms(taus)
        interference_loss(merged, taus, weights).backward()
        a, b = gradient_terms(taus, weights)
        torch.testing.assert_close(2 * (merged.detach() @ a - b), merged.grad, rtol=1e-12, atol=0)
