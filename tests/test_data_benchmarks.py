"""Multiple-choice benchmarks: item counts, lm-eval formats, and batched log-likelihood scoring."""

from __future__ import annotations

import math

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from overtrain.data.benchmarks import BENCHMARKS, MCItem, load_benchmark
from overtrain.probes.scoring import encode_request, evaluate_mc, loglikelihoods
from overtrain.runtime.hashing import weights_sha256

EXPECTED_COUNTS = {"arc_easy": 2376, "arc_challenge": 1172, "piqa": 1838, "hellaswag": 10042, "sciq": 1000, "winogrande": 1267}


@pytest.fixture(scope="module")
def tokenizer(python_docs):
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|pad|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(python_docs[:300], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", pad_token="<|pad|>")


def tiny_llama(vocab_size: int, window: int = 1024) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=window)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def mixed_items() -> list[MCItem]:
    """A few items of every benchmark: contexts of many lengths, partial scoring included."""
    return [item for name in BENCHMARKS for item in load_benchmark(name)[:6]]


def test_benchmarks_load_with_expected_counts_and_valid_gold():
    assert set(BENCHMARKS) == set(EXPECTED_COUNTS)
    for name, count in EXPECTED_COUNTS.items():
        items = load_benchmark(name)
        assert len(items) == count, name
        assert all(0 <= item.gold < len(item.choices) and all(item.choices) for item in items), name


def test_items_follow_lm_eval_formats():
    arc = load_benchmark("arc_challenge")[0]
    assert arc.context.startswith("Question: ") and arc.context.endswith("\nAnswer:")
    assert arc.requests()[0] == (arc.context, " " + arc.choices[0])
    hellaswag = load_benchmark("hellaswag")[0]
    assert hellaswag.context.startswith("Roof shingle removal: A man is sitting on a roof. He")
    assert not any("[" in text for item in load_benchmark("hellaswag")[:500] for text in [item.context, *item.choices])
    wino = load_benchmark("winogrande")[0]
    (first, continuation), (second, same) = wino.requests()
    assert continuation == same == " always got the easier cases."
    assert (first, second) == ("Sarah was a much better surgeon than Maria so Sarah", "Sarah was a much better surgeon than Maria so Maria")
    sciq = [item for item in load_benchmark("sciq") if item.context[0] != "\n"][0]
    assert "\nQuestion: " in sciq.context and sciq.gold == 3


def test_encode_request_moves_trailing_space_to_the_continuation(tokenizer):
    context_ids, continuation_ids = encode_request(tokenizer, "The answer is ", "yes")
    assert context_ids == tokenizer("The answer is", add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(continuation_ids) == " yes"
    assert encode_request(tokenizer, "", " hello")[0] == [tokenizer.eos_token_id]


def reference_loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """One request alone, no padding and no batching."""
    context_ids, continuation_ids = encode_request(tokenizer, context, continuation)
    ids = torch.tensor([context_ids + continuation_ids])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids).logits[0].float(), dim=-1)
    return sum(logprobs[len(context_ids) + k - 1, token].item() for k, token in enumerate(continuation_ids))


def test_batched_scores_equal_one_at_a_time_reference(tokenizer, mixed_items):
    model = tiny_llama(len(tokenizer))
    requests = [request for item in mixed_items for request in item.requests()]
    batched = loglikelihoods(model, tokenizer, requests, batch_size=5)
    reference = [reference_loglikelihood(model, tokenizer, *request) for request in requests]
    assert all(math.isclose(b, r, rel_tol=1e-5, abs_tol=1e-4) for b, r in zip(batched, reference))

    result = evaluate_mc(model, tokenizer, mixed_items, batch_size=5)
    expected_correct, position = 0, 0
    for item in mixed_items:
        scores = reference[position:position + len(item.choices)]
        position += len(item.choices)
        expected_correct += max(range(len(scores)), key=lambda i: (scores[i], -i)) == item.gold
    assert result["n"] == len(mixed_items) and 0 <= result["acc"] <= 1 and 0 <= result["acc_norm"] <= 1
    assert result["acc"] == expected_correct / len(mixed_items)
    assert evaluate_mc(model, tokenizer, mixed_items, batch_size=3) == result  # batch size changes nothing


def test_limit_and_long_contexts_within_a_small_window(tokenizer):
    model = tiny_llama(len(tokenizer), window=48)
    sciq = [item for item in load_benchmark("sciq") if len(item.context) > 600][:3]
    result = evaluate_mc(model, tokenizer, sciq + load_benchmark("piqa"), limit=5, batch_size=2)
    assert result["n"] == 5 and 0 <= result["acc"] <= 1
    # Continuations longer than the window are scored on their last 48 tokens: the same here.
    assert len(tokenizer(" word" * 48)["input_ids"]) > 48  # so both windows hold only " word" tokens
    longer, long = loglikelihoods(model, tokenizer, [("Question:", " word" * 60), ("Answer:", " word" * 48)])
    assert math.isclose(longer, long, rel_tol=1e-5)


def test_weights_hash_follows_the_weights(tokenizer):
    model = tiny_llama(len(tokenizer))
    same = tiny_llama(len(tokenizer))
    assert weights_sha256(model) == weights_sha256(same)
    with torch.no_grad():
        same.model.norm.weight[0] += 1e-3
    assert weights_sha256(model) != weights_sha256(same)
