"""tools/datasets/build_sft_mix.py through its CLI: dedup across sources, requested shares, the written datasets
(against the chat encoder), the report, and bad input named FILE:LINE with nothing written."""

import json
import os

import pytest
from data_helpers import load_tool

from megatron.data.chat import IGNORE_INDEX, ChatEncoder, parse_record
from megatron.data.indexed_dataset import IndexedDataset

mix = load_tool("build_sft_mix")


def qa(i, answer="Yes."):
    return {"messages": [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": answer}]}


def sharegpt(i):
    return {"conversations": [{"from": "human", "value": f"hermes {i}"}, {"from": "gpt", "value": f"reply {i}"}]}


def write(path, rows):
    with open(path, "w") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    d = tmp_path_factory.mktemp("mix")
    # 60 Q&A rows (3 repeated inside the file); 200 ShareGPT rows of which 10 repeat Q&A rows up to whitespace
    # (the same conversation in the other shape); 50 more Q&A-shaped rows for a count.
    astro = write(d / "astro.jsonl", [qa(i) for i in range(60)] + [qa(i) for i in range(3)])
    hermes_rows = [sharegpt(i) for i in range(190)] + [
        {"conversations": [{"from": "human", "value": f"  question  {i} "}, {"from": "gpt", "value": "Yes. "}]}
        for i in range(10)]
    hermes = write(d / "hermes.jsonl", hermes_rows)
    extra = write(d / "extra.jsonl", [qa(1000 + i, "No.") for i in range(50)])
    prefix = str(d / "out")
    code = mix.main(["--output-prefix", prefix, "--source", astro, "share=0.2", "--source", hermes,
                     "--source", extra, "count=20", "--valid-fraction", "0.1", "--seq-length", "16", "--seed", "3",
                     "--no-progress"])
    assert code == 0
    return d, prefix, json.load(open(prefix + "_report.json"))


def test_duplicates_are_dropped_and_counted(built):
    _, _, report = built
    astro, hermes, extra = report["sources"]
    assert (astro["rows_read"], astro["duplicates_dropped"], astro["unique"]) == (63, 3, 60)
    assert (hermes["rows_read"], hermes["duplicates_dropped"], hermes["unique"]) == (200, 10, 190)
    assert (extra["duplicates_dropped"], extra["kept"]) == (0, 20)


def test_shares_match_within_one_conversation(built):
    _, _, report = built
    total = sum(s["kept"] for s in report["sources"])
    astro, hermes, extra = report["sources"]
    assert hermes["kept"] == 190 and extra["kept"] == 20  # every unique row once; count=20
    assert abs(astro["kept"] - 0.2 * total) <= 1
    assert report["train_conversations"] + report["valid_conversations"] == total
    assert report["valid_conversations"] == round(0.1 * total)
    for s in report["sources"]:
        assert s["train"] + s["valid"] == s["kept"]


def test_written_datasets_hold_the_mix_encoded_like_the_chat_tool(built, llama3):
    _, prefix, report = built
    encoder = ChatEncoder(llama3)
    seen, loss_tokens = [], 0
    for split in ("train", "valid"):
        tokens = IndexedDataset(f"{prefix}_{split}_messages_document")
        labels = IndexedDataset(f"{prefix}_{split}_messages_label_document")
        assert len(tokens) == len(labels) == report[f"{split}_conversations"]
        for i in range(len(tokens)):
            text = llama3.decode(tokens[i])
            seen.append(text)
            loss_tokens += int((labels[i] != IGNORE_INDEX).sum())
    # Each written conversation is the chat encoder's rendering of one source row, never two copies of one.
    assert len(set(seen)) == len(seen)
    row = encoder.encode(parse_record(qa(5)))[0]
    assert seen.count(llama3.decode(row)) <= 1
    assert loss_tokens == sum(s["loss_tokens"] for s in report["sources"])
    assert sum(s["share_of_loss_tokens"] for s in report["sources"]) == pytest.approx(1.0)
    # seq_length 16: the ShareGPT rows (longer) are reported; single-message answers cannot be cut, so dropped.
    hermes = report["sources"][1]
    assert hermes["longer_than_sample"] > 0 and hermes["dropped_for_length"] == hermes["longer_than_sample"]


@pytest.mark.parametrize("line, reason", [
    ("{\"messages\": [", "malformed JSON"),
    ({"messages": []}, "'messages' is empty"),
    ({"messages": [{"role": "user", "content": "q"}]}, "has no assistant message"),
    ({"messages": [{"role": "bot", "content": "q"}, {"role": "assistant", "content": "a"}]}, "has role 'bot'"),
    ({"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "a"}]}, "content is a int"),
])
def test_bad_rows_are_named_and_nothing_is_written(tmp_path, capsys, line, reason):
    path = write(tmp_path / "in.jsonl", [qa(0), line, qa(1)])
    assert mix.main(["--output-prefix", str(tmp_path / "o"), "--source", path, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"error: {path}:2: " in err and reason in err and "nothing written" in err
    assert os.listdir(tmp_path) == ["in.jsonl"]
    assert mix.main(["--output-prefix", str(tmp_path / "o"), "--source", path, "--skip-bad", "--no-progress"]) == 0
    assert json.load(open(tmp_path / "o_report.json"))["sources"][0]["bad_skipped"] == 1


def test_impossible_amounts_are_refused(tmp_path, capsys):
    path = write(tmp_path / "a.jsonl", [qa(i) for i in range(10)])
    other = write(tmp_path / "b.jsonl", [sharegpt(i) for i in range(100)])
    for args, message in ((["--source", path, "share=0.5", "--source", other], "needs 100 conversations"),
                          (["--source", path, "count=11"], "only 10 unique"),
                          (["--source", path, "share=0.4"], "every source has a share="),
                          (["--source", path, "ratio=2"], "expected count=N")):
        assert mix.main(["--output-prefix", str(tmp_path / "o"), *args, "--no-progress"]) == 2
        assert message in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["a.jsonl", "b.jsonl"]
