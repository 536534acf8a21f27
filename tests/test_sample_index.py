"""Sample index maths and the index file: windows, file boundaries, stale/truncated inputs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from data_preprocess.build_pretrain_sample_index_map import (
    build_index,
    cumulative_offsets,
    index_path,
    locate,
    num_samples_for,
    read_index,
    window_pieces,
)
from data_preprocess.token_file import TokenFileMeta, meta_path, token_dtype, write_token_file
from utils.errors import DataError

ROOT = Path(__file__).resolve().parent.parent


def write_corpus(
    data_dir: Path,
    sizes: list[int],
    vocab_size: int = 1000,
    fingerprint: str = "fp",
    start: int = 0,
) -> np.ndarray:
    """Write one .bin per size holding consecutive ids (global token t has id (start+t) % vocab).

    Returns the concatenated stream, the reference every test compares against.
    """
    dtype = token_dtype(vocab_size)
    stream = (np.arange(start, start + sum(sizes)) % vocab_size).astype(dtype)
    offset = 0
    for i, n in enumerate(sizes):
        meta = TokenFileMeta(
            dtype=dtype.name,
            vocab_size=vocab_size,
            num_tokens=n,
            num_documents=1,
            tokenizer_fingerprint=fingerprint,
            special_ids={"eos": 2},
            add_bos=False,
            text_field=None,
            source={"path": f"part{i}.jsonl", "size": 0, "mtime_ns": 0},
        )
        write_token_file(data_dir / f"part{i:03d}.bin", stream[offset : offset + n], meta)
        offset += n
    return stream


def reference_windows(stream: np.ndarray, seq: int) -> list[np.ndarray]:
    """The obvious definition: windows of seq+1 tokens at stride seq over the stream."""
    return [stream[s : s + seq + 1] for s in range(0, len(stream) - seq, seq)]


def test_num_samples_matches_reference():
    for total in range(0, 40):
        for seq in (1, 3, 4, 7):
            assert num_samples_for(total, seq) == len(reference_windows(np.arange(total), seq))


def test_worked_example_from_docstring():
    cum = cumulative_offsets([7, 0, 6])
    assert cum.tolist() == [0, 7, 7, 13]
    assert num_samples_for(13, 4) == 3
    assert locate(8, cum) == (2, 1)
    assert locate(7, cum) == (2, 0)  # the empty file 1 is skipped
    assert window_pieces(4, 5, cum) == [(0, 4, 7), (2, 0, 2)]


@pytest.mark.parametrize(
    "sizes", [[7, 0, 6], [8, 8, 8], [4, 4, 1, 9], [1, 1, 1, 1, 1, 1, 1, 5], [30]]
)
def test_window_pieces_rebuild_the_stream(sizes):
    # [8, 8, 8] with seq 4 has leftover exactly zero per file: the original misalignment bug.
    stream = np.arange(sum(sizes))
    cum = cumulative_offsets(sizes)
    files = [stream[cum[i] : cum[i + 1]] for i in range(len(sizes))]
    for seq in (2, 4, 5):
        for k, ref in enumerate(reference_windows(stream, seq)):
            got = np.concatenate(
                [files[f][lo:hi] for f, lo, hi in window_pieces(k * seq, seq + 1, cum)]
            )
            np.testing.assert_array_equal(got, ref)


def test_index_file_samples(tmp_path):
    stream = write_corpus(tmp_path, [8, 8, 0, 8, 3])
    build_index(tmp_path, 4)
    index = read_index(tmp_path, 4)
    assert len(index) == num_samples_for(27, 4) == 6
    assert index.header["files"][0] == {"path": "part000.bin", "num_tokens": 8, "size_bytes": 16}
    windows = reference_windows(stream, 4)
    assert [int(s) for s in index.starts] == [4 * k for k in range(len(windows))]
    # consecutive samples share exactly one token; all targets are covered exactly once
    for a, b in zip(windows, windows[1:]):
        assert a[-1] == b[0]
    targets = np.concatenate([w[1:] for w in windows])
    np.testing.assert_array_equal(targets, stream[1 : 1 + len(targets)])
    assert len(stream) - 1 - len(targets) < 4


def test_stale_index_is_an_error(tmp_path):
    write_corpus(tmp_path, [10, 10])
    build_index(tmp_path, 4)
    write_corpus(tmp_path, [10, 12])  # part001.bin changed size
    with pytest.raises(DataError, match="stale index: part001.bin changed"):
        read_index(tmp_path, 4)


def test_new_file_makes_index_stale(tmp_path):
    write_corpus(tmp_path, [10, 10])
    build_index(tmp_path, 4)
    write_corpus(tmp_path, [10, 10, 5])
    with pytest.raises(DataError, match="part002.bin is not in the index"):
        read_index(tmp_path, 4)


def test_wrong_seq_len_is_an_error(tmp_path):
    write_corpus(tmp_path, [20])
    build_index(tmp_path, 4)
    with pytest.raises(
        DataError, match=r"no sample index for max_seq_len=8 \(found pretrain_index_seq4.idx\)"
    ):
        read_index(tmp_path, 8)
    index_path(tmp_path, 4).rename(index_path(tmp_path, 8))
    with pytest.raises(DataError, match="built for max_seq_len=4, requested 8"):
        read_index(tmp_path, 8)


def test_truncated_bin_is_an_error(tmp_path):
    write_corpus(tmp_path, [20, 20])
    build_index(tmp_path, 4)
    path = tmp_path / "part001.bin"
    path.write_bytes(path.read_bytes()[:-2])
    with pytest.raises(
        DataError, match="part001.bin: 38 bytes on disk but its sidecar says 20 tokens"
    ):
        read_index(tmp_path, 4)


def test_truncated_index_and_bad_magic(tmp_path):
    write_corpus(tmp_path, [20, 20])
    path = build_index(tmp_path, 4)
    data = path.read_bytes()
    path.write_bytes(data[:-8])
    with pytest.raises(DataError, match="truncated index"):
        read_index(tmp_path, 4)
    path.write_bytes(b"garbage!" + data[8:])
    with pytest.raises(DataError, match="bad magic"):
        read_index(tmp_path, 4)


def test_mixed_tokenizers_are_an_error(tmp_path):
    write_corpus(tmp_path / "a", [10])
    write_corpus(tmp_path / "b", [10], fingerprint="other")
    with pytest.raises(DataError, match="b/part000.bin: tokenizer_fingerprint 'other' differs"):
        build_index(tmp_path, 4)


def test_bin_without_sidecar_is_unfinished(tmp_path):
    write_corpus(tmp_path, [10, 10])
    meta_path(tmp_path / "part001.bin").unlink()
    with pytest.raises(DataError, match="no metadata sidecar"):
        build_index(tmp_path, 4)


def test_too_few_tokens(tmp_path):
    write_corpus(tmp_path, [4])
    with pytest.raises(DataError, match="too few"):
        build_index(tmp_path, 4)


def test_uint32_for_large_vocab(tmp_path):
    stream = write_corpus(tmp_path, [9, 9], vocab_size=70000, start=65530)
    assert stream.dtype == np.uint32 and stream.max() > 65535
    build_index(tmp_path, 4)
    assert read_index(tmp_path, 4).header["dtype"] == "uint32"


def test_cli(tmp_path):
    write_corpus(tmp_path, [20])
    cmd = [
        sys.executable,
        "-m",
        "data_preprocess.build_pretrain_sample_index_map",
        f"--data_dir={tmp_path}",
        "--max_seq_len=4",
    ]
    ok = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert index_path(tmp_path, 4).is_file()
    bad = subprocess.run(
        cmd[:-2] + [f"--data_dir={tmp_path / 'nope'}", "--max_seq_len=4"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 1
    assert bad.stderr.startswith("error: data directory") and "Traceback" not in bad.stderr
