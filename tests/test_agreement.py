"""Chance levels and quick-versus-full ordering, against hand-worked cases and numpy."""

import math

import numpy as np
import pytest

from lorex.metrics.agreement import (
    binomial_se,
    chance_check,
    mean_se,
    ordering_agreement,
    separable,
)


def test_standard_errors_match_their_closed_forms():
    assert binomial_se(0.5, 100) == pytest.approx(0.05)
    assert binomial_se(0.9, 900) == pytest.approx(0.01)
    values = np.random.default_rng(0).random(37)
    assert mean_se(list(values)) == pytest.approx(values.std(ddof=1) / math.sqrt(37))
    assert mean_se([0.3]) == math.inf


def test_separable_uses_two_standard_errors_of_the_difference():
    se = 0.01 / math.sqrt(2)  # the difference's standard error is then exactly 0.01
    assert separable(0.5, 0.5201, se, se)
    assert not separable(0.5, 0.5199, se, se)


def test_ordering_counts_agreeing_differing_and_unresolved_pairs():
    quick = {"a": 0.80, "b": 0.60, "c": 0.59, "d": 0.30}
    se = dict.fromkeys(quick, 0.01)
    full = {"a": 0.9, "b": 0.5, "c": 0.7, "d": 0.95, "only-full": 0.1}
    r = ordering_agreement(quick, se, full)
    # Brute force over every pair present in both.
    expect = {"agree": [], "differ": [], "within_noise": []}
    names = ["a", "b", "c", "d"]
    for i, x in enumerate(names):
        for y in names[i + 1 :]:
            if abs(quick[x] - quick[y]) <= 2 * math.hypot(0.01, 0.01):
                expect["within_noise"].append([x, y])
            elif (quick[x] > quick[y]) == (full[x] > full[y]):
                expect["agree"].append([x, y])
            else:
                expect["differ"].append([x, y])
    assert {k: r[k] for k in expect} == expect
    assert expect["within_noise"] == [["b", "c"]]
    assert expect["differ"] == [["a", "d"], ["b", "d"], ["c", "d"]]
    assert "2 of the 5 pairs" in r["line"] and "a vs d" in r["line"]


def test_a_run_whose_gaps_are_all_noise_says_so_in_one_line():
    quick = {"a": 0.101, "b": 0.100, "c": 0.099}
    r = ordering_agreement(quick, dict.fromkeys(quick, 0.02), {"a": 0.5, "b": 0.4, "c": 0.3})
    assert r["agree"] == r["differ"] == []
    assert r["line"].startswith("This quick run cannot order the methods")
    assert "\n" not in r["line"]


def test_no_full_results_is_said_not_guessed():
    r = ordering_agreement({"a": 0.5}, {"a": 0.01}, None, "benchmarks/results/x/results.json")
    assert "No full-bench results" in r["line"] and "x/results.json" in r["line"]


def test_chance_check_names_what_falls_below():
    ok = chance_check({"a": 0.25, "b": 0.9}, chance=0.1)
    assert ok["below"] == [] and "lowest 25.0%" in ok["line"]
    low = chance_check({"a": 0.19, "b": 0.9}, chance=0.1)
    assert low["below"] == ["a"] and "a 19.0%" in low["line"]


def _losa_block(acc, seconds, memory, cached=None, epochs=5):
    tasks = {"digits/mnistm": {m: {"accuracy": a} for m, a in acc.items()}}
    block = {"settings": {"test_samples": 1000, "epochs": epochs}, "tasks": tasks}
    for m in acc:
        block[m] = {"train_seconds": seconds[m], "peak_train_mb": memory[m]}
    if cached is not None:
        block["losa"].update(train_seconds_cached=cached[0], cache_seconds=cached[1])
    return block


def test_losa_quick_checks_compare_order_and_ratio_sides_with_the_full_bench():
    from lorex.experiments.losa_report import quick_checks

    def run(size, acc, seconds, memory, cached, epochs):
        methods = ("full", "lora", "losa")
        block = _losa_block(
            dict(zip(methods, acc, strict=True)),
            dict(zip(methods, seconds, strict=True)),
            dict(zip(methods, memory, strict=True)),
            cached,
            epochs,
        )
        return {"settings": {"sizes": [size, "base"]}, size: block}

    quick = run("micro", (0.45, 0.40, 0.55), (10.0, 9.0, 3.0), (80, 60, 20), (2.0, 0.5), 5)
    full = run("tiny", (0.33, 0.28, 0.56), (287.0, 299.0, 129.0), (579, 617, 286), (39.3, 10.0), 10)
    checks = quick_checks(quick, full, "full.json")
    order = checks["tasks"]["digits/mnistm"]["order"]
    assert order["differ"] == [] and len(order["agree"]) == 3
    assert checks["quick_ratios"]["time per epoch"] == pytest.approx(3.0 / 9.0)
    assert checks["full_ratios"]["time per epoch"] == pytest.approx(129.0 / 299.0)
    assert checks["quick_ratios"]["time per epoch with the cache"] == pytest.approx(
        (2.0 - 0.5) / 9.0
    )
    assert "contradicts" not in checks["lines"][-1]
    # A quick run where LoSA is slower per epoch than LoRA contradicts the full bench.
    quick["micro"]["losa"]["train_seconds"] = 12.0
    assert "time per epoch 1.33x (contradicts" in quick_checks(quick, full, "f")["lines"][-1]
    assert "No full-bench results" in quick_checks(quick, None, "f")["lines"][0]


def test_merge_quick_checks_read_each_expert_kind_of_the_full_results():
    from lorex.experiments.merge_bench import merge_quick_checks

    def kind(scores):
        out = {"experts": {"a": 90.0, "b": 80.0}}
        for m, (a, b) in scores.items():
            out[m] = {"per_task": {"a": a, "b": b}, "average": (a + b) / 2}
        return out

    quick = {
        "full": kind({"ties": (60.0, 50.0), "average": (40.0, 30.0)}),
        "lora": kind({"ties": (15.0, 18.0), "average": (70.0, 60.0)}),
    }
    full = kind({"ties": (70.0, 60.0), "average": (50.0, 40.0)})
    full["lora"] = kind({"ties": (80.0, 70.0), "average": (60.0, 50.0)})
    checks = merge_quick_checks(quick, full, {"a": 1000, "b": 1000}, "full.json")
    assert checks["kinds"]["full"]["order"]["agree"] == [["ties", "average"]]
    assert checks["kinds"]["lora"]["order"]["differ"] == [["ties", "average"]]
    assert checks["kinds"]["lora"]["chance"]["below"] == ["ties"]  # 16.5% < 20%


def test_cross_modal_quick_checks_use_each_tasks_classes_and_images():
    from lorex.experiments.cross_modal_bench import quick_checks

    results = {"t": {"source-only": {"accuracy": 0.30}, "socket": {"accuracy": 0.45}}}
    checks = quick_checks(results, {"t": {"images": 900, "classes": 6}}, None, "x")
    assert checks["tasks"]["t"]["chance"]["below"] == ["source-only"]  # under 2/6
    assert "900 target images" in checks["lines"][0]


def test_chance_check_says_when_the_full_bench_is_below_the_bar_too():
    r = chance_check({"a": 0.2, "b": 0.3, "c": 0.9}, 1 / 6, full={"a": 0.25, "b": 0.5})
    assert r["below"] == ["a", "b"] and r["also_in_full"] == ["a"]
    assert "below it in the full bench too: a 25.0%" in r["line"] and "b 50.0%" not in r["line"]
