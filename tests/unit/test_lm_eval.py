"""LM evaluators: multiple-choice log-likelihoods against an unbatched reference, the single-token fast path, acc_norm
by characters, ties, batch invariance; greedy generation batched vs one by one, stop strings, extraction, GSM8K;
task descriptions and errors. A tiny random Llama and a byte-level BPE trained on the fly: offline, seconds."""

from __future__ import annotations

import copy
import random
import re
from types import SimpleNamespace

import pytest

from deltakit.evaluate import PerplexityEvaluator
from deltakit.lm_eval import (
    GenerationEvaluator,
    LMTask,
    MultipleChoiceEvaluator,
    choice_metrics,
    cut_at_stop,
    encode_pair,
    extract_answer,
    gsm8k_extract,
    gsm8k_gold,
    gsm8k_task,
    infer_lm_task,
    normalise_answer,
)

import datasets  # noqa: E402  (after deltakit: see deltakit's import-order warning)
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

LABELS = ("negative", "neutral", "positive")
WORDS = "the a cat dog sat on mat tweet good bad day love hate movie was is it this that very not".split()


def _sentences(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 9))) for _ in range(n)]


def train_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """A byte-level BPE (no BOS, EOS ``<|endoftext|>``, no pad token) in which the label words are single tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    rng = random.Random(0)
    corpus = []
    for s in _sentences(300):
        corpus.append(f"Tweet: {s}\nSentiment: {rng.choice(LABELS)}")
        corpus.append(f"Tweet: {s}\n{rng.choice(LABELS)}")  # bare label words (after a chat template's "\n")
        corpus.append(f"Question: {rng.randint(1, 99)} plus {rng.randint(1, 99)}?\nAnswer: {rng.randint(1, 200)}")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>")


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                   initializer_range=0.2, eos_token_id=tok.eos_token_id, bos_token_id=None,
                                   pad_token_id=None)
    return transformers.LlamaForCausalLM(cfg).eval()


class BigramLM(torch.nn.Module):
    """Logits depend on the current token only: with a zero table every token has log-probability -log(V)."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.table = torch.nn.Parameter(torch.zeros(vocab, vocab))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> SimpleNamespace:
        return SimpleNamespace(logits=self.table[input_ids])


def _mc_split(n: int = 12, seed: int = 0) -> datasets.Dataset:
    """Multi-token choices of various lengths, some sharing a first word."""
    rng = random.Random(seed)
    pool = ["the cat sat", "a dog", "good movie", "very bad day", "not this", "love", "hate it", "positive mood"]
    rows = {"context": [], "choices": [], "label": []}
    for s in _sentences(n, seed):
        k = rng.randint(2, 4)
        rows["context"].append(f"Q: {s}\nA:")
        rows["choices"].append(rng.sample(pool, k))
        rows["label"].append(rng.randrange(k))
    return datasets.Dataset.from_dict(rows)


def _tweets(n: int = 10, seed: int = 1) -> datasets.Dataset:
    rng = random.Random(seed)
    return datasets.Dataset.from_dict({"text": _sentences(n, seed), "label": [rng.randrange(3) for _ in range(n)]})


def _reference_ll(model, tok, context: str, choice: str, *, prefix: list[int] | None = None) -> float:
    """Score one (context, choice) alone: tokenize context + " " + choice together, split at the context's length."""
    ctx = (prefix or []) + tok(context, add_special_tokens=False)["input_ids"]
    whole = (prefix or []) + tok(context + " " + choice, add_special_tokens=False)["input_ids"]
    cont = whole[len(ctx):]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ctx + cont])).logits[0].float(), -1)
    return sum(float(logp[len(ctx) - 1 + i, t]) for i, t in enumerate(cont))


# --- multiple choice ---------------------------------------------------------------------------------------------

def test_mc_loglikelihoods_match_unbatched_reference(model, tok):
    ds = _mc_split()
    ev = MultipleChoiceEvaluator(ds, tok, batch_size=5)
    lls = ev.loglikelihoods(model)
    assert ev.shared == 0 and ev.n_requests == sum(len(c) for c in ds["choices"])
    for i, row in enumerate(ds):
        ref = [_reference_ll(model, tok, row["context"], c) for c in row["choices"]]
        np.testing.assert_allclose(lls[i], ref, atol=1e-4, rtol=0)
    expected = np.mean([int(np.argmax(ll)) == y for ll, y in zip(lls, ds["label"])])
    assert ev(model)["accuracy"] == pytest.approx(expected)


def test_mc_differs_from_the_bare_choice_pitfall(model, tok):
    """Scoring the choice tokenized on its own after "context " picks other tokens and other numbers."""
    ds = _mc_split(6)
    lls = MultipleChoiceEvaluator(ds, tok).loglikelihoods(model)
    diffs = []
    for i, row in enumerate(ds):
        ctx = tok(row["context"] + " ", add_special_tokens=False)["input_ids"]
        for j, c in enumerate(row["choices"]):
            bare = tok(c, add_special_tokens=False)["input_ids"]
            joint = encode_pair(tok, row["context"], " " + c)[1]
            assert bare != joint  # "Ġthe" vs "the": different token ids
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([ctx + bare])).logits[0], -1)
            wrong = sum(float(logp[len(ctx) - 1 + k, t]) for k, t in enumerate(bare))
            diffs.append(abs(wrong - lls[i][j]))
    assert min(diffs) > 1e-3


def test_single_token_fast_path_equals_general_path(model, tok):
    for w in LABELS:
        assert len(tok(" " + w, add_special_tokens=False)["input_ids"]) == 1  # the precondition of the fast path
    ds = _tweets(11)
    kw = {"choices": LABELS, "template": "Tweet: {text}\nSentiment:", "batch_size": 4}
    fast = MultipleChoiceEvaluator(ds, tok, **kw)
    slow = MultipleChoiceEvaluator(ds, tok, share_context=False, **kw)
    assert fast.shared == 11 and fast.n_requests == 11
    assert slow.shared == 0 and slow.n_requests == 33
    a, b = fast.loglikelihoods(model), slow.loglikelihoods(model)
    np.testing.assert_allclose(np.stack(a), np.stack(b), atol=1e-5, rtol=0)
    for i, text in enumerate(ds["text"]):
        ref = [_reference_ll(model, tok, f"Tweet: {text}\nSentiment:", c) for c in LABELS]
        np.testing.assert_allclose(a[i], ref, atol=1e-4, rtol=0)
    assert fast(model) == slow(model)
    assert fast.fingerprint == slow.fingerprint  # the same numbers: a run option, not a setting


def test_examples_mixing_fast_and_general_path(model, tok):
    ds = datasets.Dataset.from_dict({"context": ["Tweet: good day\nSentiment:", "Q: the cat\nA:"],
                                     "choices": [list(LABELS), ["the cat sat", "a dog"]], "label": [2, 1]})
    ev = MultipleChoiceEvaluator(ds, tok, batch_size=8)
    assert ev.shared == 1 and ev.n_requests == 3
    lls = ev.loglikelihoods(model)
    for i, row in enumerate(ds):
        np.testing.assert_allclose(lls[i], [_reference_ll(model, tok, row["context"], c) for c in row["choices"]],
                                   atol=1e-4, rtol=0)


def test_batch_size_does_not_change_results(model, tok):
    ds = _mc_split(15, seed=3)
    one, seven = MultipleChoiceEvaluator(ds, tok, batch_size=1), MultipleChoiceEvaluator(ds, tok, batch_size=7)
    assert any(b["attention_mask"].min() == 0 for b in seven._batches)  # some batches really are right-padded
    np.testing.assert_allclose(np.concatenate(one.loglikelihoods(model)), np.concatenate(seven.loglikelihoods(model)),
                               atol=1e-5, rtol=0)
    assert one(model) == seven(model)
    assert one.fingerprint == seven.fingerprint


def test_batches_group_similar_lengths():
    from deltakit.lm_eval import _length_batches

    lengths = [5, 50, 7, 48, 49, 6, 30, 5, 51, 8]
    batches = _length_batches(lengths, 3)
    assert sorted(i for b in batches for i in b) == list(range(10))
    assert all(len(b) <= 3 for b in batches) and batches[0][0] == 8  # the longest first
    for b in batches:  # at most 10% padding
        assert max(lengths[i] for i in b) * len(b) <= 1.1 * sum(lengths[i] for i in b)
    assert _length_batches([4] * 7, 3) == [[0, 1, 2], [3, 4, 5], [6]]


def test_acc_norm_divides_by_characters_not_tokens(tok):
    """Under a uniform model a choice costs -log(V) per token: cases where dividing by characters and by tokens
    pick different choices, and where acc and acc_norm disagree."""
    # " aa" is 2 tokens / 2 characters, " positive" 1 token / 8 characters, " a" 1 token / 1 character.
    ntok = {c: len(encode_pair(tok, "Tweet: x\nSentiment:", " " + c)[1]) for c in ("aa", "positive", "a")}
    assert ntok == {"aa": 2, "positive": 1, "a": 1}
    bigram = BigramLM(len(tok))
    logv = np.log(len(tok))
    ds = datasets.Dataset.from_dict({"context": ["Tweet: x\nSentiment:"], "choices": [["aa", "positive"]],
                                     "label": [1]})
    ev = MultipleChoiceEvaluator(ds, tok)
    lls = ev.loglikelihoods(bigram)
    np.testing.assert_allclose(lls[0], [-2 * logv, -logv], rtol=1e-6)
    # per token: a tie (-log V each) -> the first choice; per character: -log V vs -log V / 8 -> the second.
    assert ev(bigram) == {"accuracy": 1.0, "accuracy_norm": 1.0}
    by_tokens = int(np.argmax(lls[0] / np.array([2, 1])))
    assert by_tokens == 0
    # acc and acc_norm disagree: equal log-likelihoods (1 token each), 1 vs 8 characters.
    ds2 = datasets.Dataset.from_dict({"context": ["Tweet: x\nSentiment:"], "choices": [["a", "positive"]],
                                      "label": [1]})
    assert MultipleChoiceEvaluator(ds2, tok)(bigram) == {"accuracy": 0.0, "accuracy_norm": 1.0}


def test_choice_metrics_by_hand():
    # ll -6 over 6 characters (-1.0 each) beats -4 over 2 characters (-2.0 each); raw, -4 wins.
    assert choice_metrics([np.array([-6.0, -4.0])], [[6, 2]], np.array([0])) == {"accuracy": 0.0,
                                                                                 "accuracy_norm": 1.0}
    # "café" has 4 characters (5 bytes): -4/4 = -1 ties with -5/5 -> the first choice.
    assert choice_metrics([np.array([-5.0, -4.0])], [[len("abcde"), len("café")]], np.array([0]))["accuracy_norm"] \
        == 1.0


@pytest.mark.parametrize("share_context", [True, False])
def test_ties_go_to_the_first_choice(tok, share_context):
    bigram = BigramLM(len(tok))  # uniform: equal token counts and lengths -> exact ties
    ds = datasets.Dataset.from_dict({"text": ["good", "bad"], "label": [0, 2]})
    ev = MultipleChoiceEvaluator(ds, tok, choices=("negative", "positive", "positive"),
                                 template="Tweet: {text}\nSentiment:", share_context=share_context)
    assert ev(bigram) == {"accuracy": 0.5, "accuracy_norm": 0.5}
    ds = datasets.Dataset.from_dict({"context": ["Q: a\nA:", "Q: b\nA:"], "choices": [["a dog", "a dog"]] * 2,
                                     "label": [0, 1]})
    assert MultipleChoiceEvaluator(ds, tok, share_context=share_context)(bigram)["accuracy"] == 0.5


def test_trailing_whitespace_moves_to_the_continuation(model, tok):
    ctx, cont = encode_pair(tok, "Sentiment: ", "positive")
    assert (ctx, cont) == encode_pair(tok, "Sentiment:", " positive")
    assert tok.convert_ids_to_tokens(cont) == ["Ġpositive"]
    ds = _tweets(5)
    a = MultipleChoiceEvaluator(ds, tok, choices=LABELS, template="Tweet: {text}\nSentiment: ", target_delimiter="")
    b = MultipleChoiceEvaluator(ds, tok, choices=LABELS, template="Tweet: {text}\nSentiment:")
    np.testing.assert_allclose(np.stack(a.loglikelihoods(model)), np.stack(b.loglikelihoods(model)), atol=1e-6)
    assert a.shared == 5


def test_bos_only_when_the_tokenizer_adds_one(model, tok):
    from tokenizers import processors

    assert MultipleChoiceEvaluator(_tweets(3), tok, choices=LABELS, template="{text}").add_bos is False
    bos_tok = copy.deepcopy(tok)
    eos = tok.eos_token_id
    bos_tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", eos)])
    bos_tok.bos_token = "<|endoftext|>"
    assert bos_tok("the cat")["input_ids"][0] == eos
    ds = _tweets(4)
    kw = {"choices": LABELS, "template": "Tweet: {text}\nSentiment:"}
    with_bos = MultipleChoiceEvaluator(ds, bos_tok, **kw)
    assert with_bos.add_bos and "bos=True" in with_bos.fingerprint
    lls = with_bos.loglikelihoods(model)
    for i, text in enumerate(ds["text"]):
        ref = [_reference_ll(model, tok, f"Tweet: {text}\nSentiment:", c, prefix=[eos]) for c in LABELS]
        np.testing.assert_allclose(lls[i], ref, atol=1e-4, rtol=0)
    without = MultipleChoiceEvaluator(ds, bos_tok, add_bos=False, **kw)
    plain = MultipleChoiceEvaluator(ds, tok, **kw)
    assert not without.add_bos and without.fingerprint == plain.fingerprint != with_bos.fingerprint


def test_chat_template_drops_the_delimiter_and_is_recorded(model, tok):
    chat_tok = copy.deepcopy(tok)
    chat_tok.chat_template = ("{% for m in messages %}<|user|>{{ m['content'] }}{% endfor %}"
                              "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")  # ends in "\n", as ChatML
    ds = _tweets(3)
    kw = {"choices": LABELS, "template": "Tweet: {text}"}
    chat = MultipleChoiceEvaluator(ds, chat_tok, chat_template=True, **kw)
    plain = MultipleChoiceEvaluator(ds, chat_tok, **kw)
    assert chat.contexts[0] == f"<|user|>Tweet: {ds['text'][0]}<|assistant|>\n"
    assert chat.target_delimiter == "" and plain.target_delimiter == " "
    assert "chat_template=True" in chat.fingerprint and "chat_template=False" in plain.fingerprint
    # "\n" + label word: two tokens that differ only in the last one, so the shared pass still applies
    assert chat.shared == 3
    general = MultipleChoiceEvaluator(ds, chat_tok, chat_template=True, share_context=False, **kw)
    np.testing.assert_allclose(np.stack(chat.loglikelihoods(model)), np.stack(general.loglikelihoods(model)),
                               atol=1e-5, rtol=0)
    # no delimiter: the continuation is the "\n" moved from the context, then the bare choice
    ctx, cont = encode_pair(chat_tok, chat.contexts[0], "positive")
    assert chat_tok.decode(cont) == "\npositive" and chat_tok.decode(ctx).endswith("<|assistant|>")
    lls = chat.loglikelihoods(model)
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ctx + cont])).logits[0], -1)
    assert lls[0][2] == pytest.approx(sum(float(logp[len(ctx) - 1 + k, t]) for k, t in enumerate(cont)), abs=1e-4)
    with pytest.raises(ValueError, match="no chat template"):
        MultipleChoiceEvaluator(ds, tok, chat_template=True, **kw)


def test_string_labels_and_fingerprint_tracks_data(tok):
    ds = datasets.Dataset.from_dict({"context": ["Q: a\nA:"], "choices": [["a dog", "the cat"]],
                                     "label": ["the cat"]})
    ev = MultipleChoiceEvaluator(ds, tok)
    assert ev.labels.tolist() == [1]
    other = datasets.Dataset.from_dict({"context": ["Q: b\nA:"], "choices": [["a dog", "the cat"]],
                                        "label": ["the cat"]})
    assert MultipleChoiceEvaluator(other, tok).fingerprint != ev.fingerprint
    assert ev.fingerprint == MultipleChoiceEvaluator(ds, tok).fingerprint


# --- generation --------------------------------------------------------------------------------------------------

def _gen_split(n: int = 9) -> datasets.Dataset:
    rng = random.Random(5)
    prompts = [f"Question: {' '.join(rng.choice(WORDS) for _ in range(rng.randint(1, 12)))}?\nAnswer:"
               for _ in range(n)]
    return datasets.Dataset.from_dict({"prompt": prompts, "answer": ["x"] * n})


def _reference_generation(model, tok, prompt: str, max_new_tokens: int) -> str:
    ids = torch.tensor([tok(prompt, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=max_new_tokens, pad_token_id=tok.eos_token_id)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_batched_generation_equals_unbatched(model, tok):
    ds = _gen_split()
    padding_side, pad_token = tok.padding_side, tok.pad_token
    one = GenerationEvaluator(ds, tok, until=(), max_new_tokens=8, batch_size=1).generate(model)
    four = GenerationEvaluator(ds, tok, until=(), max_new_tokens=8, batch_size=4).generate(model)
    ref = [_reference_generation(model, tok, p, 8) for p in ds["prompt"]]
    assert one == four == ref
    batched = GenerationEvaluator(ds, tok, until=(), max_new_tokens=8, batch_size=4)
    assert any(len({len(batched._ids[i]) for i in rows}) > 1 for rows in batched._order)  # really left-padded
    assert sum(len(g) for g in ref) > 0
    assert (tok.padding_side, tok.pad_token) == (padding_side, pad_token)  # the caller's tokenizer is untouched


def test_empty_prompt_and_empty_context_start_from_eos(model, tok):
    gen = GenerationEvaluator(datasets.Dataset.from_dict({"prompt": [""], "answer": ["x"]}), tok, max_new_tokens=3)
    assert gen._ids == [[tok.eos_token_id]]
    gen(model)
    ctx, cont = encode_pair(tok, "", " positive")
    assert ctx == [tok.eos_token_id] and tok.convert_ids_to_tokens(cont) == ["Ġpositive"]


def test_until_cuts_at_the_earliest_stop_string(model, tok):
    ds = _gen_split()
    raw = GenerationEvaluator(ds, tok, until=(), max_new_tokens=10, batch_size=3).generate(model)
    # a stop character found in the middle of some generation
    stop = next(ch for g in raw for ch in g[1:-1] if ch.strip())
    cut = GenerationEvaluator(ds, tok, until=(stop, "zzzz"), max_new_tokens=10, batch_size=3).generate(model)
    assert cut == [g.split(stop)[0] for g in raw]
    assert any(stop in g for g in raw) and not any(stop in g for g in cut)
    assert cut_at_stop("a\nb.c", ("\n", ".")) == "a" and cut_at_stop("ab.c\n", ("\n", ".")) == "ab"
    assert cut_at_stop("abc", ()) == "abc"


def test_exact_match_with_regex_and_callable_extraction(model, tok):
    ds = _gen_split(6)
    raw = GenerationEvaluator(ds, tok, until=(), max_new_tokens=6).generate(model)
    assert all(g.strip() for g in raw)
    gold = [g.strip() if i % 2 == 0 else "nope" for i, g in enumerate(raw)]
    ds2 = datasets.Dataset.from_dict({"prompt": ds["prompt"], "answer": gold})
    m = GenerationEvaluator(ds2, tok, until=(), max_new_tokens=6)(model)
    assert m == {"exact_match": 0.5, "extracted": 1.0}
    # a regex with a group: the first non-space run; a callable: the first character, or nothing
    first_words = [g.split()[0] for g in raw]
    ds3 = datasets.Dataset.from_dict({"prompt": ds["prompt"], "answer": first_words})
    assert GenerationEvaluator(ds3, tok, until=(), max_new_tokens=6, extract=r"(\S+)")(model)["exact_match"] == 1.0
    m = GenerationEvaluator(ds3, tok, until=(), max_new_tokens=6, extract=lambda s: None)(model)
    assert m == {"exact_match": 0.0, "extracted": 0.0}


def test_extractors_by_hand():
    assert extract_answer("The answer is 42.", r"answer is (\d+)") == "42"
    assert extract_answer("The answer is 42.", r"\d+") == "42"  # no group: the whole match
    assert extract_answer("no number", r"\d+") is None
    assert extract_answer("  ", r"^\s*(.*?)\s*$") is None  # empty = not extracted
    assert extract_answer("Paris", str.upper) == "PARIS"
    assert extract_answer("x", lambda s: None) is None
    assert extract_answer("so #### 7", "gsm8k") == "7"  # a registered name


def test_gsm8k_extraction():
    assert gsm8k_gold("She has 1000 + 234 = 1234 apples.\n#### 1,234") == "1234"
    assert gsm8k_extract("... so the total is 1,000 + 234.\n#### 1,234") == "1234"
    assert gsm8k_extract("She pays $12 then $1,250.50 in all.") == "1250.50"  # flexible: the last number
    assert gsm8k_extract("First 3 apples, then 18.") == "18"
    assert gsm8k_extract("The answer is -5.") == "-5"
    assert gsm8k_extract("no digits here") is None
    assert normalise_answer(" $1,234. ") == "1234" and normalise_answer(" Paris, France. ") == "Paris, France."
    task = gsm8k_task()
    assert task.kind == "generate" and task.extract == "gsm8k" and "Question:" in task.until


def test_gsm8k_end_to_end_gold_with_marker(tok):
    ds = datasets.Dataset.from_dict({"question": ["1 plus 1?"], "answer": ["1 + 1 = 2\n#### 2"]})
    ev = gsm8k_task().evaluator(ds, tok, max_new_tokens=4)
    assert ev.answers == ["2"] and ev.prompts == ["Question: 1 plus 1?\nAnswer:"]
    assert ev.predictions(["It is 3. Then 2"]) == ["2"] and ev.predictions(["nothing"]) == [None]


# --- task descriptions -------------------------------------------------------------------------------------------

def test_lm_task_round_trip_and_fingerprint(tok):
    task = LMTask(kind="choice", name="sentiment", template="Tweet: {text}\nSentiment:", choices=list(LABELS),
                  target_column="label")
    assert task.choices == LABELS
    assert LMTask.from_dict(task.to_dict()) == task
    assert task.fingerprint() == LMTask.from_dict(task.to_dict() | {"name": "other"}).fingerprint()
    assert task.fingerprint() != LMTask(**(task.to_dict() | {"chat_template": True, "choices": LABELS})).fingerprint()
    ev = task.evaluator(_tweets(4), tok, batch_size=2)
    assert isinstance(ev, MultipleChoiceEvaluator) and ev.shared == 4
    with pytest.raises(ValueError, match="unknown LMTask field"):
        LMTask.from_dict({"kind": "choice", "colour": "red"})
    with pytest.raises(ValueError, match="unknown task kind"):
        LMTask(kind="classify")


def test_infer_lm_task(tok):
    assert infer_lm_task(["context", "choices", "label"]).kind == "choice"
    gen = infer_lm_task(["prompt", "answer"])
    assert gen.kind == "generate" and gen.input_column == "prompt"
    gsm = datasets.Dataset.from_dict({"question": ["q"], "answer": ["a\n#### 3"]})
    assert infer_lm_task(gsm) == gsm8k_task()
    plain_q = datasets.Dataset.from_dict({"question": ["q"], "answer": ["3"]})
    assert infer_lm_task(plain_q).template == "Question: {question}\nAnswer:"
    ppl = infer_lm_task(["text"])
    assert ppl.kind == "perplexity"
    ev = ppl.evaluator(datasets.Dataset.from_dict({"text": ["the cat sat", "a dog"]}), copy.deepcopy(tok),
                       batch_size=2, progress=True)
    assert isinstance(ev, PerplexityEvaluator) and ev.fingerprint.startswith("perplexity:")
    with pytest.raises(ValueError, match=r"cannot tell the task from columns \['sentence', 'idx'\]"):
        infer_lm_task(["sentence", "idx"])
    with pytest.raises(ValueError, match="context column"):
        infer_lm_task(["choices", "label"])


# --- errors ------------------------------------------------------------------------------------------------------

def test_errors_name_the_value_and_the_fix(tok):
    ds = _mc_split(3)
    with pytest.raises(ValueError, match=r"no column\(s\) \['ctx'\]; available: \['context', 'choices', 'label'\]"):
        MultipleChoiceEvaluator(ds, tok, context_column="ctx")
    with pytest.raises(ValueError, match=r"no column\(s\) \['sentence'\].*template"):
        MultipleChoiceEvaluator(_tweets(2), tok, choices=LABELS, template="{sentence}")
    with pytest.raises(ValueError, match="empty"):
        MultipleChoiceEvaluator(ds.select([]), tok)
    with pytest.raises(ValueError, match=r"label 3 is outside its choices \(0..2"):
        MultipleChoiceEvaluator(datasets.Dataset.from_dict({"text": ["a"], "label": [3]}), tok, choices=LABELS,
                                template="{text}")
    with pytest.raises(ValueError, match="label -1 is outside"):
        MultipleChoiceEvaluator(datasets.Dataset.from_dict({"text": ["a"], "label": [-1]}), tok, choices=LABELS,
                                template="{text}")
    with pytest.raises(ValueError, match=re.escape("label 'happy' is not one of its choices")):
        MultipleChoiceEvaluator(datasets.Dataset.from_dict({"context": ["a"], "choices": [["x", "y"]],
                                                            "label": ["happy"]}), tok)
    with pytest.raises(ValueError, match="example 0 has no choices"):
        MultipleChoiceEvaluator(datasets.Dataset.from_dict({"context": ["a"], "choices": [[]], "label": [0]}), tok)
    with pytest.raises(ValueError, match="choices must be a non-empty"):
        MultipleChoiceEvaluator(_tweets(2), tok, choices=(), template="{text}")
    with pytest.raises(ValueError, match=r"no column\(s\) \['answer'\]"):
        GenerationEvaluator(_tweets(2), tok, prompt_column="text")
    with pytest.raises(ValueError, match="empty"):
        GenerationEvaluator(_gen_split(2).select([]), tok)
    with pytest.raises(ValueError, match="max_new_tokens"):
        GenerationEvaluator(_gen_split(2), tok, max_new_tokens=0)
    with pytest.raises(ValueError, match="batch_size"):
        GenerationEvaluator(_gen_split(2), tok, batch_size=0)


def test_tokenizer_without_pad_uses_eos_and_without_either_refuses(model, tok):
    assert tok.pad_token is None
    MultipleChoiceEvaluator(_mc_split(2), tok)(model)  # pads with EOS
    bare = copy.deepcopy(tok)
    bare.eos_token = None
    with pytest.raises(ValueError, match="neither a pad_token nor an eos_token"):
        GenerationEvaluator(_gen_split(2), bare)


def test_inputs_longer_than_the_position_table_are_refused(model, tok):
    long = datasets.Dataset.from_dict({"text": [" ".join(["the cat sat on the mat"] * 60)], "label": [0]})
    ev = MultipleChoiceEvaluator(long, tok, choices=LABELS, template="{text}")
    with pytest.raises(ValueError, match="max_position_embeddings=256; build the evaluator with max_length=256"):
        ev(model)
    short = MultipleChoiceEvaluator(long, tok, choices=LABELS, template="{text}", max_length=256)
    assert max(b["input_ids"].shape[1] for b in short._batches) == 256
    short(model)  # the context lost tokens from the left


def test_perplexity_batched_equals_one_text_at_a_time_and_leaves_the_tokenizer_alone(tok, model):
    texts = ["the cat sat on the mat", "a dog", "one two three four five six seven"]
    before = (tok.pad_token, tok.padding_side)
    left = copy.deepcopy(tok)
    left.padding_side = "left"  # a generation-style tokenizer: the evaluator pads on the right itself
    batched = PerplexityEvaluator(texts, left, batch_size=3)(model)
    nll, count = 0.0, 0
    for text in texts:
        one = PerplexityEvaluator([text], tok, batch_size=1)(model)
        n = len(tok(text)["input_ids"]) - 1
        nll, count = nll + one["nll"] * n, count + n
    assert batched["nll"] == pytest.approx(nll / count, rel=1e-5)
    assert (tok.pad_token, tok.padding_side) == before
    with pytest.raises(ValueError, match="two tokens"):
        PerplexityEvaluator([""], tok)
