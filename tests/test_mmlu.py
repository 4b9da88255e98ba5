"""5-shot MMLU scoring (recipes/mmlu.py): letter logits, accuracy definitions, prompt building, bad input."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from recipes.alpaca_data import DataFormatError
from recipes.mmlu import (
    MMLUQuestion,
    answer_token_ids,
    encode_question,
    evaluate_mmlu,
    load_mmlu_csv,
    load_mmlu_json,
    predict_answers,
    read_mmlu_csv,
    select_questions,
)

DATA_ROOT = Path(os.environ.get("PEFT_NOLA_DATA_DIR") or Path(__file__).resolve().parents[1].parent / "shared" / "data")
MMLU_DIR = DATA_ROOT / "mmlu"
GPT2_TOKENIZER = DATA_ROOT / "gpt2_tokenizer" / "tokenizer.json"

needs_mmlu = pytest.mark.skipif(not (MMLU_DIR / "dev").is_dir(), reason=f"MMLU data not found under {MMLU_DIR}")
needs_gpt2 = pytest.mark.skipif(not GPT2_TOKENIZER.is_file(), reason=f"GPT-2 tokenizer not found at {GPT2_TOKENIZER}")


def word_tokenizer(extra_words=()):
    """A whitespace word-level tokenizer, so every word is one known token and positions are easy to reason about."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    words = ["[UNK]", "[PAD]", "[BOS]", "Answer:", "A", "B", "C", "D", "A.", "B.", "C.", "D.", "the", "x", "y", "z",
             "w", "Which", "one?", *extra_words]
    vocab = {w: i for i, w in enumerate(dict.fromkeys(words))}
    backend = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]", bos_token="[BOS]")


class HandSetLogits(torch.nn.Module):
    """A stand-in causal LM whose logits are chosen by hand.

    Each prompt carries a marker word ``qN``; at the last real position the model emits ``letter_scores[qN]`` on the
    four answer letters and a larger score on a non-letter word (so scoring must restrict to the letters). Every other
    position, padding included, gets a decoy that would pick a different letter.
    """

    def __init__(self, tokenizer, letter_scores: dict[str, list[float]], accepts_keep: bool):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # gives the scorer a device to read
        self.tokenizer = tokenizer
        self.letter_ids = [tokenizer.convert_tokens_to_ids(x) for x in "ABCD"]
        self.marker_ids = {tokenizer.convert_tokens_to_ids(k): v for k, v in letter_scores.items()}
        self.accepts_keep = accepts_keep
        self.calls = 0

    def _full_logits(self, input_ids, attention_mask):
        batch, width = input_ids.shape
        logits = torch.zeros(batch, width, len(self.tokenizer))
        decoy = torch.tensor([0.0, 0.0, 0.0, 50.0])  # always "D" away from the answer position
        logits[:, :, self.letter_ids] = decoy
        for row in range(batch):
            length = int(attention_mask[row].sum())
            marker = next(int(t) for t in input_ids[row, :length] if int(t) in self.marker_ids)
            logits[row, length - 1, :] = 0.0
            logits[row, length - 1, self.tokenizer.convert_tokens_to_ids("the")] = 100.0
            logits[row, length - 1, self.letter_ids] = torch.tensor(self.marker_ids[marker])
        return logits

    def forward(self, input_ids, attention_mask, **kwargs):
        self.calls += 1
        return SimpleNamespace(logits=self._full_logits(input_ids, attention_mask))


class HandSetLogitsWithKeep(HandSetLogits):
    """Same, but honours ``logits_to_keep`` (a tensor of positions) the way transformers' causal LMs do."""

    def forward(self, input_ids, attention_mask, logits_to_keep=0, **kwargs):
        logits = self._full_logits(input_ids, attention_mask)
        if isinstance(logits_to_keep, torch.Tensor):
            logits = logits[:, logits_to_keep, :]
        return SimpleNamespace(logits=logits)


def make_question(subject: str, marker: str, answer: int, padding_words: int) -> MMLUQuestion:
    filler = " ".join(["x"] * padding_words)
    return MMLUQuestion(subject=subject, header="", shots=(),
                        question=f"Which one? {marker} {filler}\nA. x\nB. y\nC. z\nD. w\nAnswer:", answer=answer)


# Hand-set letter scores (A, B, C, D) per question and the answer key; argmax gives the prediction in the comment.
CASES = [
    ("algebra", "q0", 0, [3.0, 1.0, 0.0, -1.0]),  # predicts A: correct
    ("algebra", "q1", 2, [0.0, 0.5, 2.5, 2.0]),  # predicts C: correct
    ("algebra", "q2", 1, [4.0, 3.9, 0.0, 0.0]),  # predicts A: wrong
    ("law", "q3", 3, [-5.0, -4.0, -3.0, -2.0]),  # predicts D: correct
    ("history", "q4", 0, [0.0, 0.0, 7.0, 0.0]),  # predicts C: wrong
]


@pytest.mark.parametrize("model_cls", [HandSetLogits, HandSetLogitsWithKeep])
@pytest.mark.parametrize("batch_size", [1, 3])
def test_accuracy_from_hand_set_letter_logits(model_cls, batch_size):
    tokenizer = word_tokenizer([marker for _, marker, _, _ in CASES])
    model = model_cls(tokenizer, {marker: scores for _, marker, _, scores in CASES}, accepts_keep=True)
    # Different lengths so right padding happens inside a batch.
    questions = [make_question(s, m, a, padding_words=i * 2) for i, (s, m, a, _) in enumerate(CASES)]
    scored = predict_answers(model, tokenizer, questions, max_length=64, batch_size=batch_size)
    assert scored["predictions"] == [0, 2, 0, 3, 2]
    assert scored["letter_logits"][3] == [-5.0, -4.0, -3.0, -2.0]
    metrics = evaluate_mmlu(model, tokenizer, questions, max_length=64, batch_size=batch_size)
    # Per subject: algebra 2/3, law 1/1, history 0/1. QLoRA's MMLU is the mean over subjects; micro is 3/5.
    assert metrics["per_subject"] == pytest.approx({"algebra": 200 / 3, "law": 100.0, "history": 0.0})
    assert metrics["MMLU"] == pytest.approx((200 / 3 + 100 + 0) / 3)
    assert metrics["MMLU_micro"] == pytest.approx(60.0)
    assert metrics["num_questions"] == 5


def test_shots_are_dropped_whole_from_the_front_when_too_long():
    tokenizer = word_tokenizer(["header.", "s1", "s2", "s3", "q"])
    shots = tuple(f"{s} x\nAnswer: A\n\n" for s in ("s1", "s2", "s3"))
    question = MMLUQuestion("algebra", "header.\n\n", shots, "q y\nAnswer:", 1)
    full_ids, dropped = encode_question(tokenizer, question, max_length=100)
    # BOS + header(1) + 3 shots x 4 words + question 3 words = 17 tokens.
    assert dropped == 0 and len(full_ids) == 17
    ids, dropped = encode_question(tokenizer, question, max_length=12)
    assert dropped == 2
    assert tokenizer.convert_ids_to_tokens(ids) == ["[BOS]", "header.", "s3", "x", "Answer:", "A", "q", "y", "Answer:"]


def test_malformed_mmlu_json_names_file_and_line(tmp_path):
    good = {"subject": "law", "input": "Q?\nA. a\nB. b\nC. c\nD. d\nAnswer:", "output": "B"}
    lines = [
        json.dumps(good),
        json.dumps({**good, "output": "E"}),  # line 2: not a letter
        json.dumps({"subject": "law", "output": "A"}),  # line 3: no input
        json.dumps(good),
    ]
    path = tmp_path / "mmlu.json"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataFormatError) as info:
        load_mmlu_json(path)
    message = str(info.value)
    assert f"{path}:2:" in message and "'E'" in message
    assert f"{path}:3:" in message and "input" in message
    assert "2 malformed" in message


def test_malformed_mmlu_csv_names_file_and_line(tmp_path):
    path = tmp_path / "law_test.csv"
    path.write_text('question,choice0,choice1,choice2,choice3,answer\nQ1,a,b,c,d,2\n"Q2",a,b,c,d,7\nQ3,a,b,c\nQ4,a,b,c,d,B\n')
    with pytest.raises(DataFormatError) as info:
        read_mmlu_csv(path)
    message = str(info.value)
    assert f"{path}:3:" in message and "'7'" in message
    assert f"{path}:4:" in message and "6 columns" in message
    good = tmp_path / "ok.csv"
    good.write_text("Q1,a,b,c,d,C\nQ2,a,b,c,d,0\n")  # the original header-less layout with letters or indices
    assert [a for _, _, a in read_mmlu_csv(good)] == [2, 0]


@needs_gpt2
def test_answer_tokens_are_the_space_prefixed_letters_for_bpe():
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(GPT2_TOKENIZER))
    assert answer_token_ids(tokenizer) == [tokenizer.convert_tokens_to_ids("\u0120" + x) for x in "ABCD"]


@needs_mmlu
def test_csv_prompts_match_qlora_released_files():
    """Prompts built from the CSVs equal QLoRA's zero-shot test file and the 5-shot val file's shots."""
    zero_shot = load_mmlu_json(MMLU_DIR / "zero_shot_mmlu_test.json")
    built = load_mmlu_csv(MMLU_DIR, "test")
    assert len(built) == len(zero_shot) == 14042
    for ours, theirs in zip(built, zero_shot):
        assert (ours.subject, ours.header + ours.question, ours.answer) == (theirs.subject, theirs.prompt, theirs.answer)
    five_shot = load_mmlu_json(MMLU_DIR / "five_shot_mmlu_val.untruncated.json")
    shots_by_subject = {q.subject: q.shots for q in built}
    assert all(len(q.shots) == 5 and q.shots == shots_by_subject[q.subject] for q in five_shot)


@needs_mmlu
def test_fixed_subset_is_reproducible():
    questions = load_mmlu_json(MMLU_DIR / "five_shot_mmlu_val.untruncated.json")
    first = select_questions(questions, max_samples=20, seed=3)
    assert first == select_questions(questions, max_samples=20, seed=3)
    assert len(first) == 20 and first != select_questions(questions, max_samples=20, seed=4)
    one_each = select_questions(questions, per_subject=1)
    assert len(one_each) == 57 and len({q.subject for q in one_each}) == 57


def _naive_predictions(model, tokenizer, questions):
    """Reference scoring: one unpadded forward per prompt, full logits, argmax of the letters at the last position."""
    letters = [tokenizer.convert_tokens_to_ids("\u0120" + x) for x in "ABCD"]
    predictions = []
    with torch.no_grad():
        for q in questions:
            ids = torch.tensor([[tokenizer.bos_token_id] + tokenizer(q.prompt)["input_ids"]])
            predictions.append(int(model(input_ids=ids).logits[0, -1, letters].argmax()))
    return predictions


@needs_mmlu
@needs_gpt2
def test_command_line_scores_a_saved_model_and_adapter_like_a_naive_loop(tmp_path):
    """``python -m recipes.mmlu --model DIR [--adapter DIR]`` agrees with an unbatched full-logits reference."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from recipes.mmlu import main

    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(GPT2_TOKENIZER), bos_token="<|endoftext|>",
                                        eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=50257, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                                         bos_token_id=50256, eos_token_id=50256)).eval()
    model_dir, adapter_dir = tmp_path / "model", tmp_path / "adapter"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    # A LoRA adapter with random (non-zero) B, so the adapted letter logits differ from the base ones.
    adapted = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"],
                                               init_lora_weights=False))
    adapted.save_pretrained(adapter_dir)

    # Eight real 5-shot questions with short prompts, written out in QLoRA's format.
    source = [json.loads(line) for line in (MMLU_DIR / "five_shot_mmlu_val.untruncated.json").open()]
    short = [r for r in source if len(r["input"]) < 1500][::40][:8]
    questions_file = tmp_path / "mmlu_short.json"
    questions_file.write_text("".join(json.dumps(r) + "\n" for r in short))
    questions = load_mmlu_json(questions_file)
    flags = ["--split", "val", "--batch_size", "3", "--mmlu_path", str(questions_file)]

    base = main(["--model", str(model_dir), *flags, "--output_dir", str(tmp_path / "base")])
    expected = _naive_predictions(LlamaForCausalLM.from_pretrained(model_dir).eval(), tokenizer, questions)
    assert base["predictions"] == "".join("ABCD"[p] for p in expected)

    with_adapter = main(["--model", str(model_dir), "--adapter", str(adapter_dir), *flags])
    reference = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(model_dir), adapter_dir).eval()
    expected_adapted = _naive_predictions(reference, tokenizer, questions)
    assert with_adapter["predictions"] == "".join("ABCD"[p] for p in expected_adapted)
    correct = sum(p == q.answer for p, q in zip(expected_adapted, questions))
    assert with_adapter["MMLU_micro"] == pytest.approx(100 * correct / len(questions))
    written = json.loads((tmp_path / "base" / "mmlu.json").read_text())
    assert written["num_questions"] == len(questions) == 8 and written["MMLU"] == pytest.approx(base["MMLU"])
