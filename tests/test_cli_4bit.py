"""The CLI's 4-bit options: `jint8 quantize --bits 4`, `jint8 eval-ppl --quantize nf4|fp4` (generate's
--quantize nf4|fp4 goes through the same common.load_model)."""

import re

import jax
import jax.numpy as jnp
import pytest
from test_cli import WORDS, tiny_checkpoint  # noqa: F401  (the tiny Llama fixture)

import jint8
from jint8 import cli


def test_quantize_bits_4_writes_a_4bit_checkpoint(tiny_checkpoint, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "fp4"
    assert cli.main(["quantize", str(tiny_checkpoint), str(out), "--bits", "4", "--quant-type", "fp4",
                     "--quantize-embeddings"]) == 0
    assert str(out) in capsys.readouterr().out
    params, info = jint8.load_quantized(out)
    assert info.quant_config == jint8.Int4Config(quant_type="fp4", quantize_embeddings=True)
    weights = [w for w in jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, jint8.Int4Weight))
               if isinstance(w, jint8.Int4Weight)]
    assert weights and {w.quant_type for w in weights} == {"fp4"} and not isinstance(params["lm_head"]["kernel"], jint8.Int4Weight)
    table = params["model"]["embed_tokens"]["embedding"]  # the table [V, H] as bitsandbytes' Embedding4bit stores it
    assert isinstance(table, jint8.Int4Weight) and table.shape == (params["lm_head"]["kernel"].shape[1], table.shape[1])
    assert cli.main(["quantize", str(tiny_checkpoint), str(tmp_path / "x"), "--bits", "4", "--int8-config", "c.json"]) == 2
    assert "not with --bits 4" in capsys.readouterr().err


def test_eval_ppl_quantize_nf4_equals_the_python_api(tiny_checkpoint, tmp_path, capsys):  # noqa: F811
    from jint8.evaluation import perplexity

    text = tmp_path / "text.txt"
    text.write_text(" ".join(WORDS[(7 * i) % len(WORDS)] for i in range(40)))
    argv = ["eval-ppl", "--model", str(tiny_checkpoint), "--quantize", "nf4", "--dtype", "float32",
            "--text", str(text), "--max-length", "32", "--stride", "16"]
    assert cli.main(argv) == 0
    printed = float(re.search(r"perplexity ([0-9.]+)", capsys.readouterr().out).group(1))
    model, params = jint8.from_pretrained(tiny_checkpoint, dtype=jnp.float32, quantization=jint8.Int4Config())
    ids = jint8.loading.load_tokenizer(tiny_checkpoint)(text.read_text(), add_special_tokens=False)["input_ids"]
    assert printed == pytest.approx(perplexity(model, params, ids, max_length=32, stride=16).perplexity, rel=1e-4)
