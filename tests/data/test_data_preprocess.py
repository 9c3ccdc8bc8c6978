import gzip
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from data_helpers import load_tool

from megatron.data.indexed_dataset import IndexedDataset

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

GOOD = [
    "The first document.",
    "Second document with ünïcode and emoji 🙂.",
    "A third one\nwith two lines.",
    "Fourth.",
]


tool = load_tool("preprocess_data")


def write_jsonl(path, docs, extra_lines=()):
    with open(path, "wb") as f:
        for doc in docs:
            f.write(json.dumps({"text": doc, "meta": 1}).encode() + b"\n")
        for line in extra_lines:
            f.write(line + b"\n")
    return str(path)


BAD_LINES = [
    b'{"text": "unterminated',  # malformed_json
    b'{"content": "no text key"}',  # missing_key
    b'{"text": 42}',  # not_a_string
    b'{"text": null}',  # not_a_string
    b'{"text": "bad \xff\xfe bytes"}',  # undecodable
    b"[1, 2, 3]",  # not_an_object
    b'{"text": "lone \\ud800 surrogate"}',  # invalid_unicode
    b"   ",  # blank: skipped, not a record
]


def run(args):
    assert tool.main([*args, "--no-progress"]) == 0


def read_docs(prefix):
    ds = IndexedDataset(prefix)
    return [ds.document_tokens(d).tolist() for d in range(ds.num_documents)]


def expected_docs(tokenizer, texts, bos=True, eod=True):
    return [[tokenizer.bos_id] * bos + tokenizer.encode(t) + [tokenizer.eod_id] * eod for t in texts]


def test_jsonl_with_bad_lines(tmp_path, llama3, capsys):
    path = write_jsonl(tmp_path / "in.jsonl", GOOD[:2], BAD_LINES)
    with open(path, "ab") as f:
        f.write(json.dumps({"text": GOOD[2]}).encode() + b"\n")
    run(["--input", path, "--output-prefix", str(tmp_path / "out"), "--append-eod"])
    prefix = str(tmp_path / "out_text_document")
    assert read_docs(prefix) == expected_docs(llama3, GOOD[:3])
    stats = json.load(open(prefix + ".stats.json"))
    assert stats["documents_read"] == 10 and stats["documents_kept"] == 3
    assert stats["bad_records"] == {
        "invalid_unicode": 1, "malformed_json": 1, "missing_key": 1, "not_a_string": 2, "not_an_object": 1,
        "undecodable": 1,
    }
    assert stats["tokens_written"] == sum(map(len, expected_docs(llama3, GOOD[:3])))
    assert f"{path}:3: malformed_json" in stats["bad_record_examples"]
    assert f"{path}:7: undecodable" in stats["bad_record_examples"]
    assert f"{path}:4: missing_key (key 'text')" in stats["bad_record_examples"]
    out = capsys.readouterr()
    assert "3 of 10 documents kept" in out.out and f"{path}:5: not_a_string" in out.err


def test_compressed_and_parquet_inputs(tmp_path, llama3):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    lines = b"".join(json.dumps({"text": t}).encode() + b"\n" for t in GOOD)
    with gzip.open(tmp_path / "a.jsonl.gz", "wb") as f:
        f.write(lines)
    with open(tmp_path / "b.jsonl.zst", "wb") as f:
        f.write(zstandard.ZstdCompressor().compress(lines))
    pq.write_table(pa.table({"text": GOOD + [None], "id": list(range(5))}), tmp_path / "c.parquet")
    inputs = [str(tmp_path / "a.jsonl.gz") + "," + str(tmp_path / "b.jsonl.zst"), str(tmp_path / "c.parquet")]
    run(["--input", inputs[0], "--input", inputs[1], "--output-prefix", str(tmp_path / "o"), "--no-bos"])
    prefix = str(tmp_path / "o_text_document")
    assert read_docs(prefix) == expected_docs(llama3, GOOD * 3, bos=False, eod=False)
    stats = json.load(open(prefix + ".stats.json"))
    assert stats["bad_records"] == {"not_a_string": 1} and stats["documents_read"] == 13
    assert f"{tmp_path / 'c.parquet'}:5: not_a_string (key 'text')" in stats["bad_record_examples"]


def test_workers_give_identical_output(tmp_path):
    docs = [f"Document number {i}: " + "lorem ipsum dolor " * (i % 17) for i in range(300)] + GOOD * 5
    path = write_jsonl(tmp_path / "in.jsonl", docs, BAD_LINES[:2])
    common = ["--input", path, "--append-eod", "--chunk-size", "16", "--dedup"]
    run([*common, "--output-prefix", str(tmp_path / "one"), "--workers", "1"])
    run([*common, "--output-prefix", str(tmp_path / "two"), "--workers", "2"])
    for ext in (".bin", ".idx"):
        assert open(tmp_path / f"one_text_document{ext}", "rb").read() == open(
            tmp_path / f"two_text_document{ext}", "rb").read()
    stats = json.load(open(tmp_path / "two_text_document.stats.json"))
    assert stats["dropped"] == {"duplicate": 16}  # GOOD * 5: 4 first copies kept; 4 of "Document number 0: " ...


def test_strict_fails_without_output(tmp_path, capsys):
    path = write_jsonl(tmp_path / "in.jsonl", GOOD, [b'{"text": 1}'])
    for workers in ("1", "2"):
        assert tool.main(["--input", path, "--output-prefix", str(tmp_path / "s"), "--strict", "--no-progress",
                          "--workers", workers]) == 1
        assert f"{path}:5: not_a_string" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl"]


def test_cleaning_options_are_counted(tmp_path, llama3):
    cafe = ("The café on the corner was nice: good coffee, friendly staff, a quiet garden, fresh bread every "
            "morning and cheap lunches for students who came by after their lectures at the nearby university.")
    docs = [
        cafe,
        cafe.replace("é", "Ã©"),  # mojibake: ftfy repairs it, and it then duplicates the first document
        "tiny",
        "   ",
        "\n".join(["Subscribe to our newsletter!"] * 10 + ["Some real content follows here."]),
        # The Gopher top n-gram rules (as in datatrove) drop most texts under ~40 words: keep this one long.
        "A perfectly ordinary paragraph of English text mentions several different things: rivers, mountains, "
        "the price of bread, a letter from an old friend, and the weather, which was cold and grey all week. "
        "It passes every repetition rule without any trouble at all, because no phrase in it comes back.",
    ]
    path = write_jsonl(tmp_path / "in.jsonl", docs)
    run(["--input", path, "--output-prefix", str(tmp_path / "c"), "--ftfy", "--dedup", "--min-chars", "10",
         "--remove-repetitions"])
    stats = json.load(open(tmp_path / "c_text_document.stats.json"))
    assert stats["ftfy_fixed"] == 1
    assert stats["dropped"] == {"duplicate": 1, "empty": 1, "min_chars": 1, "repetition:dup_line_frac": 1}
    assert stats["documents_kept"] == 2
    assert read_docs(str(tmp_path / "c_text_document")) == expected_docs(llama3, [docs[0], docs[5]], eod=False)


def test_several_keys(tmp_path, llama3):
    path = tmp_path / "in.jsonl"
    path.write_text(json.dumps({"text": "body one", "title": "Title"}) + "\n" + json.dumps({"text": "body two"}) + "\n")
    run(["--input", str(path), "--output-prefix", str(tmp_path / "k"), "--jsonl-keys", "text", "title"])
    assert read_docs(str(tmp_path / "k_text_document")) == expected_docs(llama3, ["body one", "body two"], eod=False)
    assert read_docs(str(tmp_path / "k_title_document")) == expected_docs(llama3, ["Title"], eod=False)
    assert json.load(open(tmp_path / "k_title_document.stats.json"))["bad_records"] == {"missing_key": 1}


def test_uint16_output_for_small_vocabularies(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(GOOD * 10, trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"]))
    tok.save(str(tmp_path / "tok.json"))
    path = write_jsonl(tmp_path / "in.jsonl", GOOD)
    run(["--input", path, "--output-prefix", str(tmp_path / "u"), "--tokenizer-type", "HFTokenizer",
         "--vocab-file", str(tmp_path / "tok.json"), "--append-eod"])
    ds = IndexedDataset(str(tmp_path / "u_text_document"))
    assert ds.dtype == np.uint16 and ds.num_documents == 4 and ds[0][0] == 0 and ds[0][-1] == 1


def test_missing_input(tmp_path, capsys):
    assert tool.main(["--input", str(tmp_path / "nope.jsonl"), "--output-prefix", str(tmp_path / "x")]) == 2
    assert "nope.jsonl" in capsys.readouterr().err


def test_demo_pipeline_from_repo_root(tmp_path):
    """The Makefile's two data commands, run as scripts from the repository root."""
    corpus = str(tmp_path / "demo" / "python_docs.jsonl")
    env = {**os.environ, "PYTHONPATH": ""}
    build = subprocess.run([sys.executable, "tools/datasets/build_demo_corpus.py", "--output", corpus,
                            "--target-mb", "0.6"], cwd=REPO, env=env, capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    assert "documentation topics" in build.stdout
    texts = [json.loads(line)["text"] for line in open(corpus)]
    assert len(texts) == len(set(texts)) > 70 and sum(map(len, texts)) > 600_000
    prep = subprocess.run([sys.executable, "tools/datasets/preprocess_data.py", "--input", corpus,
                           "--output-prefix", str(tmp_path / "demo" / "python_docs"), "--append-eod",
                           "--workers", "2"], cwd=REPO, env=env, capture_output=True, text=True)
    assert prep.returncode == 0, prep.stderr
    ds = IndexedDataset(str(tmp_path / "demo" / "python_docs_text_document"))
    assert ds.num_documents == len(texts) and ds.num_tokens > 100_000
    assert ds[0][0] == 128000 and ds[0][-1] == 128001


def _small_tokenizer(path, specials=("<s>", "</s>")):
    """A byte-level BPE of 300 ids: loads in milliseconds, unlike Llama-3's."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(GOOD * 10, trainers.BpeTrainer(vocab_size=300, special_tokens=list(specials),
                                                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(path))
    return ["--tokenizer-type", "HFTokenizer", "--vocab-file", str(path)]


def _truncated_input(tmp_path, kind):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    docs = [f"Document {i}: " + GOOD[i % 4] * (1 + i % 5) for i in range(400)]
    lines = b"".join(json.dumps({"text": t}).encode() + b"\n" for t in docs)
    path = tmp_path / f"in.{kind}"
    if kind == "jsonl.gz":
        path.write_bytes(gzip.compress(lines))
    elif kind == "jsonl.zst":
        path.write_bytes(zstandard.ZstdCompressor().compress(lines))
    else:
        pq.write_table(pa.table({"text": docs}), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])  # a download cut short
    return str(path)


@pytest.mark.parametrize("kind", ["jsonl.gz", "jsonl.zst", "parquet"])
def test_truncated_input_is_named_and_writes_nothing(tmp_path, capsys, kind):
    """A .gz used to die with a bare EOFError and a .zst to pass for a shorter corpus."""
    path = _truncated_input(tmp_path, kind)
    tokenizer = _small_tokenizer(tmp_path / "tok.json")
    for workers in ("1", "2"):
        assert tool.main(["--input", path, "--output-prefix", str(tmp_path / "o"), "--no-progress", "--workers",
                          workers, *tokenizer]) == 1
        err = capsys.readouterr().err
        assert f"error: {path}: corrupt or truncated input file" in err and "no output written" in err
    assert sorted(os.listdir(tmp_path)) == sorted([os.path.basename(path), "tok.json"])


def test_concatenated_zstd_frames_are_all_read(tmp_path):
    import zstandard

    compress = zstandard.ZstdCompressor().compress
    lines = [json.dumps({"text": t}).encode() + b"\n" for t in GOOD]
    path = tmp_path / "in.jsonl.zst"
    path.write_bytes(compress(b"".join(lines[:2])) + compress(b"".join(lines[2:])))  # `cat a.zst b.zst`
    run(["--input", str(path), "--output-prefix", str(tmp_path / "z"), *_small_tokenizer(tmp_path / "tok.json")])
    assert IndexedDataset(str(tmp_path / "z_text_document")).num_documents == 4


def test_tokenizer_without_bos_gets_one_eod_between_documents(tmp_path, capsys):
    """A GPT-2 style vocabulary has only <|endoftext|>, which serves as both BOS and EOD."""
    from megatron.data.tokenizer import build_tokenizer

    tokenizer = _small_tokenizer(tmp_path / "tok.json", specials=("<|endoftext|>",))
    hf = build_tokenizer("HFTokenizer", str(tmp_path / "tok.json"))
    assert hf.bos_id == hf.eod_id == 0
    path = write_jsonl(tmp_path / "in.jsonl", GOOD)
    run(["--input", path, "--output-prefix", str(tmp_path / "e"), "--append-eod", *tokenizer])
    assert read_docs(str(tmp_path / "e_text_document")) == expected_docs(hf, GOOD, bos=False, eod=True)
    assert "documents get only the EOD at their end" in capsys.readouterr().err
    # Without --append-eod the leading EOD is the only separator: it stays.
    run(["--input", path, "--output-prefix", str(tmp_path / "s"), *tokenizer])
    assert read_docs(str(tmp_path / "s_text_document")) == expected_docs(hf, GOOD, bos=True, eod=False)
    assert "every document starts with that EOD" in capsys.readouterr().err
