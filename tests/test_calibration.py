"""Calibration: budget thresholds on planted outliers, the measured skip list (per layer and per
group) on a planted harmful projection, JSON round trip, CLI."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_cli import WORDS, tiny_checkpoint  # noqa: F401  (the fixture)

import jint8
from jint8 import cli
from jint8.calibration import (
    budget_threshold,
    calibrate,
    calibrate_layers,
    calibrate_model,
    config_from_dict,
    config_to_json,
    layers_to_config,
    load_int8_config,
)
from jint8.cli.common import load_model
from jint8.errors import InvalidConfigError
from jint8.evaluation import amplify_outlier_features, inspect_outliers, kl_divergence
from jint8.models import LlamaConfig, LlamaForCausalLM
from jint8.sensitivity import Sensitivity, choose_skip_modules, module_sensitivity, partial_int8_kl

CONFIG = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                     num_kv_heads=2, head_dim=16, dtype=jnp.float32)
PLANTED = [3, 30, 41]


@pytest.fixture(scope="module")
def planted_llama():
    """A tiny float Llama whose q/k/v and gate/up inputs carry features 3, 30, 41 at 64x their size."""
    model = LlamaForCausalLM(CONFIG)
    params = model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
    tokens = np.random.default_rng(1).integers(0, CONFIG.vocab_size, 96)
    return model, amplify_outlier_features(params, PLANTED, 64.0), tokens


HARMFUL = "model/layers_1/mlp/up_proj"


@pytest.fixture(scope="module")
def harmful_llama():
    """A tiny float Llama with one weight row of HARMFUL at 100x its kernel's absmax: every output
    channel's int8 scale is set by that row, so the other rows round to about two levels."""
    model = LlamaForCausalLM(CONFIG)
    params = model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
    tokens = np.random.default_rng(1).integers(0, CONFIG.vocab_size, 96)
    node = params
    for name in HARMFUL.split("/"):
        node = node[name]
    node["kernel"] = node["kernel"].at[7].set(100 * jnp.abs(node["kernel"]).max())
    return model, params, tokens


@settings(deadline=None, max_examples=50)
@given(windows=st.integers(1, 4), k=st.integers(2, 40), capacity=st.integers(0, 45), seed=st.integers(0, 2**31))
def test_budget_threshold_is_the_lowest_that_fits_the_capacity(windows, k, capacity, seed):
    rng = np.random.default_rng(seed)
    column_absmax = np.abs(rng.standard_normal((windows, k)) * rng.choice([1, 50], (windows, k))).astype(np.float32)
    column_absmax[:, rng.integers(0, k)] = column_absmax[0, 0]  # ties across windows
    threshold = budget_threshold(column_absmax, capacity)
    counts = (column_absmax >= np.float32(threshold)).sum(axis=1)
    assert threshold > 0 and counts.max() <= capacity
    if capacity < k:  # the next float below lets one window exceed the capacity
        lower = np.nextafter(np.float32(threshold), np.float32(0))
        assert (column_absmax >= lower).sum(axis=1).max() > capacity


def test_calibrated_layers_keep_planted_outliers_within_capacity(planted_llama):
    model, params, tokens = planted_llama
    layers = calibrate_layers(model, params, tokens, window=32, outlier_budget=0.1, max_threshold=1e6,
                              base=jint8.Int8Config(min_size=0))
    assert len(layers) == 2 * 7 + 1  # and the untied lm_head
    windows = [tokens[i : i + 32][None] for i in range(0, 96, 32)]
    seen = {s.path: s for s in inspect_outliers(model, params, windows)}
    for layer in layers:
        columns = seen[layer.path].column_absmax  # measured independently of the calibration
        assert layer.capacity == int(np.ceil(0.1 * layer.num_features))
        assert (columns >= layer.threshold).sum(axis=1).max() <= layer.capacity == max(layer.capacity, layer.outlier_columns)
        if layer.group in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"):
            # the planted features are the largest of these inputs: they must go through 16 bits
            assert (columns[:, PLANTED] >= layer.threshold).all(), layer.path


def test_max_threshold_caps_and_raises_capacity(planted_llama):
    model, params, tokens = planted_llama
    layers = calibrate_layers(model, params, tokens, window=32, outlier_budget=1 / 64, max_threshold=0.05,
                              base=jint8.Int8Config(min_size=0))
    for layer in layers:
        assert layer.threshold <= 0.05
        assert layer.capacity >= layer.outlier_columns > 1  # one column of budget cannot hold them


def test_calibrated_config_reaches_every_int8_weight(planted_llama):
    model, params, tokens = planted_llama
    config = calibrate(model, params, tokens, window=32, outlier_budget=0.1, base=jint8.Int8Config(min_size=0))
    layers = {layer.path: layer for layer in calibrate_layers(model, params, tokens, window=32, outlier_budget=0.1,
                                                              base=jint8.Int8Config(min_size=0))}
    quantized = jint8.quantize_params(params, config)
    found = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(quantized, is_leaf=lambda x: isinstance(x, jint8.Int8Weight))[0]:
        if isinstance(leaf, jint8.Int8Weight):
            name = "/".join(str(k.key) for k in path[:-1])
            assert (leaf.threshold, leaf.outlier_capacity) == (layers[name].threshold, layers[name].capacity)
            found += 1
    assert found == len(layers)


def test_choose_skip_modules_takes_the_most_harmful_per_weight_within_budget():
    # SmolLM2's measured group shape: v_proj has 3 % of the weights and KL like the 25 % groups
    flat = [Sensitivity(g, 0.001 * 3 * f, f) for g, f in (("q", 0.1), ("o", 0.1), ("gate", 0.25), ("up", 0.25))]
    uniform = flat + [Sensitivity("v", 0.003 * 0.03, 0.03)]
    assert choose_skip_modules(uniform, skip_budget=0.05) == ()  # nothing stands out
    sens = flat + [Sensitivity("v", 0.0018, 0.03), Sensitivity("down", 0.0031, 0.25)]
    assert choose_skip_modules(sens, skip_budget=0.05) == ("v",)
    assert choose_skip_modules(sens, skip_budget=0.02) == ()  # v's weights do not fit
    assert choose_skip_modules(sens, skip_budget=0.0) == ()
    more = sens + [Sensitivity("k", 0.0012, 0.03)]
    assert choose_skip_modules(more, skip_budget=0.1) == ("v", "k")  # most KL per weight first
    assert choose_skip_modules(more, skip_budget=0.05) == ("v",)
    # a module that does not fit is passed over for a smaller one that does (greedy knapsack)
    big_first = [Sensitivity("a", 0.05, 0.04), Sensitivity("b", 0.01, 0.01)] + flat
    assert choose_skip_modules(big_first, skip_budget=0.03) == ("b",)


@settings(deadline=None, max_examples=50)
@given(st.lists(st.tuples(st.floats(0, 1), st.floats(1e-4, 0.2)), min_size=1, max_size=40),
       st.floats(0, 0.5), st.floats(0, 3))
def test_choose_skip_modules_never_exceeds_the_budget(entries, skip_budget, outlier_factor):
    sensitivity = [Sensitivity(f"m{i}", kl, fraction) for i, (kl, fraction) in enumerate(entries)]
    chosen = choose_skip_modules(sensitivity, skip_budget=skip_budget, outlier_factor=outlier_factor)
    fractions = {s.module: s.weight_fraction for s in sensitivity}
    assert sum(fractions[m] for m in chosen) <= skip_budget + 1e-12
    assert len(set(chosen)) == len(chosen)


@pytest.fixture(scope="module")
def harmful_calibration(harmful_llama):
    model, params, tokens = harmful_llama
    layers = calibrate_layers(model, params, tokens, window=32, base=jint8.Int8Config(min_size=0))
    return layers, layers_to_config(layers, jint8.Int8Config(min_size=0))


def test_partial_int8_kl_equals_the_kl_of_the_quantized_trees(harmful_llama, harmful_calibration):
    model, params, tokens = harmful_llama
    _, config = harmful_calibration
    windows = [tokens[:32][None], tokens[32:64][None]]
    int8_params = jint8.quantize_params(params, config)
    everything = [HARMFUL, "model/layers_0/self_attn/v_proj", "model/layers_1/mlp/down_proj", "lm_head"]
    nothing, one, several = partial_int8_kl(model, params, int8_params, [[], [HARMFUL], everything], windows)
    assert nothing == 0.0  # the unselected projections compute exactly the float reference

    def only(paths):  # the same selection the usual way: quantize_params skipping everything else
        keep = "|".join(p.replace("/", "\\/") for p in paths)
        return jint8.quantize_params(params, dataclasses.replace(config, skip_modules=(f"re:^(?!({keep})$)",)))

    # float32 model: the two compiled programs differ only in fusion, so in the last few ulps
    assert one == pytest.approx(kl_divergence(model, params, only([HARMFUL]), windows), rel=1e-4)
    assert several == pytest.approx(kl_divergence(model, params, only(everything), windows), rel=1e-4)


def test_per_layer_sensitivity_picks_the_planted_harmful_projection(harmful_llama, harmful_calibration):
    model, params, tokens = harmful_llama
    _, config = harmful_calibration
    sensitivity = module_sensitivity(model, params, tokens, config, window=32, max_windows=2)
    assert len(sensitivity) == 2 * 7 + 1  # every int8 projection, the untied lm_head too
    assert sum(s.weight_fraction for s in sensitivity) == pytest.approx(1.0)
    worst = max(sensitivity, key=lambda s: s.harm_per_weight)
    assert worst.module == HARMFUL
    fraction = worst.weight_fraction  # 64 x 128 of the 79936 kernel elements
    assert fraction == pytest.approx(64 * 128 / 79936)
    assert HARMFUL in choose_skip_modules(sensitivity, skip_budget=fraction)
    assert HARMFUL not in choose_skip_modules(sensitivity, skip_budget=0.9 * fraction)  # does not fit
    # its twin in the other layer is ordinary: the per-group view would have to take both or neither
    twin = next(s for s in sensitivity if s.module == "model/layers_0/mlp/up_proj")
    assert twin.harm_per_weight < worst.harm_per_weight / 10


def test_sensitivity_of_a_bfloat16_model_is_measured_in_float32(harmful_llama, harmful_calibration):
    model, params, tokens = harmful_llama
    _, config = harmful_calibration
    model16 = LlamaForCausalLM(dataclasses.replace(CONFIG, dtype=jnp.bfloat16))
    params16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    exact = {s.module: s.kl for s in module_sensitivity(model, params16, tokens, config, window=32, max_windows=1)}
    got = {s.module: s.kl for s in module_sensitivity(model16, params16, tokens, config, window=32, max_windows=1)}
    assert got == pytest.approx(exact, rel=1e-4)  # the float32 pass, not the bf16 model's own


def test_calibration_with_a_per_layer_skip_budget_keeps_only_that_projection_in_float(harmful_llama):
    model, params, tokens = harmful_llama
    base = jint8.Int8Config(min_size=0)
    result = calibrate_model(model, params, tokens, window=32, skip_budget=0.15, sensitivity_windows=1,
                             base=base, progress=False)
    assert HARMFUL in result.config.skip_modules
    skipped = {m: s.weight_fraction for s in result.sensitivity for m in result.config.skip_modules if m == s.module}
    assert sum(skipped.values()) <= 0.15
    quantized = jint8.quantize_params(params, result.config)
    assert not isinstance(quantized["model"]["layers_1"]["mlp"]["up_proj"]["kernel"], jint8.Int8Weight)
    assert isinstance(quantized["model"]["layers_0"]["mlp"]["up_proj"]["kernel"], jint8.Int8Weight)
    # and the skip list survives the JSON round trip as exact paths
    assert config_from_dict(json.loads(config_to_json(result.config))) == result.config


def test_group_sensitivity_keeps_the_most_harmful_group_in_float(harmful_llama):
    model, params, tokens = harmful_llama
    result = calibrate_model(model, params, tokens, window=32, skip_budget=1.0, skip_granularity="group",
                             sensitivity_windows=1, outlier_factor=1.0, base=jint8.Int8Config(min_size=0))
    assert {s.module for s in result.sensitivity} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                      "up_proj", "down_proj", "lm_head"}
    worst = max(result.sensitivity, key=lambda s: s.kl)
    assert worst.module == "up_proj" and "up_proj" in result.config.skip_modules
    quantized = jint8.quantize_params(params, result.config)
    assert not isinstance(quantized["model"]["layers_0"]["mlp"]["up_proj"]["kernel"], jint8.Int8Weight)


def test_sensitivity_rejects_bad_options(harmful_llama, harmful_calibration):
    model, params, tokens = harmful_llama
    _, config = harmful_calibration
    with pytest.raises(InvalidConfigError, match="granularity='block'"):
        module_sensitivity(model, params, tokens, config, granularity="block", window=32)
    with pytest.raises(InvalidConfigError, match="max_windows=0"):
        module_sensitivity(model, params, tokens, config, window=32, max_windows=0)
    with pytest.raises(InvalidConfigError, match="skip_budget=1.5"):
        calibrate_model(model, params, tokens, window=32, skip_budget=1.5)


def test_config_json_round_trips_to_an_equal_config(tmp_path):
    config = jint8.Int8Config(
        threshold=5.0, outlier_capacity=32, skip_modules=("v_proj", "re:^lm_head$", "model/layers_3/self_attn/k_proj"),
        min_size=0,
        threshold_overrides=(("re:^model/layers_0/mlp/down_proj$", 1.25), ("q_proj", 0.5)),
        capacity_overrides={"re:^model/layers_0/mlp/down_proj$": 77},
    )
    path = tmp_path / "int8.json"
    text = config_to_json(config, path)
    assert load_int8_config(path) == config
    assert config_from_dict(json.loads(text)) == config
    # plain Int8Config(**json) works too; only kernel_names must come back as a tuple to compare equal
    plain = json.loads(text)
    assert jint8.Int8Config(**{**plain, "kernel_names": tuple(plain["kernel_names"])}) == config
    # order is match order (first match wins): it must survive the round trip
    assert [p for p, _ in load_int8_config(path).threshold_overrides] == [p for p, _ in config.threshold_overrides]


def test_loading_a_bad_config_file_names_the_problem(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"threshold": 6.0, "tresholds": {}}))
    with pytest.raises(InvalidConfigError, match="tresholds"):
        load_int8_config(bad)
    bad.write_text("{not json")
    with pytest.raises(InvalidConfigError, match="bad.json"):
        load_int8_config(bad)


def _text_file(tmp_path, n=80):
    text = tmp_path / "calibration.txt"
    text.write_text(" ".join(WORDS[(11 * i + 3) % len(WORDS)] for i in range(n)))
    return text


def test_cli_calibrate_writes_a_config_that_eval_ppl_and_generate_use(tiny_checkpoint, tmp_path, capsys):  # noqa: F811
    import re

    out = tmp_path / "int8.json"
    argv = ["calibrate", "--model", str(tiny_checkpoint), "--dtype", "float32", "--text", str(_text_file(tmp_path)),
            "--window", "16", "--outlier-budget", "0.1", "--skip-budget", "0.2", "--sensitivity-windows", "1",
            "--outlier-factor", "0", "--out", str(out)]
    assert cli.main(argv) == 0
    err = capsys.readouterr().err
    assert "mlp/down_proj" in err and "-> 16-bit" in err
    config = load_int8_config(out)
    assert len(config.threshold_overrides) == 2 * 7 + 1 and all(t > 0 for _, t in config.threshold_overrides)
    # per-layer skip list: exact module paths, within the budget
    assert config.skip_modules and all(m.startswith("model/layers_") or m == "lm_head" for m in config.skip_modules)

    # the file's per-layer thresholds reach the loaded Int8Weights
    model, params = load_model(tiny_checkpoint, "int8", jnp.float32, int8_config=config)
    down = params["model"]["layers_1"]["mlp"]["down_proj"]["kernel"]
    assert (down.threshold, down.outlier_capacity) == (config.threshold_for(("model", "layers_1", "mlp", "down_proj")),
                                                        config.capacity_for(("model", "layers_1", "mlp", "down_proj")))
    assert down.threshold != 6.0

    text = _text_file(tmp_path, 60)
    common = ["--model", str(tiny_checkpoint), "--dtype", "float32"]
    assert cli.main(["eval-ppl", *common, "--text", str(text), "--max-length", "32", "--stride", "16",
                     "--int8-config", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "from int8.json" in printed and re.search(r"perplexity [0-9.]+", printed)
    assert cli.main(["generate", *common, "--prompt", "ca ce", "--no-chat", "--max-new-tokens", "3",
                     "--int8-config", str(out)]) == 0
    assert capsys.readouterr().out.strip()
    assert cli.main(["eval-ppl", *common, "--text", str(text), "--int8-config", str(tmp_path / "nope.json")]) == 2
    assert "nope.json" in capsys.readouterr().err
    assert cli.main(["eval-ppl", *common, "--text", str(text), "--quantize", "none", "--int8-config", str(out)]) == 2


def test_cli_calibrate_skip_options_reach_calibrate_model(capsys):
    import inspect

    from jint8.cli.calibrate import _calibration_options

    parse = cli.build_parser().parse_args
    options = _calibration_options(parse(["calibrate", "--skip-budget", "0.03", "--skip-granularity", "group",
                                          "--sensitivity-windows", "1", "--outlier-factor", "1.5"]))
    assert options == dict(window=512, outlier_budget=0.05, max_threshold=6.0, skip_budget=0.03,
                           skip_granularity="group", sensitivity_windows=1, outlier_factor=1.5)
    defaults = _calibration_options(parse(["calibrate"]))
    assert (defaults["skip_budget"], defaults["skip_granularity"], defaults["sensitivity_windows"]) == (0.0, "layer", 2)
    assert set(options) <= set(inspect.signature(calibrate_model).parameters)
    with pytest.raises(SystemExit):
        parse(["calibrate", "--skip-granularity", "block"])
    assert "invalid choice" in capsys.readouterr().err
    assert cli.main(["calibrate", "--skip-budget", "1.5"]) == 2  # refused before any model is loaded
    assert "--skip-budget 1.5" in capsys.readouterr().err
    assert cli.main(["calibrate", "--skip-budget", "0.05", "--sensitivity-windows", "0"]) == 2
    assert "--sensitivity-windows 0" in capsys.readouterr().err


def test_calibrate_rejects_too_little_text(planted_llama):
    model, params, tokens = planted_llama
    with pytest.raises(InvalidConfigError, match="window=512"):
        calibrate(model, params, tokens[:100])
    with pytest.raises(InvalidConfigError, match="outlier_budget"):
        calibrate(model, params, tokens, window=32, outlier_budget=0.0)


def test_replace_keeps_calibrated_overrides_usable(planted_llama):
    model, params, tokens = planted_llama
    config = calibrate(model, params, tokens, window=32, base=jint8.Int8Config(min_size=0))
    skipped = dataclasses.replace(config, skip_modules=("v_proj",))
    q = jint8.quantize_params(params, skipped)
    assert not isinstance(q["model"]["layers_0"]["self_attn"]["v_proj"]["kernel"], jint8.Int8Weight)
    assert isinstance(q["model"]["layers_0"]["self_attn"]["q_proj"]["kernel"], jint8.Int8Weight)
