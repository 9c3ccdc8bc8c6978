import os

import numpy as np
from data_helpers import load_tool, random_docs, write_dataset

from megatron.data.indexed_dataset import IndexedDataset


def test_merge(tmp_path, capsys):
    a = write_dataset(str(tmp_path / "a"), random_docs(6, seed=1))
    b = write_dataset(str(tmp_path / "b"), random_docs(4, seed=2))
    merge = load_tool("merge_datasets")
    assert merge.main(["--inputs", a, b, "--output-prefix", str(tmp_path / "ab")]) == 0
    assert "10 documents" in capsys.readouterr().out
    ab, da, db = IndexedDataset(str(tmp_path / "ab")), IndexedDataset(a), IndexedDataset(b)
    expected = [da[i].tolist() for i in range(6)] + [db[i].tolist() for i in range(4)]
    assert [ab[i].tolist() for i in range(10)] == expected

    c = write_dataset(str(tmp_path / "c"), random_docs(2), dtype=np.uint16)
    assert merge.main(["--inputs", a, c, "--output-prefix", str(tmp_path / "ac")]) == 1
    assert "different token dtypes" in capsys.readouterr().err
    assert merge.main(["--inputs", a, str(tmp_path / "missing"), "--output-prefix", str(tmp_path / "am")]) == 1
    assert not os.path.exists(tmp_path / "ac.idx") and not os.path.exists(tmp_path / "am.idx")


def test_inspect(tmp_path, llama3, capsys):
    prefix = str(tmp_path / "d")
    text = "Hello from the inspector."
    write_dataset(prefix, [np.array([llama3.bos_id, *llama3.encode(text), llama3.eod_id], np.int32)])
    inspect = load_tool("inspect_dataset")
    assert inspect.main([prefix, "--decode", "1", "--check-vocab"]) == 0
    out = capsys.readouterr().out
    assert "documents  1" in out and "(BOS, EOD)" in out and text in out and "within Llama3Tokenizer" in out
    write_dataset(prefix, [np.array([5, 200_000], np.int32)])
    assert inspect.main([prefix, "--check-vocab"]) == 1
    os.truncate(prefix + ".bin", 4)
    assert inspect.main([prefix]) == 1
    assert "d.bin: data file is 4 bytes" in capsys.readouterr().err
