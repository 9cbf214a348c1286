"""from_pretrained's parameter shapes, traced for a few layers and extended, are the whole init's."""

import jax.numpy as jnp
import pytest


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_extended_parameter_shapes_equal_the_whole_init_in_its_order(family):
    pytest.importorskip("transformers")
    from models.tiny_checkpoints import hf_config

    from jint8.loading import config_check
    from jint8.models import spec_for

    hf = hf_config(family)
    setattr(hf, "n_layer" if family == "gpt2" else "num_hidden_layers", 5)
    spec = spec_for(hf.model_type)
    model = spec.model_class(spec.config_from_hf(hf, jnp.bfloat16))
    whole, fast = config_check._init_shapes(model), config_check.abstract_params(model)
    # the order matters: the loaded parameter tree is built in it
    assert [(p, s.shape, s.dtype) for p, s in fast.items()] == [(p, s.shape, s.dtype) for p, s in whole.items()]
