"""ModelSpec: each family file declares one, and the registry, name rules, sharding rules and
fusions are read from it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import PartitionSpec as P

import jint8
from jint8 import models
from jint8.errors import InvalidConfigError
from jint8.loading import NAME_RULES, kernel_spec, sharding
from jint8.loading.names import NameRules
from jint8.models import Fusion, LlamaConfig, LlamaForCausalLM, ModelSpec, ShardingRules, fusion
from jint8.models import bloom, falcon, gemma, gpt2, llama, opt, t5

FAMILIES = [llama, gemma, gpt2, opt, bloom, falcon, t5]


class _FakeMesh:
    shape = {"data": 1, "model": 4}


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.__name__)
def test_registry_serves_every_model_type_of_a_family_spec(family):
    for model_type in family.SPEC.model_types:
        assert models.spec_for(model_type) is family.SPEC
        assert models.config_class_for(type("HF", (), {"model_type": model_type})) is family.SPEC.config_class
    assert family.SPEC in models.registered_specs()


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.__name__)
def test_fused_modules_are_column_parallel_like_their_parts(family):
    for fused in family.SPEC.fusions:
        assert fused.fused in family.SPEC.sharding.column_parallel
        assert all(part in family.SPEC.sharding.column_parallel for part in fused.parts)


def test_old_names_are_derived_from_the_specs():
    assert NAME_RULES["gpt2"] == gpt2.SPEC.name_rules and NAME_RULES["llama"] == NameRules()
    assert fusion.FUSIONS == models.registered_fusions()
    assert fusion.FUSIONS[: len(llama.SPEC.fusions)] == llama.SPEC.fusions and set(t5.SPEC.fusions) <= set(fusion.FUSIONS)
    assert {"qkv_proj", "gate_up_proj", "c_attn", "fc1"} <= set(sharding.COLUMN_PARALLEL)
    assert {"o_proj", "c_proj", "out_proj"} <= set(sharding.ROW_PARALLEL)


def test_kernel_spec_takes_a_family_rules():
    path = ("model", "layers_0", "self_attn", "q_proj", "kernel")
    assert kernel_spec(path, (64, 64), _FakeMesh(), llama.SPEC.sharding) == P(None, "model")
    assert kernel_spec(path, (64, 64), _FakeMesh(), gpt2.SPEC.sharding) == P(None, None)
    # BLOOM / Falcon: the fused query_key_value splits its output features (whole heads: BLOOM's
    # per-head [q, k, v] rows, Falcon's per-key/value-head groups), dense its input features
    qkv = ("transformer", "h_0", "self_attention", "query_key_value", "kernel")
    dense = ("transformer", "h_0", "self_attention", "dense", "kernel")
    for family in (bloom, falcon):
        assert kernel_spec(qkv, (64, 192), _FakeMesh(), family.SPEC.sharding) == P(None, "model")
        assert kernel_spec(dense, (64, 64), _FakeMesh(), family.SPEC.sharding) == P("model", None)
    # T5: q/k/v and the feed-forward's wi / wi_0 / wi_1 split their output features (whole heads:
    # the heads are contiguous runs of d_kv features), o and wo their input features
    attention = ("decoder", "block_0", "layer_1", "EncDecAttention")
    feed_forward = ("encoder", "block_1", "layer_1", "DenseReluDense")
    for path in [attention + (name, "kernel") for name in "qkv"] + [feed_forward + (n, "kernel") for n in ("wi", "wi_0")]:
        assert kernel_spec(path, (64, 128), _FakeMesh(), t5.SPEC.sharding) == P(None, "model"), path
    for path in (attention + ("o", "kernel"), feed_forward + ("wo", "kernel")):
        assert kernel_spec(path, (128, 64), _FakeMesh(), t5.SPEC.sharding) == P("model", None), path
    assert kernel_spec(("shared", "embedding"), (96, 64), _FakeMesh(), t5.SPEC.sharding) == P("model", None)
    bias = ("encoder", "block_0", "layer_0", "SelfAttention", "relative_attention_bias", "embedding")
    assert kernel_spec(bias, (32, 4), _FakeMesh(), t5.SPEC.sharding) == P(None, None)


def test_spec_requires_fused_column_parallel_parts_to_be_column_parallel():
    rules = ShardingRules(column_parallel=("q_proj", "k_proj", "v_proj"))
    with pytest.raises(InvalidConfigError, match="'qkv_proj'"):
        ModelSpec(model_types=("toy",), model_class=LlamaForCausalLM, config_class=LlamaConfig,
                  sharding=rules, fusions=(Fusion("self_attn", "qkv_proj", ("q_proj", "k_proj", "v_proj")),))


def test_sharding_rules_reject_a_module_both_column_and_row_parallel():
    with pytest.raises(InvalidConfigError, match="o_proj"):
        ShardingRules(column_parallel=("o_proj",), row_parallel=("o_proj",))


def test_spec_needs_a_config_class_with_from_hf_config():
    with pytest.raises(InvalidConfigError, match="from_hf_config"):
        ModelSpec(model_types=("toy",), model_class=LlamaForCausalLM, config_class=object)


def test_register_model_gets_every_registered_family_sharding(monkeypatch):
    monkeypatch.setattr(models, "_REGISTRY", dict(models._REGISTRY))
    models.register_model("toy_llama", LlamaForCausalLM, LlamaConfig)
    spec = models.spec_for("toy_llama")
    assert spec.sharding is None and spec.name_rules == NameRules() and spec.fusions == ()
    assert models.model_class_for(type("HF", (), {"model_type": "toy_llama"})) is LlamaForCausalLM
    path = ("model", "layers_0", "mlp", "down_proj", "kernel")
    assert kernel_spec(path, (128, 64), _FakeMesh(), spec.sharding) == P("model", None)


def test_fuse_projections_follows_the_fusions_it_is_given():
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                         num_kv_heads=2, head_dim=16, dtype=jnp.float32)
    model = LlamaForCausalLM(config)
    params = model.init(jax.random.key(0), jnp.zeros((1, 3), jnp.int32))["params"]
    unfused = jint8.fuse_projections(params, fusions=())
    assert jax.tree_util.tree_structure(unfused) == jax.tree_util.tree_structure(params)
    only_mlp = jint8.fuse_projections(params, fusions=llama.FUSIONS[1:])
    layer = only_mlp["model"]["layers_0"]
    assert "q_proj" in layer["self_attn"] and "gate_up_proj" in layer["mlp"]
