"""A tiny random Llama and a byte-level tokenizer with a chat template, for serving tests."""

import jax
import jax.numpy as jnp
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from jint8.models import LlamaConfig, LlamaForCausalLM

SPECIAL = ["<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CONTEXT = 128


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """256 byte tokens (GPT-2's byte-to-unicode alphabet, no merges) + <|im_start|>, <|im_end|> (eos)."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokenizer = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(SPECIAL)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|im_end|>",
                                   chat_template=CHAT_TEMPLATE)


def tiny_model(vocab_size: int, dtype=jnp.float32, seed: int = 0):
    """A 2-layer Llama with weights scaled up so greedy logits have clear winners."""
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                         num_kv_heads=2, head_dim=16, max_position_embeddings=CONTEXT, dtype=dtype)
    model = LlamaForCausalLM(config)
    # one compiled init rather than a compilation per eager op
    init = jax.jit(lambda key: jax.tree.map(lambda x: x * 3.0 if x.ndim == 2 else x,
                                            model.init(key, jnp.zeros((1, 4), jnp.int32))["params"]))
    return model, init(jax.random.key(seed))
