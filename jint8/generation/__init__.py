"""Text generation: prefill and decode as one jit-compiled program over a static KV cache.

    result = jint8.generate(model, params, input_ids, attention_mask,
                            jint8.GenerationConfig(max_new_tokens=64, eos_token_id=2))
    result.sequences        # [B, prompt_len + max_new_tokens]: the prompt, then the new tokens

One program per (model, batch, bucketed prompt length, bucketed max_new_tokens, decoding mode):
the prompt is left-padded to a multiple of `prompt_length_bucket` and the output buffer sized to a
multiple of `new_tokens_bucket`, while the real max_new_tokens, temperature, top-k, top-p, eos ids
and seed are traced values, so calls that differ only in those reuse the compiled program.

Every decode step is one round of draft-and-verify: the target model reads [last token, d_1..d_K]
(K = 0 for plain decoding) and emits the tokens it agrees with plus one of its own. Drafts come
from an assistant model (speculative decoding) or from n-gram matches in the sequence so far
(prompt-lookup decoding). A batch advances by the smallest agreement over its live sequences, so
every sequence shares one cache_index; that keeps greedy output identical to plain greedy and the
sampled distribution unchanged (each emitted token is still the target's own choice given its
prefix).

With LLM.int8 weights the outlier columns are chosen per matmul over all its rows (as in
bitsandbytes), so a sequence's int8 numerics depend on the rest of its batch and on the padding
rows that batching and bucketing add; float models are batch-invariant up to rounding.

Modules: config (GenerationConfig, GenerationResult), sampling (filter_logits, choose_tokens),
state (the program's plan, controls and loop carry), drafting (prompt-lookup and assistant
drafts, verification), loop (the compiled program), api (generate), seq2seq (encoder-decoder
models: the encoder once, then the decoder loop; generate_seq2seq).
"""

from jint8.generation.api import generate
from jint8.generation.config import MAX_EOS_IDS, StreamCallback  # noqa: F401  (importable, not in __all__)
from jint8.generation.config import GenerationConfig, GenerationResult
from jint8.generation.loop import clear_compiled_programs, compile_count
from jint8.generation.sampling import SamplingParams, choose_tokens, filter_logits
from jint8.generation.seq2seq import generate_seq2seq

__all__ = [
    "GenerationConfig",
    "GenerationResult",
    "SamplingParams",
    "choose_tokens",
    "clear_compiled_programs",
    "compile_count",
    "filter_logits",
    "generate",
    "generate_seq2seq",
]
