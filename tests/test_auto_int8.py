"""Int8Config(mode="auto"): exact scale migration, the search's int8 simulation, determinism, what
calibration changes in the tree, the CLI option and a saved checkpoint that reloads as calibrated."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_cli import WORDS, tiny_checkpoint  # noqa: F401  (the fixture)

import jint8
from jint8 import cli
from jint8.auto_int8 import AUTO_METHOD, builtin_calibration_text, calibrate_auto, choose_site, simulated_int8_output
from jint8.errors import InvalidConfigError
from jint8.evaluation import amplify_outlier_features, kl_divergence
from jint8.models import LlamaConfig, LlamaForCausalLM
from jint8.ops.int8_matmul import int8_matmul
from jint8.smoothing import MAX_EXPONENT, fold_scales, llama_sites, smoothing_exponents

# grouped-query attention (2 query heads per kv head) and q/k/v biases: every fold path
CONFIG = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                     num_kv_heads=2, head_dim=16, qkv_bias=True, dtype=jnp.float32)
PLANTED = [3, 30, 41]


def _tree(params, path):
    for name in path.split("/"):
        params = params[name]
    return params


@pytest.fixture(scope="module")
def llama():
    model = LlamaForCausalLM(CONFIG)
    params = model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
    params = jax.tree.map(lambda x: x + 0.01 * jax.random.normal(jax.random.key(1), x.shape), params)  # nonzero biases
    return model, params, np.random.default_rng(1).integers(0, CONFIG.vocab_size, (1, 48)).astype(np.int32)


def _random_exponents(sites, seed=0):
    rng = np.random.default_rng(seed)
    return {site.name: rng.integers(-4, 5, site.num_scales).astype(np.int8) for site in sites}


def test_power_of_two_migration_keeps_float32_logits_bit_identical(llama):
    # Each scaled value is the same float with another exponent, so every product x_k * W[k, n]
    # (norm output times row, v times o_proj row, act(gate) * up times down row) is unchanged and
    # the summation sees the same terms: the derived bound is 0, not a tolerance.
    model, params, ids = llama
    sites = llama_sites(params, CONFIG)
    assert {s.name.rsplit("/", 1)[1] for s in sites} == {"attn_in", "mlp_in", "attn_out", "mlp_out"}
    migrated = fold_scales(params, sites, _random_exponents(sites))
    assert not np.array_equal(migrated["model"]["layers_0"]["self_attn"]["o_proj"]["kernel"],
                              params["model"]["layers_0"]["self_attn"]["o_proj"]["kernel"])
    np.testing.assert_array_equal(model.apply({"params": migrated}, ids)[0], model.apply({"params": params}, ids)[0])


def test_migration_divides_producers_and_multiplies_consumer_rows_by_the_scale(llama):
    _, params, _ = llama
    sites = {s.name: s for s in llama_sites(params, CONFIG)}
    exponents = _random_exponents(sites.values(), seed=3)
    migrated = fold_scales(params, list(sites.values()), exponents)
    s = {name: 2.0 ** e.astype(np.float64) for name, e in exponents.items()}
    layer = "model/layers_1"
    np.testing.assert_array_equal(_tree(migrated, f"{layer}/input_layernorm/scale"),
                                  _tree(params, f"{layer}/input_layernorm/scale") / s[f"{layer}/attn_in"])
    for proj in ("q_proj", "k_proj", "v_proj"):
        columns = 1 / s[f"{layer}/attn_out"][None] if proj == "v_proj" else 1  # v is attn_out's producer too
        np.testing.assert_array_equal(_tree(migrated, f"{layer}/self_attn/{proj}/kernel"),
                                      _tree(params, f"{layer}/self_attn/{proj}/kernel")
                                      * s[f"{layer}/attn_in"][:, None] * columns)
    # v's output (kv head g, d) is read by o_proj rows (h, d) of the query heads h of group g
    expand = sites[f"{layer}/attn_out"].expand
    assert list(expand[:16]) == list(range(16)) and list(expand[16:32]) == list(range(16))
    assert list(expand[32:48]) == list(range(16, 32))
    np.testing.assert_array_equal(_tree(migrated, f"{layer}/self_attn/v_proj/bias"),
                                  _tree(params, f"{layer}/self_attn/v_proj/bias") / s[f"{layer}/attn_out"])
    np.testing.assert_array_equal(_tree(migrated, f"{layer}/self_attn/o_proj/kernel"),
                                  _tree(params, f"{layer}/self_attn/o_proj/kernel") * s[f"{layer}/attn_out"][expand][:, None])
    np.testing.assert_array_equal(_tree(migrated, f"{layer}/mlp/up_proj/kernel"),
                                  _tree(params, f"{layer}/mlp/up_proj/kernel") * s[f"{layer}/mlp_in"][:, None]
                                  / s[f"{layer}/mlp_out"][None])
    np.testing.assert_array_equal(_tree(migrated, f"{layer}/mlp/down_proj/kernel"),
                                  _tree(params, f"{layer}/mlp/down_proj/kernel") * s[f"{layer}/mlp_out"][:, None])


def test_fold_scales_rejects_bad_exponents_and_fused_trees(llama):
    _, params, _ = llama
    sites = llama_sites(params, CONFIG)
    name = sites[0].name
    with pytest.raises(InvalidConfigError, match="integer exponents"):
        fold_scales(params, sites, {name: np.zeros(sites[0].num_scales, np.float32)})
    with pytest.raises(InvalidConfigError, match="integer exponents"):
        fold_scales(params, sites, {name: np.zeros(3, np.int8)})
    with pytest.raises(InvalidConfigError, match=f"±{MAX_EXPONENT}"):
        fold_scales(params, sites, {name: np.full(sites[0].num_scales, MAX_EXPONENT + 1, np.int8)})
    with pytest.raises(InvalidConfigError, match="no migration site"):
        fold_scales(params, sites, {"model/layers_9/attn_in": np.zeros(64, np.int8)})
    with pytest.raises(InvalidConfigError, match="unfused"):
        llama_sites(jint8.fuse_projections(params), CONFIG)


def test_smoothing_exponents_are_centred_powers_of_two_and_leave_dead_features_alone():
    act = np.array([8.0, 2.0, 0.0, 1.0])
    weight = np.array([0.5, 0.5, 1.0, 2.0])
    e = smoothing_exponents(act, weight, 0.5)
    # log2 s = 0.5 log2 act - 0.5 log2 w = [2, 1, -, -0.5], centred on the live mean 0.833
    np.testing.assert_array_equal(e, [1, 0, 0, -1])
    np.testing.assert_array_equal(smoothing_exponents(np.full(4, 1e30), np.full(4, 1e-30), 1.0), 0)
    assert np.abs(smoothing_exponents(np.array([1e30, 1.0]), np.ones(2), 1.0)).max() == MAX_EXPONENT


def test_the_search_simulates_jint8s_int8_matmul(rng):
    x = rng.normal(size=(24, 64)).astype(np.float32)
    x[:3, [5, 40]] *= 20  # outlier elements in a few rows: the other rows' scales include those columns
    w = rng.normal(size=(64, 48)).astype(np.float32)
    threshold = 6.0
    want, _ = int8_matmul(jnp.asarray(x), jint8.quantize_vectorwise(jnp.asarray(w)).qvalue,
                          jint8.quantize_vectorwise(jnp.asarray(w)).scale, threshold=threshold,
                          outlier_capacity=64, weight_layout="nk", return_stats=True)
    got = simulated_int8_output(x, w, threshold)
    # Same int8 codes (same multiplier rounding, so no tie flips), exact int32 sums and the same
    # float32 scaling order: only the outlier matmul's summation order may differ, by at most
    # |O| * eps * (|x_O| @ |w_O|) per output, plus one rounding of the final add.
    eps = np.finfo(np.float32).eps
    outliers = (np.abs(x) >= threshold).any(axis=0)
    assert outliers.sum() == 2
    bound = outliers.sum() * eps * (np.abs(x[:, outliers]) @ np.abs(w[outliers])) * 1.01 + eps * np.abs(got)
    assert (np.abs(got - np.asarray(want)) <= bound).all()


@pytest.fixture(scope="module")
def planted_llama():
    """A tiny float Llama whose q/k/v and gate/up inputs carry features 3, 30, 41 at 64x their size."""
    model = LlamaForCausalLM(dataclasses.replace(CONFIG, qkv_bias=False))
    params = model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
    tokens = np.random.default_rng(1).integers(0, CONFIG.vocab_size, 192)
    return model, amplify_outlier_features(params, PLANTED, 64.0), tokens


def test_auto_calibration_is_deterministic_and_migrates_planted_outliers(planted_llama):
    model, params, tokens = planted_llama
    first = calibrate_auto(model, params, token_ids=tokens)
    second = calibrate_auto(model, params, token_ids=tokens)
    assert first.config == second.config and first.config.mode == "fixed" and first.config.calibration == AUTO_METHOD
    jax.tree.map(np.testing.assert_array_equal, first.params, second.params)
    by_site = {c.site: c for c in first.sites}
    # the planted features are 64x the others going into q/k/v and gate/up: a migration wins there
    for layer in (0, 1):
        for site in ("attn_in", "mlp_in"):
            choice = by_site[f"model/layers_{layer}/{site}"]
            assert choice.alpha is not None and choice.errors[choice.alpha] < choice.errors[None]
    norm = np.asarray(_tree(first.params, "model/layers_0/input_layernorm/scale"))
    assert (np.abs(norm[PLANTED]) <= 64 / 8).all()  # the planted 64x norm weights were divided by >= 8
    # every quantized projection has its own threshold and capacity, and the result is better
    # than LLM.int8() at bitsandbytes' threshold 6
    assert len(first.config.threshold_overrides) == 7 * CONFIG.num_layers + 1  # and the untied lm_head
    windows = [tokens[i:i + 64][None].astype(np.int32) for i in range(0, 192, 64)]
    auto_kl = kl_divergence(model, params, jint8.quantize_params(first.params, first.config), windows)
    default_kl = kl_divergence(model, params, jint8.quantize_params(params, jint8.Int8Config()), windows)
    assert auto_kl < 0.5 * default_kl


def test_auto_thresholds_equal_calibrate_layers_on_the_migrated_model(planted_llama, monkeypatch):
    # calibrate_auto takes the thresholds from its capture pass's maxima divided by s instead of
    # a second forward through the migrated model: exact for powers of two, so equal, not close;
    # down_proj with its own site budget, every other projection with OUTLIER_BUDGET
    import jint8.auto_int8 as auto
    from jint8.auto_int8 import MAX_THRESHOLD, OUTLIER_BUDGET
    from jint8.calibration import calibrate_layers

    monkeypatch.setattr(auto, "SITE_OUTLIER_BUDGETS", {"mlp_out": 0.25})
    model, params, tokens = planted_llama
    auto = calibrate_auto(model, params, token_ids=tokens)
    assert auto.exponents and all(np.abs(e).max() > 0 for e in auto.exponents.values())
    migrated = fold_scales(params, llama_sites(params, CONFIG), auto.exponents)
    by_budget = {budget: calibrate_layers(model, migrated, tokens, window=len(tokens), outlier_budget=budget,
                                          max_threshold=MAX_THRESHOLD) for budget in (OUTLIER_BUDGET, 0.25)}
    layers = [wide if wide.path.endswith("down_proj") else default
              for default, wide in zip(by_budget[OUTLIER_BUDGET], by_budget[0.25])]
    assert [(f"re:^{layer.path}$", layer.threshold) for layer in layers] == list(auto.config.threshold_overrides)
    # the wider budget lowered every down_proj threshold: more of its input features in 16 bits
    for default, wide in zip(by_budget[OUTLIER_BUDGET], layers):
        assert (wide.threshold < default.threshold) == wide.path.endswith("down_proj")
    assert [min(layer.num_features, 2 * layer.capacity) for layer in layers] == \
        [capacity for _, capacity in auto.config.capacity_overrides]


def test_auto_config_cannot_be_applied_without_the_model(planted_llama):
    _, params, _ = planted_llama
    with pytest.raises(InvalidConfigError, match="mode='auto'"):
        jint8.quantize_params(params, jint8.Int8Config(mode="auto"))
    with pytest.raises(InvalidConfigError, match="mode"):
        jint8.Int8Config(mode="smart")
    with pytest.raises(InvalidConfigError, match="calibration"):
        jint8.Int8Config(calibration=1)


def test_the_builtin_calibration_text_ships_with_the_package():
    text = builtin_calibration_text()
    assert len(text.split()) > 1000 and "def moving_average" in text


def test_choose_site_keeps_no_migration_when_it_is_best(rng):
    # activations without outliers and weights without structure: nothing to migrate
    site = llama_sites(LlamaForCausalLM(CONFIG).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"],
                       CONFIG)[0]
    x = [np.ones((16, 64), np.float32)]
    w = [np.ones((64, 8), np.float32)]
    e, choice = choose_site(site, x, w)
    assert choice.alpha is None and not e.any()


def _text(tmp_path, n=300):
    path = tmp_path / "text.txt"
    path.write_text(" ".join(WORDS[(7 * i) % len(WORDS)] for i in range(n)))
    return path


def test_cli_int8_auto_eval_quantize_and_reload_without_recalibrating(tiny_checkpoint, tmp_path, capsys,  # noqa: F811
                                                                       monkeypatch):
    import jint8.auto_int8 as auto

    # eval-ppl --quantize int8-auto on the float checkpoint would calibrate again through the same
    # from_pretrained(Int8Config(mode="auto")) that `quantize` runs here: eval-ppl is run once, below,
    # on the saved checkpoint, where it must not calibrate
    out = tmp_path / "auto_ckpt"
    assert cli.main(["quantize", str(tiny_checkpoint), str(out), "--quantize", "int8-auto"]) == 0
    info = jint8.checkpoint.load_metadata(out)
    assert info.quant_config.mode == "fixed" and info.quant_config.calibration == AUTO_METHOD
    assert info.quant_config.threshold_overrides

    def no_calibration(*args, **kwargs):
        raise AssertionError("a saved int8-auto checkpoint was calibrated again")

    monkeypatch.setattr(auto, "calibrate_auto", no_calibration)
    _, saved = jint8.from_pretrained(out, quantization=jint8.Int8Config(mode="auto"))
    _, plain = jint8.from_pretrained(out)
    jax.tree.map(np.testing.assert_array_equal, saved, plain)
    capsys.readouterr()
    assert cli.main(["eval-ppl", "--quantize", "int8-auto", "--model", str(out), "--dtype", "float32", "--text",
                     str(_text(tmp_path)), "--max-length", "32", "--stride", "16", "--max-tokens", "96"]) == 0
    assert "int8-auto" in capsys.readouterr().out


def test_cli_int8_auto_rejects_conflicting_options(tiny_checkpoint, tmp_path, capsys):  # noqa: F811
    config = tmp_path / "c.json"
    config.write_text("{}")
    assert cli.main(["eval-ppl", "--model", str(tiny_checkpoint), "--quantize", "int8-auto",
                     "--int8-config", str(config)]) == 2
    assert "--int8-config needs --quantize int8" in capsys.readouterr().err
    assert cli.main(["quantize", str(tiny_checkpoint), str(tmp_path / "x"), "--quantize", "int8-auto",
                     "--bits", "4"]) == 2
    assert "--bits 4" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["serve", "--quantize", "int8-smart"])
    with pytest.raises(InvalidConfigError, match="resolved"):
        jint8.checkpoint.save_quantized(tmp_path / "y", {}, quant_config=jint8.Int8Config(mode="auto"))


def test_skip_list_keeps_the_worst_down_proj_in_16_bits_within_the_memory_budget(llama, monkeypatch):
    import jint8.auto_int8 as auto
    from jint8.auto_int8 import SiteChoice, _skip_list

    _, params, _ = llama
    sites = llama_sites(params, CONFIG)
    errors = {"model/layers_0/mlp_out": 0.02, "model/layers_1/mlp_out": 0.05}  # layer 1's down_proj is worse
    choices = [SiteChoice(s.name, None, {None: errors.get(s.name, 0.5)}) for s in sites]
    down = 128 * 64  # one down_proj's weights: one extra byte each in bf16
    # the int8 model's bytes: int8 kernels (and their scales), everything else in bf16
    total = jint8.param_bytes(jint8.quantize_params(jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)))
    monkeypatch.setattr(auto, "SKIP_MEMORY_BUDGET", 1.5 * down / total)
    assert _skip_list(params, sites, choices, jint8.Int8Config()) == ("model/layers_1/mlp/down_proj",)
    monkeypatch.setattr(auto, "SKIP_MEMORY_BUDGET", 2.2 * down / total)
    assert _skip_list(params, sites, choices, jint8.Int8Config()) == ("model/layers_1/mlp/down_proj",
                                                                       "model/layers_0/mlp/down_proj")
    monkeypatch.setattr(auto, "SKIP_MEMORY_BUDGET", 0.9 * down / total)
    assert _skip_list(params, sites, choices, jint8.Int8Config()) == ()
