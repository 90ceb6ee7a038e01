"""Token data on disk (data.name: tokens) and ``disttrain data export text``: documents cut into chunks with
every target once, packed windows, nanoGPT's train.bin, reading in loader workers, and one-line errors."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from disttrain.cli.main import main
from disttrain.config import DataConfig, load_config
from disttrain.data.dataset import build_dataset
from disttrain.data.loader import GlobalBatches
from disttrain.data.tokens import IGNORE, write_tokens
from disttrain.errors import ConfigError

LENGTHS = (1, 5, 9, 2, 14, 3, 0, 12)  # uneven documents: one token (no target), exactly T + 1, empty, ragged


def documents(seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 50, n) for n in LENGTHS]


@pytest.fixture
def token_dir(tmp_path) -> Path:
    docs = documents()
    offsets = np.concatenate([[0], np.cumsum([len(d) for d in docs])])
    write_tokens(tmp_path / "tok", np.concatenate(docs).astype(np.uint16), offsets, vocab_size=50)
    return tmp_path / "tok"


def _source(path: Path, seq_len: int = 4, **keys):
    keys = {"num_samples": 0, **keys}
    return build_dataset(DataConfig(name="tokens", path=str(path), seq_len=seq_len, **keys), "gpt", 0, torch.float64,
                         "token_cross_entropy")


def test_documents_are_cut_into_chunks_holding_every_target_once(token_dir):
    """T=4: a document of L tokens gives ceil((L - 1) / 4) samples whose targets are its L - 1 next tokens, each
    once, in order, with inputs one token behind; the last chunk is padded (input 0, target -100)."""
    source = _source(token_dir)
    x, y = source.fetch(np.arange(len(source)))
    assert source.input_shape == (4,) and source.num_classes == 50 and x.dtype == y.dtype == torch.int64
    assert len(source) == sum(-(-max(n - 1, 0) // 4) for n in LENGTHS) == 12
    row = 0
    for doc in documents():
        targets, inputs = [], []
        while len(targets) < len(doc) - 1:
            keep = y[row] != IGNORE
            assert keep.any() and bool(keep[: int(keep.sum())].all())  # padding only on the right
            assert (x[row][~keep] == 0).all()
            targets += y[row][keep].tolist()
            inputs += x[row][keep].tolist()
            row += 1
        assert targets == doc[1:].tolist() and inputs == doc[:-1].tolist()
    assert row == len(source)
    counts = (y != IGNORE).sum(1).tolist()
    assert sorted(set(counts)) == [1, 2, 3, 4]  # samples hold different numbers of target tokens


def test_packed_windows_cross_documents_and_are_full(token_dir):
    stream = np.concatenate(documents())
    source = _source(token_dir, pack=True)
    x, y = source.fetch(np.arange(len(source)))
    assert len(source) == (len(stream) - 1) // 4
    assert (y != IGNORE).all()
    assert x.flatten().tolist() == stream[: 4 * len(source)].tolist()
    assert y.flatten().tolist() == stream[1: 4 * len(source) + 1].tolist()


def test_nanogpt_train_bin_reads_as_packed_windows(token_dir, tmp_path):
    """nanoGPT's train.bin (flat uint16, no header) holds the same stream: the same samples as the token
    directory packed, given data.vocab_size; without data.pack it has no documents to cut."""
    nano = tmp_path / "nano"
    nano.mkdir()
    np.concatenate(documents()).astype(np.uint16).tofile(nano / "train.bin")
    ours = _source(token_dir, pack=True)
    for path in (nano, nano / "train.bin"):
        theirs = _source(path, pack=True, vocab_size=64)
        assert theirs.num_classes == 64
        for a, b in zip(theirs.fetch(np.arange(len(theirs))), ours.fetch(np.arange(len(ours)))):
            assert torch.equal(a, b)
    with pytest.raises(ConfigError, match=r"data.pack: .*train.bin.*no document boundaries; set data.pack=true"):
        _source(nano, vocab_size=64)
    with pytest.raises(ConfigError, match=r"data.vocab_size: .* records no vocabulary; set data.vocab_size"):
        _source(nano, pack=True)


def test_loader_workers_read_what_the_process_reads(token_dir):
    """The file is reopened in a worker, its descriptor never pickled; a step's samples do not depend on the worker
    count."""
    source = _source(token_dir)
    cpu = torch.device("cpu")
    for world_size in (1, 3):
        read = {}
        for workers in (0, 2):
            batches = GlobalBatches(source, 7, seed=3, rank=world_size - 1, world_size=world_size, workers=workers)
            read[workers] = [mbs for _, mbs in batches.steps(0, 4, cpu, 2)]  # 4 steps of 7 cross an epoch (12)
            batches.close()
        for a, b in zip(*read.values()):
            for (xa, ya, _), (xb, yb, _) in zip(a, b):
                assert torch.equal(xa, xb) and torch.equal(ya, yb)
    import pickle

    assert source._tokens._fd is not None and pickle.loads(pickle.dumps(source))._tokens._fd is None


@pytest.mark.parametrize("change, keys, error", [
    ("missing", {}, r"data.path: .*does not exist"),
    ("empty", {}, r"holds neither tokens.npy .* nor nanoGPT's train.bin"),
    ("float", {}, r"has dtype float32 and shape \(\d+,\); tokens must be a flat integer array"),
    ("no_documents", {}, r"no documents.npy in .*data.pack=true packs windows without them"),
    ("bad_offsets", {}, r"documents.npy must rise from 0 to the \d+ tokens of tokens.npy"),
    ("", {"vocab_size": 20}, r"data.vocab_size: 20 is too small for .*token ids go up to 49 \(vocabulary 50\)"),
    ("", {"seq_len": 100, "pack": True}, r"no sample of data.seq_len=100: fewer than T \+ 1 tokens"),
    ("", {"num_samples": 500}, r"data.num_samples: 500 exceeds the 12 samples"),
])
def test_bad_token_directories_are_one_line_errors(token_dir, change, keys, error):
    if change == "missing":
        token_dir = token_dir / "nothing"
    elif change == "empty":
        token_dir = token_dir.parent / "empty"
        token_dir.mkdir()
    elif change == "float":
        np.save(token_dir / "tokens.npy", np.zeros(45, dtype=np.float32))
    elif change == "no_documents":
        (token_dir / "documents.npy").unlink()
    elif change == "bad_offsets":
        np.save(token_dir / "documents.npy", np.array([0, 5, 3, 45]))
    with pytest.raises(ConfigError, match=error) as info:
        _source(token_dir, **{"seq_len": 4, **keys})
    assert "\n" not in str(info.value)


def test_an_id_outside_the_vocabulary_stops_the_read_naming_the_file(token_dir):
    tokens = np.load(token_dir / "tokens.npy")
    tokens[20] = 70
    np.save(token_dir / "tokens.npy", tokens)
    source = _source(token_dir)
    with pytest.raises(Exception, match=r"holds token id 70 .*outside \[0, data.vocab_size=50\)"):
        source.fetch(np.arange(len(source)))


@pytest.mark.parametrize("override, error", [
    ("data.seq_len=0", r"data.seq_len: data.name=tokens needs the sequence length T >= 1, got 0"),
    ("data.vocab_size=-1", r"data.vocab_size: must be >= 0"),
])
def test_token_keys_are_validated_with_exit_2(tmp_path, capsys, override, error):
    argv = ["config", str(Path(__file__).parents[1] / "configs" / "demo.yaml"), "--set", "data.name=tokens",
            "--set", f"data.path={tmp_path}", "--set", "data.seq_len=8", "--set", override]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(error, err), err


def test_token_keys_belong_to_tokens():
    with pytest.raises(ConfigError, match=r"data.seq_len: only for data.name=tokens, not data.name=synthetic"):
        load_config(None, ["data.seq_len=8"])


# --------------------------------------------------------------------------- export text

def test_export_text_writes_each_text_file_as_a_document_of_its_bytes(tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / ".hidden").mkdir()
    texts = {"b.txt": "zweite Datei: ü\n", "sub/a.txt": "first\n", "a.txt": "x = 1\n"}
    for name, text in texts.items():
        (src / name).write_text(text, encoding="utf-8")
    (src / ".hidden" / "c.txt").write_text("hidden")
    (src / "blob.bin").write_bytes(b"\xff\xfe\x00binary")
    (src / "empty.txt").write_text("")
    out = tmp_path / "out"
    assert main(["data", "export", "text", str(out), str(src), str(src / "a.txt"), "--eos"]) == 0
    tokens, offsets = np.load(out / "tokens.npy"), np.load(out / "documents.npy")
    expected = [texts[n].encode() + b"\x00" for n in ("a.txt", "b.txt", "sub/a.txt", "a.txt")]  # sorted, then a.txt
    assert offsets.tolist() == np.cumsum([0] + [len(e) for e in expected]).tolist()
    for doc, text in zip(np.split(tokens, offsets[1:-1]), expected):
        assert doc[:-1].tolist() == list(text[:-1]) and doc[-1] == 256
    assert json.loads((out / "meta.json").read_text()) == {"vocab_size": 257, "eos_token": 256}
    assert main(["data", "export", "text", str(tmp_path / "plain"), str(src), "--pattern", "*.txt"]) == 0
    assert np.load(tmp_path / "plain" / "tokens.npy").dtype == np.uint8
    assert json.loads((tmp_path / "plain" / "meta.json").read_text())["vocab_size"] == 256


@pytest.mark.parametrize("sources, error", [
    ([], r"name at least one SOURCE"),
    (["nothing"], r"nothing does not exist"),
    (["blob.bin"], r"no non-empty text file"),
])
def test_export_text_errors_are_one_line_with_exit_2(tmp_path, capsys, sources, error):
    (tmp_path / "blob.bin").write_bytes(b"\xff\xfe")
    assert main(["data", "export", "text", str(tmp_path / "out"), *(str(tmp_path / s) for s in sources)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(error, err), err


# --------------------------------------------------------------------------- training on token data

@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """60 documents of 1 to 30 tokens (vocabulary 13): chunks of 1 to 8 targets at seq_len 8."""
    rng = np.random.default_rng(5)
    docs = [rng.integers(0, 13, n) for n in rng.integers(1, 31, 60)]
    out = tmp_path_factory.mktemp("corpus")
    write_tokens(out, np.concatenate(docs).astype(np.uint8), np.cumsum([0] + [len(d) for d in docs]), 13)
    return out


def _gpt(corpus: Path, out: Path, *overrides: str) -> list[str]:
    return ["model.name=gpt", "model.hidden=16", "model.kwargs={layers: 1, heads: 2}", "train.loss=token_cross_entropy",
            "data.name=tokens", f"data.path={corpus}", "data.seq_len=8", "train.global_batch_size=31",
            "train.accumulation_steps=2", "train.steps=4", "train.device=cpu", "train.dtype=float64", "optim.name=adamw",
            "optim.lr=0.01", "train.tensorboard=false", f"train.out_dir={out}", *overrides]


def test_gpt_on_token_data_at_w3_equals_one_process_and_resumes_at_w2(pools, corpus, tmp_path):
    """B=31 over W=3 (11, 10, 10 chunks, two micro-batches each, uneven token counts): verify's verdict is
    EQUIVALENT; stopped at step 2 and resumed at W=2, the run ends on the same model as one process."""
    from tests.common import max_rel_diff, reference, train_on_rank
    from tests.test_resume import _segment
    from disttrain.verify.whole import compare_runs

    cfg = load_config(None, _gpt(corpus, tmp_path / "dist"))
    ref_state, _ = reference(tuple(_gpt(corpus, tmp_path / "ref")))
    pools(3).run(train_on_rank, cfg.to_dict())
    report = compare_runs(cfg, tmp_path / "dist", tmp_path / "ref")
    assert report.equivalent and report.max_param_rel_diff <= 1e-10, report.table()
    split = load_config(None, _gpt(corpus, tmp_path / "split", "train.checkpoint_every=2")).to_dict()
    _segment(pools, 3, split, False, 2)
    state = _segment(pools, 2, split, True, None)
    assert max_rel_diff(state, ref_state) <= 1e-10


@pytest.mark.parametrize("overrides, error", [
    (["train.token_weighting=sequence_mean"], r"train.token_weighting=sequence_mean: only for "
                                              r"train.loss=token_cross_entropy"),
    (["train.loss=token_cross_entropy", "model.name=gpt", "data.name=tokens", "data.path=x", "data.seq_len=4",
      "train.token_weighting=micro_batch_mean"], r"needs comm.reduce=avg, not mean"),
])
def test_token_weighting_contrasts_are_validated(overrides, error):
    with pytest.raises(ConfigError, match=error):
        load_config(None, overrides)


def test_train_on_a_missing_token_directory_is_one_line_exit_2(tmp_path, capsys):
    argv = ["train", str(Path(__file__).parents[1] / "configs" / "gpt_stdlib.yaml"), "--set",
            f"data.path={tmp_path / 'nothing'}", "--set", f"train.out_dir={tmp_path / 'out'}"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(r"data.path: .*nothing does not exist", err), err


def test_contrast_weightings_divide_by_micro_batch_counts_or_average_sequences():
    """micro_batch_mean: each micro-batch over its own count times k; sequence_mean: the sum of row means over
    samples (a row without targets adds 0)."""
    from disttrain.parallel.sync import LocalSync
    from disttrain.run.loss import LossDivisor, summed_loss

    y1, y2 = torch.tensor([[1, 2, -100], [0, -100, -100]]), torch.tensor([[2, -100, -100]])
    sync = LocalSync(torch.nn.Identity(), loss_divisor=3)
    micro = LossDivisor("token_cross_entropy", sync, [(None, y1), (None, y2)], "micro_batch_mean")
    assert [int(micro.value(j)) for j in (0, 1)] == [6, 2] and int(micro.local_count) == 4
    seq = LossDivisor("token_cross_entropy", sync, [(None, y1), (None, y2)], "sequence_mean")
    assert seq.value() == 3 and seq.local_count is None  # counted in samples
    logits = torch.randn(3, 3, 4, dtype=torch.float64)
    y = torch.tensor([[1, 2, -100], [-100, -100, -100], [3, 0, 1]])
    per_token = torch.nn.functional.cross_entropy(logits.transpose(1, 2), y.clamp_min(0), reduction="none")
    expected = per_token[0, :2].mean() + per_token[2].mean()
    torch.testing.assert_close(summed_loss("token_cross_entropy", logits, y, "sequence_mean"), expected)
