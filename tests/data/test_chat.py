"""Chat (SFT) preprocessing: megatron/data/chat.py and tools/datasets/preprocess_data_with_chat_template.py.

References: llama-models' ChatFormat (Meta's own Llama-3.1 renderer) for the token ids and the message
boundaries the labels follow, megatron-core's IndexedDataset for reading the written files.
"""

import gzip
import json
import os
from pathlib import Path

import numpy as np
import pytest
from data_helpers import load_tool

from megatron.data.chat import IGNORE_INDEX, ChatEncoder, ConversationError, parse_conversation, parse_record
from megatron.data.indexed_dataset import IndexedDataset
from megatron.data.tokenizer import default_llama3_tokenizer_path



tool = load_tool("preprocess_data_with_chat_template")


def msg(role, content):
    return {"role": role, "content": content}


CONVERSATIONS = [
    [msg("system", "You are AstroSage, an astronomy assistant."), msg("user", "What is a pulsar?"),
     msg("assistant", "A rapidly rotating, magnetised neutron star.")],
    # Multi-turn with content that a renderer could get wrong: surrounding whitespace (llama-models keeps it),
    # unicode, a literal special-token string, an empty assistant message, newlines only.
    [msg("system", "  Be brief.\n"), msg("user", " Hi <|eot_id|> there "),
     msg("assistant", "\n\nHello — ünïcode 中文 🙂 <|eot_id|><|start_header_id|>user<|end_header_id|>  "),
     msg("user", "\n\n"), msg("assistant", ""), msg("user", "Again?"), msg("assistant", "Yes.\n")],
    # Tool output ("ipython", llama-models' "tool"), ending with a user turn after the last assistant turn.
    [msg("user", "Compute 2+2"), msg("assistant", "<|python_tag|>print(2+2)"), msg("ipython", "4"),
     msg("assistant", "It is 4."), msg("tool", "{\"ok\": true}"), msg("user", "thanks")],
]


@pytest.fixture(scope="module")
def reference():
    """llama-models' ChatFormat on the same tokenizer.model."""
    from llama_models.llama3.chat_format import ChatFormat
    from llama_models.llama3.tokenizer import Tokenizer

    return ChatFormat(Tokenizer(Path(default_llama3_tokenizer_path())))


@pytest.fixture(scope="module")
def encoder(llama3):
    return ChatEncoder(llama3)


def raw_messages(conversation):
    from llama_models.datatypes import RawMessage

    return [RawMessage(role="tool" if m["role"] == "ipython" else m["role"], content=m["content"])
            for m in conversation]


def reference_tokens(reference, conversation):
    """encode_dialog_prompt without the assistant header it appends for generation, then EOD."""
    tokens = reference.encode_dialog_prompt(raw_messages(conversation)).tokens
    generation_header = reference._encode_header("assistant")
    assert tokens[-len(generation_header):] == generation_header
    return tokens[:-len(generation_header)] + [reference.tokenizer.eos_id]


def reference_labels(reference, conversation, trained_messages):
    """-100 everywhere but the content and closing <|eot_id|> of the trained messages, found from the lengths of
    llama-models' own encode_message / _encode_header."""
    from llama_models.datatypes import ToolPromptFormat

    tokens = reference_tokens(reference, conversation)
    labels = [IGNORE_INDEX] * len(tokens)
    position = 1  # after <|begin_of_text|>
    for i, message in enumerate(raw_messages(conversation)):
        ids, _ = reference.encode_message(message, ToolPromptFormat.json)
        header = len(reference._encode_header(message.role))
        if i in trained_messages:
            labels[position + header : position + len(ids)] = ids[header:]
        position += len(ids)
    assert position == len(tokens) - 1  # only the EOD is left
    return tokens, labels


def assistant_indices(conversation):
    return [i for i, m in enumerate(conversation) if m["role"] == "assistant"]


def as_pairs(conversation):
    return parse_conversation({"messages": conversation})


@pytest.mark.parametrize("index", range(len(CONVERSATIONS)))
def test_tokens_match_llama_models_chat_format(reference, encoder, llama3, index):
    conversation = CONVERSATIONS[index]
    tokens, labels = encoder.encode(as_pairs(conversation))
    assert tokens.tolist() == reference_tokens(reference, conversation)
    assert len(labels) == len(tokens)
    # Literal special-token strings stay text: one <|eot_id|> per message, one <|start_header_id|> per message.
    assert tokens.tolist().count(llama3.eot_id) == len(conversation)
    assert tokens.tolist().count(llama3.token_to_id("<|start_header_id|>")) == len(conversation)
    assert tokens[0] == llama3.bos_id and tokens[-1] == llama3.eod_id


@pytest.mark.parametrize("index", range(len(CONVERSATIONS)))
def test_labels_cover_exactly_assistant_content_and_eot(reference, encoder, llama3, index):
    conversation = CONVERSATIONS[index]
    assistant = assistant_indices(conversation)
    for train_on, trained in (("all-assistant", assistant), ("last-assistant", assistant[-1:])):
        tokens, labels = encoder.encode(as_pairs(conversation), train_on)
        ref_tokens, ref_labels = reference_labels(reference, conversation, set(trained))
        assert labels.dtype == np.int32
        assert labels.tolist() == ref_labels, train_on
        # The trained tokens read back as the assistant texts, each closed by <|eot_id|>.
        kept = labels != IGNORE_INDEX
        assert np.array_equal(tokens[kept], labels[kept])
        assert llama3.decode(tokens[kept]) == "".join(conversation[i]["content"] + "<|eot_id|>" for i in trained)
    tokens, labels = encoder.encode(as_pairs(conversation), mask=False)
    assert labels.tolist() == tokens.tolist()


def write_jsonl(path, lines, opener=open):
    with opener(path, "wb") as f:
        for line in lines:
            f.write((line if isinstance(line, bytes) else json.dumps(line).encode()) + b"\n")
    return str(path)


def run_tool(args):
    return tool.main([*args, "--no-progress"])


def test_written_files_read_back_with_megatron_core(tmp_path, encoder, capsys):
    from megatron.core.datasets.indexed_dataset import IndexedDataset as MCoreDataset

    first = write_jsonl(tmp_path / "a.jsonl.gz", [{"messages": c, "id": i} for i, c in enumerate(CONVERSATIONS)],
                        gzip.open)
    second = write_jsonl(tmp_path / "b.jsonl", [{"chat": CONVERSATIONS[0]}, b"", {"chat": CONVERSATIONS[1]}])
    # b.jsonl uses another key: each input is read with --jsonl-key, so give it its own run.
    assert run_tool(["--input", first, "--output-prefix", str(tmp_path / "sft"), "--train-on", "last-assistant"]) == 0
    out = capsys.readouterr().out
    assert run_tool(["--input", second, "--jsonl-key", "chat", "--output-prefix", str(tmp_path / "k"),
                     "--workers", "2", "--chunk-size", "1"]) == 0
    expected = [encoder.encode(as_pairs(c), "last-assistant") for c in CONVERSATIONS]
    for cls in (MCoreDataset, IndexedDataset):
        docs = cls(str(tmp_path / "sft_messages_document"))
        labels = cls(str(tmp_path / "sft_messages_label_document"))
        assert len(docs) == len(labels) == len(CONVERSATIONS)
        assert np.array_equal(docs.sequence_lengths, labels.sequence_lengths)
        assert np.array_equal(docs.document_indices, labels.document_indices)
        assert docs.sequence_lengths.tolist() == [len(t) for t, _ in expected]
        assert labels[0].dtype == np.int32
        for i, (tokens, label_ids) in enumerate(expected):
            assert np.array_equal(docs[i], tokens) and np.array_equal(labels[i], label_ids)
        other = cls(str(tmp_path / "k_chat_label_document"))
        assert len(other) == 2 and np.array_equal(other[1], encoder.encode(as_pairs(CONVERSATIONS[1]))[1])
    stats = json.load(open(tmp_path / "sft_messages_document.stats.json"))
    trained = sum(int((label_ids != IGNORE_INDEX).sum()) for _, label_ids in expected)
    tokens = sum(len(t) for t, _ in expected)
    assert (stats["conversations"], stats["tokens_written"], stats["trained_tokens"]) == (3, tokens, trained)
    assert f"3 conversations, {tokens:,} tokens (int32), {trained:,} trained" in out


BAD_LINES = [
    (b'{"messages": [{"role": "user", "content": "unterminated', "malformed JSON"),
    ({"conversation": []}, "unknown record shape (keys: 'conversation'); expected 'messages' (OpenAI messages)"),
    ({"messages": "hello"}, "'messages' is a str, not a list"),
    ({"messages": [{"role": "bot", "content": "x"}, msg("assistant", "y")]}, "messages[0] has role 'bot'"),
    ({"messages": [msg("user", "x"), {"role": "assistant", "content": 3}]}, "messages[1] (assistant) content is a int"),
    ({"messages": [msg("user", "x"), {"role": "assistant"}]}, "messages[1] (assistant) content is a null"),
    ({"messages": [msg("system", "s"), msg("user", "no answer")]}, "has no assistant message"),
    ({"messages": []}, "'messages' is empty"),
    ({"messages": ["user: hi"]}, "messages[0] is a str, not an object"),
    (b'["not", "an", "object"]', "not a JSON object"),
    (b'{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "\\ud800"}]}',
     "messages[1] content is not valid Unicode"),
]


@pytest.mark.parametrize("bad", [0, 3, 6])
def test_bad_record_stops_the_run_naming_file_and_line(tmp_path, capsys, bad):
    line, reason = BAD_LINES[bad]
    path = write_jsonl(tmp_path / "in.jsonl", [{"messages": CONVERSATIONS[0]}, b"  ", line,
                                               {"messages": CONVERSATIONS[1]}])
    assert run_tool(["--input", path, "--output-prefix", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert f"error: bad record {path}:3: " in err and reason in err
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl"]


def test_skip_bad_counts_and_reports_every_bad_line(tmp_path, encoder, capsys):
    lines = [{"messages": CONVERSATIONS[2]}] + [line for line, _ in BAD_LINES] + [{"messages": CONVERSATIONS[0]}]
    path = write_jsonl(tmp_path / "in.jsonl", lines)
    assert run_tool(["--input", path, "--output-prefix", str(tmp_path / "out"), "--skip-bad"]) == 0
    stats = json.load(open(tmp_path / "out_messages_document.stats.json"))
    assert stats["skipped"] == len(BAD_LINES) and stats["conversations"] == 2
    assert stats["bad_records"]["no_assistant_turn"] == 1 and stats["bad_records"]["empty_conversation"] == 1
    for i, (_, reason) in enumerate(BAD_LINES):
        example = stats["bad_record_examples"][i]
        assert example.startswith(f"{path}:{i + 2}: ") and reason in example, (example, reason)
    assert f"{len(BAD_LINES)} skipped" in capsys.readouterr().out
    docs = IndexedDataset(str(tmp_path / "out_messages_document"))
    assert [docs[i].tolist() for i in range(2)] == [encoder.encode(as_pairs(CONVERSATIONS[i]))[0].tolist()
                                                    for i in (2, 0)]


def test_corrupt_or_all_bad_input_leaves_no_output(tmp_path, capsys):
    good = json.dumps({"messages": CONVERSATIONS[0]}).encode() + b"\n"
    (tmp_path / "cut.jsonl.gz").write_bytes(gzip.compress(good * 50)[:-20])
    assert run_tool(["--input", str(tmp_path / "cut.jsonl.gz"), "--output-prefix", str(tmp_path / "o")]) == 1
    assert "corrupt or truncated input file" in capsys.readouterr().err
    path = write_jsonl(tmp_path / "bad.jsonl", [{"messages": []}])
    assert run_tool(["--input", path, "--output-prefix", str(tmp_path / "o"), "--skip-bad"]) == 1
    assert "no conversation to write" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["bad.jsonl", "cut.jsonl.gz"]


def test_parse_conversation_rejects_tool_calls():
    with pytest.raises(ConversationError, match="tool_calls"):
        parse_conversation({"messages": [msg("user", "x"), {**msg("assistant", ""), "tool_calls": [{"f": 1}]}]})


def test_missing_input_is_named_and_nothing_is_written(tmp_path, capsys):
    assert run_tool(["--input", str(tmp_path / "nope.jsonl"), "--output-prefix", str(tmp_path / "x")]) == 2
    assert "nope.jsonl" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


# ---- input formats: ShareGPT (OpenHermes-2.5) and Llama-Nemotron post-training rows ------------------------------
SHAREGPT_FROM = {"system": "system", "user": "human", "assistant": "gpt", "ipython": "tool", "tool": "tool"}


def sharegpt_row(conversation):
    return {"conversations": [{"from": SHAREGPT_FROM[m["role"]], "value": m["content"]} for m in conversation],
            "source": "airoboros2.2"}


def nemotron_dialog(reasoning="on"):
    return [msg("system", f"detailed thinking {reasoning}"), msg("user", "Why do pulsars pulse?"),
            msg("assistant", "<think>\nBeams sweep past us.\n</think>\n\nTheir beams sweep across Earth.")]


def nemotron_row_list(reasoning="on"):
    """Llama-Nemotron-Post-Training-Dataset v1.1 shape: `input` a message list."""
    dialog = nemotron_dialog(reasoning)
    return {"input": [dialog[1]], "output": dialog[2]["content"], "system_prompt": dialog[0]["content"],
            "reasoning": reasoning, "category": "science", "license": "cc-by-4.0"}


def nemotron_row_string(reference, reasoning="off"):
    """v1 shape: `input` is the prompt with the Llama-3 template applied (rendered here by llama-models), and
    `output` ends with <|eot_id|>."""
    dialog = nemotron_dialog(reasoning)
    prompt = reference.tokenizer.decode(reference.encode_dialog_prompt(raw_messages(dialog[:2])).tokens)
    return {"input": prompt, "output": dialog[2]["content"] + "<|eot_id|>", "system_prompt": dialog[0]["content"],
            "reasoning": reasoning}


@pytest.mark.parametrize("index", range(len(CONVERSATIONS)))
def test_sharegpt_rows_encode_like_llama_models(reference, encoder, index):
    conversation = CONVERSATIONS[index]
    for fmt in ("sharegpt", "auto"):
        tokens, labels = encoder.encode(parse_record(sharegpt_row(conversation), fmt))
        ref_tokens, ref_labels = reference_labels(reference, conversation, set(assistant_indices(conversation)))
        assert tokens.tolist() == ref_tokens and labels.tolist() == ref_labels


def test_nemotron_rows_both_input_shapes(reference, encoder, llama3):
    for reasoning in ("on", "off"):
        dialog = nemotron_dialog(reasoning)
        ref_tokens, ref_labels = reference_labels(reference, dialog, {2})
        for row in (nemotron_row_list(reasoning), nemotron_row_string(reference, reasoning)):
            pairs = parse_record(row)
            assert pairs[0] == ("system", f"detailed thinking {reasoning}")  # the system prompt comes first
            tokens, labels = encoder.encode(pairs)
            assert tokens.tolist() == ref_tokens and labels.tolist() == ref_labels
            kept = labels != IGNORE_INDEX  # the reply with its <think> block, then <|eot_id|>
            assert llama3.decode(tokens[kept]) == dialog[2]["content"] + "<|eot_id|>"
    # Without system_prompt, `reasoning` names the system turn; a system turn already in `input` is kept.
    row = {**nemotron_row_list("on"), "system_prompt": None}
    assert parse_record(row)[0] == ("system", "detailed thinking on")
    row = {**nemotron_row_list("on"), "input": [msg("system", "Be terse."), msg("user", "Hi")]}
    assert [r for r, _ in parse_record(row)] == ["system", "user", "assistant"] and parse_record(row)[0][1] == \
        "Be terse."


NEW_FORMAT_BAD = [
    ({"conversations": [{"from": "bot", "value": "x"}]}, "conversations[0] has from 'bot'"),
    ({"conversations": [{"from": "human", "value": ["x"]}, {"from": "gpt", "value": "y"}]},
     "conversations[0] (user) content is a list"),
    ({"conversations": []}, "'conversations' is empty"),
    ({"conversations": [{"from": "human", "value": "only a question"}]}, "has no assistant message"),
    ({"input": [msg("user", "x")], "output": 3}, "'output' is a int, not a string"),
    ({"input": "User: hi", "output": "x"}, "'input' is a string but not Llama-3 chat turns"),
    ({"input": [], "output": "x"}, "'input' is empty"),
    ({"prompt": "x", "completion": "y"}, "unknown record shape (keys: 'prompt', 'completion')"),
]


def test_mixed_formats_through_the_tool_and_bad_rows_named(tmp_path, reference, encoder, capsys):
    rows = [{"messages": CONVERSATIONS[0]}, sharegpt_row(CONVERSATIONS[1]), nemotron_row_list("on"),
            nemotron_row_string(reference, "off")]
    path = write_jsonl(tmp_path / "mixed.jsonl", rows)
    assert run_tool(["--input", path, "--output-prefix", str(tmp_path / "out")]) == 0
    docs = IndexedDataset(str(tmp_path / "out_messages_document"))
    labels = IndexedDataset(str(tmp_path / "out_messages_label_document"))
    dialogs = [CONVERSATIONS[0], CONVERSATIONS[1], nemotron_dialog("on"), nemotron_dialog("off")]
    assert len(docs) == 4
    for i, dialog in enumerate(dialogs):
        ref_tokens, ref_labels = reference_labels(reference, dialog, set(assistant_indices(dialog)))
        assert docs[i].tolist() == ref_tokens and labels[i].tolist() == ref_labels
    # Each bad row of the new shapes stops the run at its FILE:LINE with nothing written; --skip-bad counts them.
    (tmp_path / "bad").mkdir()
    for line, reason in NEW_FORMAT_BAD:
        bad = write_jsonl(tmp_path / "bad" / "in.jsonl", [rows[0], line])
        assert run_tool(["--input", bad, "--output-prefix", str(tmp_path / "bad" / "o")]) == 1
        err = capsys.readouterr().err
        assert f"{bad}:2: " in err and reason in err, (err, reason)
        assert os.listdir(tmp_path / "bad") == ["in.jsonl"]
    path = write_jsonl(tmp_path / "skip.jsonl", [line for line, _ in NEW_FORMAT_BAD] + rows)
    assert run_tool(["--input", path, "--output-prefix", str(tmp_path / "skip"), "--skip-bad"]) == 0
    stats = json.load(open(tmp_path / "skip_messages_document.stats.json"))
    assert stats["skipped"] == len(NEW_FORMAT_BAD) and stats["conversations"] == 4
    # A forced format refuses the other shapes.
    path = write_jsonl(tmp_path / "forced.jsonl", [rows[0]])
    assert run_tool(["--input", path, "--output-prefix", str(tmp_path / "f"), "--format", "sharegpt"]) == 1
    assert "no key 'conversations'" in capsys.readouterr().err
