"""insert_repeats: the repeat curriculum written into training windows."""

import pytest
import torch

from induction_dynamics.data.curriculum import insert_repeats

T1 = 65  # block_size 64 + 1
ALLOWED = torch.arange(100, 140)  # disjoint from the text tokens below, so repeats are easy to find


def text_windows(B: int, seed: int = 0) -> torch.Tensor:
    """(B, T1) "text" of tokens 0..9 (lots of repeated characters, like English)."""
    return torch.randint(0, 10, (B, T1), generator=torch.Generator().manual_seed(seed))


def unique_windows(B: int) -> torch.Tensor:
    """(B, T1) rows of all-distinct tokens, so any copied passage is detectable."""
    return torch.arange(B * T1).view(B, T1) + 1000


def find_random_repeat(row: torch.Tensor) -> tuple[int, int]:
    """(start, L) of the run of allowed tokens in ``row``; asserts it is [x, x]."""
    idx = torch.nonzero(row >= 100).flatten()
    assert len(idx) > 0, "no random segment written"
    start, n = idx[0].item(), len(idx)
    assert (idx == torch.arange(start, start + n)).all(), "segment is not contiguous"
    assert n % 2 == 0
    L = n // 2
    first, second = row[start:start + L], row[start + L:start + n]
    assert torch.equal(first, second), "second half does not repeat the first"
    assert len(torch.unique(first)) == L, "segment tokens are not distinct"
    return start, L


def g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_random_rows_carry_distinct_segment_repeated_once():
    w = text_windows(64)
    out = insert_repeats(w, g(1), frac=1.0, kind="random", min_len=5, max_len=20, allowed_ids=ALLOWED)
    assert out.shape == w.shape and out.dtype == torch.int64
    lengths = set()
    for b in range(len(w)):
        start, L = find_random_repeat(out[b])
        assert 5 <= L <= 20
        lengths.add(L)
        # everything outside the repeat is the original text
        keep = torch.ones(T1, dtype=torch.bool)
        keep[start:start + 2 * L] = False
        assert torch.equal(out[b][keep], w[b][keep])
    assert len(lengths) > 3  # lengths vary


def test_passage_copies_text_of_the_row_to_a_later_position():
    w = unique_windows(64)
    out = insert_repeats(w, g(2), frac=1.0, kind="passage", min_len=8, max_len=31)
    for b in range(len(w)):
        changed = torch.nonzero(out[b] != w[b]).flatten()
        dst, L = changed[0].item(), len(changed)
        assert 8 <= L <= 31
        assert (changed == torch.arange(dst, dst + L)).all()
        copied = out[b, dst:dst + L]
        src = (w[b] == copied[0]).nonzero().item()  # tokens are unique, so the source is known
        assert torch.equal(w[b, src:src + L], copied)
        assert src + L <= dst, "the copy must come after the passage it repeats"


def test_frac_controls_the_share_of_rows_and_zero_is_identity():
    w = text_windows(4000)
    out = insert_repeats(w, g(3), frac=0.3, kind="random", allowed_ids=ALLOWED)
    share = (out != w).any(1).float().mean().item()
    assert 0.26 < share < 0.34
    assert torch.equal(insert_repeats(w, g(3), frac=0.0, allowed_ids=ALLOWED), w)


def test_mixed_uses_both_kinds():
    w = unique_windows(200)
    out = insert_repeats(w, g(4), frac=1.0, kind="mixed", allowed_ids=ALLOWED)
    has_random = ((out >= 100) & (out < 140)).any(1)
    assert 0.35 < has_random.float().mean().item() < 0.65
    # the other rows got a passage copy instead
    assert ((out != w).any(1) & ~has_random).sum() > 50


def test_input_untouched_and_only_generator_randomness():
    w = text_windows(32)
    before = w.clone()
    a = insert_repeats(w, g(5), frac=0.5, kind="mixed", allowed_ids=ALLOWED)
    torch.manual_seed(123)  # the global RNG must not matter
    torch.rand(10)
    b = insert_repeats(w, g(5), frac=0.5, kind="mixed", allowed_ids=ALLOWED)
    assert torch.equal(w, before)
    assert torch.equal(a, b)
    c = insert_repeats(w, g(6), frac=0.5, kind="mixed", allowed_ids=ALLOWED)
    assert not torch.equal(a, c)


def test_generator_state_resumes_exactly():
    w = text_windows(16)
    gen = g(7)
    insert_repeats(w, gen, frac=0.5, kind="mixed", allowed_ids=ALLOWED)
    state = gen.get_state()
    expected = insert_repeats(w, gen, frac=0.5, kind="mixed", allowed_ids=ALLOWED)
    resumed = torch.Generator()
    resumed.set_state(state)
    assert torch.equal(insert_repeats(w, resumed, frac=0.5, kind="mixed", allowed_ids=ALLOWED), expected)


def test_default_allowed_ids_come_from_the_windows():
    w = unique_windows(8)
    out = insert_repeats(w, g(8), frac=1.0, kind="random", min_len=5, max_len=10)
    assert torch.isin(out, w).all()


@pytest.mark.parametrize("kwargs, match", [
    (dict(kind="shuffle"), "kind"),
    (dict(frac=1.5), "fraction"),
    (dict(frac=-0.1), "fraction"),
    (dict(min_len=0), "min_len"),
    (dict(min_len=12, max_len=10), "min_len"),
    (dict(max_len=40), "does not fit"),
    (dict(max_len=26, allowed_ids=torch.arange(100, 110)), "allowed"),
])
def test_bad_arguments_raise_one_clear_error(kwargs, match):
    args = dict(frac=0.5, kind="random", min_len=10, max_len=26, allowed_ids=ALLOWED) | kwargs
    with pytest.raises(ValueError, match=match):
        insert_repeats(text_windows(4), g(0), **args)


def test_windows_must_be_2d():
    with pytest.raises(ValueError, match="B, T"):
        insert_repeats(torch.zeros(65, dtype=torch.int64), g(0), frac=0.5, allowed_ids=ALLOWED)


def test_unigram_rows_carry_a_segment_drawn_from_the_weights_repeated_once():
    w = unique_windows(200)  # every text token is unique, so the written segment is visible
    weights = torch.zeros(2000, dtype=torch.int64)
    weights[[0, 1, 2, 3]] = torch.tensor([700, 200, 90, 10])  # segments may only use tokens 0-3
    out = insert_repeats(w, g(9), frac=1.0, kind="unigram", min_len=10, max_len=26, token_weights=weights)
    drawn = []
    for b in range(len(w)):
        idx = torch.nonzero(out[b] < 4).flatten()
        start, n = idx[0].item(), len(idx)
        assert (idx == torch.arange(start, start + n)).all() and n % 2 == 0, "not one contiguous [x, x]"
        L = n // 2
        assert 10 <= L <= 26
        assert torch.equal(out[b, start:start + L], out[b, start + L:start + n])
        keep = torch.ones(T1, dtype=torch.bool)
        keep[start:start + n] = False
        assert torch.equal(out[b][keep], w[b][keep])  # the rest is the original text
        drawn.append(out[b, start:start + L])
    freq = torch.bincount(torch.cat(drawn), minlength=4).double()
    freq /= freq.sum()
    # drawn with replacement in proportion to the weights (the 0.70 token recurs within a segment)
    assert torch.allclose(freq, torch.tensor([0.7, 0.2, 0.09, 0.01], dtype=torch.double), atol=0.03)


def test_unigram_without_weights_draws_from_the_windows_own_tokens():
    w = text_windows(32)  # tokens 0..9
    out = insert_repeats(w, g(10), frac=1.0, kind="unigram", min_len=10, max_len=20)
    assert int(out.max()) <= 9 and not torch.equal(out, w)
    assert torch.equal(insert_repeats(w, g(10), frac=0.0, kind="unigram"), w)
