"""ListOps: the generator's statistics and semantics, the official tokenisation, file errors."""
from __future__ import annotations

import collections
import random
from pathlib import Path

import numpy as np
import pytest

from lra_dtn.data import DataError
from tasks.listops import (OOV_ID, VOCAB_SIZE, ListOps, ListOpsData, encode, evaluate, evaluate_source,
                           generate, generate_examples, generate_tree, read_tsv, to_string, tokenize)


@pytest.fixture(scope="module")
def official_sample() -> list[tuple[str, int]]:
    """3,000 distinct trees under the official flags (500 < length < 2000, depth 10, 10 args)."""
    return generate_examples(ListOpsData(num_train=3000, num_val=0, num_test=0), workers=1)


def test_generator_length_bounds_are_strict(official_sample):
    lengths = np.array([len(tokenize(s)) for s, _ in official_sample])
    assert lengths.min() > 500 and lengths.max() < 2000
    # The spec measured mean 1061 and median 997 on 2,000 trees.
    assert 950 < lengths.mean() < 1170
    assert 900 < np.median(lengths) < 1100


def test_generator_labels_skew_toward_0_and_9(official_sample):
    counts = collections.Counter(t for _, t in official_sample)
    share = {k: v / len(official_sample) for k, v in counts.items()}
    assert set(share) == set(range(10))
    # Spec §4: 0 and 9 are about 17 % each, the others 7.5-9.6 %.
    assert 0.14 < share[0] < 0.20 and 0.14 < share[9] < 0.20
    assert all(0.05 < share[k] < 0.12 for k in range(1, 9))


def test_generator_is_distinct_seeded_and_self_consistent(official_sample):
    sources = [s for s, _ in official_sample]
    assert len(set(sources)) == len(sources)
    assert all(evaluate_source(s) == t for s, t in official_sample[:300])
    again = generate_examples(ListOpsData(num_train=50, num_val=0, num_test=0), workers=1)
    assert again == official_sample[:50]
    other_seed = generate_examples(ListOpsData(num_train=50, num_val=0, num_test=0, seed=1), workers=1)
    assert other_seed != again


def test_worker_count_does_not_change_the_data():
    options = ListOpsData(num_train=200, num_val=20, num_test=20, min_length=10, max_length=60, max_depth=5)
    assert generate_examples(options, workers=1) == generate_examples(options, workers=2)


@pytest.mark.parametrize("source, value", [
    ("( ( ( [MAX 1 ) 2 ) ] )", 2),
    ("( ( ( ( [MIN 7 ) 3 ) 9 ) ] )", 3),
    ("( ( ( [MED 3 ) 4 ) ] )", 3),  # even count: int(np.median([3, 4])) = int(3.5) = 3
    ("( ( ( ( ( [MED 1 ) 2 ) 8 ) 9 ) ] )", 5),  # median of 2 and 8 = 5.0
    ("( ( ( ( [MED 9 ) 1 ) 5 ) ] )", 5),
    ("( ( ( ( [SM 9 ) 8 ) 7 ) ] )", 4),  # 24 mod 10
    ("( ( ( [MAX ( ( ( [SM 5 ) 7 ) ] ) ) 1 ) ] )", 2),  # nested: max(12 % 10, 1)
    ("7", 7),
])
def test_evaluation_of_hand_written_expressions(source, value):
    assert evaluate_source(source) == value


def test_tree_serialisation_and_evaluation_agree():
    rng = random.Random(3)
    for _ in range(200):
        tree, length = generate_tree(rng, max_depth=4, max_args=5)
        assert len(tokenize(to_string(tree))) == length
        assert evaluate(tree) == evaluate_source(to_string(tree))


def test_exact_token_ids_for_a_known_line():
    line = "( ( ( [MAX 1 ) ( ( ( [MED 6 ) 1 ) ] ) ) 4 ) ]"
    assert tokenize(line) == ["[MAX", "1", "[MED", "6", "1", "X", "4", "X"]
    # pad 0, [MIN 1, [MAX 2, [MED 3, [SM 4, X 5, digits 6..15, OOV 16.
    assert encode(line) == [2, 7, 3, 12, 7, 5, 10, 5]
    assert encode("( [MIN 0 9 [FIRST ]") == [1, 6, 15, OOV_ID, 5]
    assert VOCAB_SIZE == 17


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_reader_reports_file_and_line_of_a_malformed_row(tmp_path):
    good = "( ( [MAX 1 ) ] )"
    path = write(tmp_path / "basic_train.tsv", f"Source\tTarget\n{good}\t1\n{good}\t3\n{good} 7\n")
    with pytest.raises(DataError, match=r"basic_train\.tsv:4: expected"):
        list(read_tsv(path, 2000))
    bad_label = write(tmp_path / "basic_val.tsv", f"Source\tTarget\n{good}\t12\n")
    with pytest.raises(DataError, match=r"basic_val\.tsv:2"):
        list(read_tsv(bad_label, 2000))
    no_header = write(tmp_path / "basic_test.tsv", f"{good}\t1\n")
    with pytest.raises(DataError, match=r"basic_test\.tsv:1: expected the header"):
        list(read_tsv(no_header, 2000))
    superscript = write(tmp_path / "sup.tsv", f"Source\tTarget\n{good}\t1\n{good}\t\u00b2\n")  # '²'.isdigit()
    with pytest.raises(DataError, match=r"sup\.tsv:3: expected"):
        list(read_tsv(superscript, 2000))
    binary = tmp_path / "bin.tsv"
    binary.write_bytes(f"Source\tTarget\n{good}\t1\n".encode() + b"( [MAX 1 \xff 2 ] )\t2\n")
    with pytest.raises(DataError, match=r"bin\.tsv:3: not UTF-8 text"):
        list(read_tsv(binary, 2000))
    with pytest.raises(DataError, match=r"empty\.tsv: empty file"):
        list(read_tsv(write(tmp_path / "empty.tsv", ""), 2000))


def test_records_end_at_cr_and_lf_as_the_official_csv_reader(tmp_path):
    """CRLF files read like LF ones; a lone \\r ends a record too (tf.data CsvDataset)."""
    good = "( [MAX 1 2 ] )"
    crlf = write(tmp_path / "crlf.tsv", f"Source\tTarget\r\n{good}\t2\r\n{good}\t2\r\n")
    lf = write(tmp_path / "lf.tsv", f"Source\tTarget\n{good}\t2\n{good}\t2\n")
    assert list(read_tsv(crlf, 10)) == list(read_tsv(lf, 10))
    lone = tmp_path / "lone.tsv"
    lone.write_bytes(f"Source\tTarget\n{good}\t2\r{good}\t2\n".encode())
    assert len(list(read_tsv(lone, 10))) == 2


def test_reader_truncates_and_labels(tmp_path):
    path = write(tmp_path / "x.tsv", "Source\tTarget\n( ( ( [SM 1 ) 2 ) ] )\t3\n\n")
    assert list(read_tsv(path, 3)) == [{"input_ids": [4, 7, 8], "label": 3}]


def test_generated_files_load_through_the_task_and_cache(tmp_path, capsys):
    options = ListOpsData(num_train=40, num_val=10, num_test=12, min_length=5, max_length=30, max_depth=4)
    task = ListOps()
    with pytest.raises(DataError, match="the train and sweep commands generate it"):
        task.load(tmp_path / "data", options, tmp_path / "cache")  # reading never writes data
    task.prepare(tmp_path / "data", options)
    assert "generating 40/10/12" in capsys.readouterr().out
    splits = task.load(tmp_path / "data", options, tmp_path / "cache")
    assert {k: len(v) for k, v in splits.items()} == {"train": 40, "val": 10, "test": 12}
    folder = tmp_path / "data" / options.folder
    first = (folder / "basic_train.tsv").read_text().splitlines()[1].split("\t")
    row = splits["train"][0]
    assert list(row["input_ids"]) == encode(first[0]) and row["label"] == int(first[1])
    assert row["length"] == len(encode(first[0]))
    caches = sorted((tmp_path / "cache").iterdir())
    task.prepare(tmp_path / "data", options)  # second run: no regeneration, the same cache
    task.load(tmp_path / "data", options, tmp_path / "cache")
    assert sorted((tmp_path / "cache").iterdir()) == caches and "generating" not in capsys.readouterr().out


def test_a_malformed_file_leaves_no_cache_behind(tmp_path):
    options = ListOpsData(num_train=20, num_val=5, num_test=5, min_length=5, max_length=30, max_depth=4)
    folder = generate(tmp_path / "data" / options.folder, options)
    with open(folder / "basic_val.tsv", "a") as f:
        f.write("broken line without a tab\n")
    with pytest.raises(DataError, match=r"basic_val\.tsv:7"):
        ListOps().load(tmp_path / "data", options, tmp_path / "cache")
    assert [p.name for p in (tmp_path / "cache").iterdir()] == []


def test_missing_file_names_the_expected_path(tmp_path):
    options = ListOpsData()
    folder = tmp_path / "listops-1000"
    folder.mkdir()
    with pytest.raises(DataError, match=r"listops-1000/basic_train\.tsv"):
        ListOps().source_files(tmp_path, options)
