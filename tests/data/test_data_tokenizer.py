import random

import pytest

from megatron.data.tokenizer import build_tokenizer, split_for_tiktoken

VARIED_TEXTS = [
    "This is a test sentence.",
    "",
    " ",
    "Hello,   world!\r\n\r\nTabs\tand  double  spaces  ",
    "Ünïcödé façade — naïve café; 日本語のテキスト; Привет мир; مرحبا بالعالم; 🙂🚀👍🏽",
    "def f(x):\n    return x ** 2  # square\n\n\nprint(f(12345678901234))",
    "I'm sure they'll say we'd've DONE it; it's JOHN'S car.",
    "Numbers 3.14159 1,000,000 0x1F 2024-05-01 ½ ⅞",
    "<|begin_of_text|>user<|eot_id|> <|reserved_special_token_7|> look like specials",
    "\n\n\n   \n\t\t\n",
    "a" * 5000 + " " + "b" * 100,
]


def reference():
    from llama_models.llama3.tokenizer import Tokenizer

    return Tokenizer.get_instance()


def test_llama3_vectors(llama3):
    assert llama3.encode("This is a test sentence.") == [2028, 374, 264, 1296, 11914, 13]
    assert llama3.encode("user") == [882]
    assert llama3.encode("system") == [9125]
    assert llama3.encode("assistant") == [78191]
    assert llama3.encode("\n\n") == [271]
    assert (llama3.vocab_size, llama3.bos_id, llama3.eod_id, llama3.pad_id) == (128256, 128000, 128001, 128004)
    assert llama3.token_to_id("<|eot_id|>") == 128009
    assert llama3.token_to_id("<|start_header_id|>") == 128006
    assert llama3.decode([128005, 128011, 128255]) == (
        "<|reserved_special_token_2|><|reserved_special_token_3|><|reserved_special_token_247|>"
    )


@pytest.mark.parametrize("text", VARIED_TEXTS)
def test_llama3_matches_meta_reference(llama3, text):
    ids = llama3.encode(text)
    assert ids == reference().encode(text, bos=False, eos=False)
    assert llama3.decode(ids) == text


def test_special_token_text_is_plain_text(llama3):
    ids = llama3.encode("<|eot_id|>")
    assert 128009 not in ids and all(i < 128000 for i in ids)


def test_long_document_is_chunked_like_reference(llama3):
    rng = random.Random(0)
    parts = ["word " * 3000, "x" * 60_000, " " * 30_000, "\n" * 26_000, "ünï" * 10_000, "tok1 tok2. " * 500]
    text = "".join(rng.choice(parts) for _ in range(40))
    text = (text * (1_000_000 // len(text) + 1))[:1_000_000]
    ref = reference()
    expected_pieces = [
        piece
        for i in range(0, len(text), 400_000)
        for piece in ref._split_whitespaces_or_nonwhitespaces(text[i : i + 400_000], 25_000)
    ]
    assert list(split_for_tiktoken(text)) == expected_pieces
    ids = llama3.encode(text)
    assert ids == ref.encode(text, bos=False, eos=False)
    assert llama3.decode(ids) == text


def test_encode_batch_matches_encode(llama3):
    texts = VARIED_TEXTS + ["y" * 80_000]
    assert llama3.encode_batch(texts) == [llama3.encode(t) for t in texts]


def test_unknown_type_names_valid_ones():
    with pytest.raises(ValueError, match="Llama3Tokenizer, HFTokenizer, SPMTokenizer"):
        build_tokenizer("GPT2BPETokenizer")


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.model"):
        build_tokenizer("Llama3Tokenizer", str(tmp_path / "nope.model"))
    with pytest.raises(ValueError, match="needs a vocab_file"):
        build_tokenizer("HFTokenizer")


CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Pack my box with five dozen liquor jugs.",
    "How vexingly quick daft zebras jump!",
    "Sphinx of black quartz, judge my vow.",
] * 20


def test_hf_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>", "<pad>"])
    tok.train_from_iterator(CORPUS, trainer)
    path = str(tmp_path / "tokenizer.json")
    tok.save(path)

    hf = build_tokenizer("HFTokenizer", path)
    assert (hf.bos_id, hf.eod_id, hf.pad_id) == (0, 1, 2)
    assert hf.vocab_size == tok.get_vocab_size()
    ids = hf.encode("The lazy fox.")
    assert ids and hf.bos_id not in ids
    assert hf.decode(ids).replace("Ġ", " ").strip()  # byte-level decoding without a decoder is lossy
    assert hf.encode_batch(["The lazy fox.", "quartz"]) == [ids, hf.encode("quartz")]


def _gpt2_style_hf_tokenizer(path):
    """A byte-level BPE whose only specials are GPT-2's <|endoftext|> (its EOD, and its BOS too) and <s>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    tok.save(str(path))
    return str(path)


def test_hf_tokenizer_encodes_special_token_text_as_text(tmp_path):
    """Corpus text that spells an added token must not become its control id (tokenizers matches added tokens
    in the input even with add_special_tokens=False)."""
    hf = build_tokenizer("HFTokenizer", _gpt2_style_hf_tokenizer(tmp_path / "tokenizer.json"))
    assert (hf.eod_id, hf.bos_id) == (0, 1)
    text = "hi <|endoftext|> there <s>"
    ids = hf.encode(text)
    assert hf.eod_id not in ids and hf.bos_id not in ids
    assert hf.decode(ids) == text
    assert hf.encode_batch([text]) == [ids] and hf.encode_to_array(text).tolist() == ids


def test_spm_tokenizer(tmp_path):
    import sentencepiece as spm

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(CORPUS))
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(tmp_path / "spm"), vocab_size=60, model_type="bpe",
        minloglevel=2, pad_id=3,
    )
    sp = build_tokenizer("SPMTokenizer", str(tmp_path / "spm.model"))
    assert sp.vocab_size == 60 and (sp.bos_id, sp.eod_id, sp.pad_id) == (1, 2, 3)
    ids = sp.encode("the quick fox")
    assert sp.decode(ids) == "the quick fox"
    assert sp.encode_batch(["the quick fox"]) == [ids]
