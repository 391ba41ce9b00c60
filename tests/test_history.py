"""History shaping for Nova Sonic (reference/nova-sonic.md §4): examples and properties."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol.history import HistoryTurn, history_events, shape_history, trim_to_played
from protocol.items import Item
from protocol.nova_events import MAX_HISTORY_BYTES, MAX_TEXT_INPUT_BYTES, event_body, event_name

KB = 1024


def mk(*pairs: tuple[str, str]) -> list[Item]:
    return [Item(f"item_{i}", role, text, f"2026-01-01T00:00:{i:02d}.000000Z") for i, (role, text) in enumerate(pairs)]


def u(text: str) -> tuple[str, str]:
    return ("user", text)


def a(text: str) -> tuple[str, str]:
    return ("assistant", text)


def nbytes(s: str) -> int:
    return len(s.encode("utf-8"))


def rejoins(chunks: tuple[str, ...], text: str) -> bool:
    """Whether `text` is the chunks joined with "" or a single " " at each split point."""
    positions = {0}
    for i, chunk in enumerate(chunks):
        nxt = set()
        for p in positions:
            for sep in ("", " ") if i else ("",):
                if text.startswith(sep + chunk, p):
                    nxt.add(p + len(sep) + len(chunk))
        positions = nxt
        if not positions:
            return False
    return len(text) in positions


def reference_turns(items: list[Item]) -> list[tuple[str, str]]:
    """An independent statement of the merge rule."""
    out: list[tuple[str, str]] = []
    for it in items:
        text = it.text.strip()
        if not text:
            continue
        role = it.role.upper()
        if out and out[-1][0] == role:
            out[-1] = (role, out[-1][1] + " " + text)
        else:
            out.append((role, text))
    return out


# ---------------------------------------------------------------------------------------------
# Examples


def test_empty_input_gives_empty_history():
    assert shape_history([]) == []
    assert shape_history(mk(u("   "), a("\n\t"), u(""))) == []


def test_roles_are_mapped_and_alternation_kept():
    turns = shape_history(mk(u("hi"), a("hello"), u("how are you?"), a("fine")))
    assert turns == [
        HistoryTurn("USER", ("hi",)),
        HistoryTurn("ASSISTANT", ("hello",)),
        HistoryTurn("USER", ("how are you?",)),
        HistoryTurn("ASSISTANT", ("fine",)),
    ]


def test_consecutive_same_role_items_merge_with_one_space_and_blank_items_are_skipped():
    turns = shape_history(mk(u("first "), u("  "), u(" second"), a("one"), a(""), a("two"), u("third")))
    assert turns == [
        HistoryTurn("USER", ("first second",)),
        HistoryTurn("ASSISTANT", ("one two",)),
        HistoryTurn("USER", ("third",)),
    ]


def test_leading_assistant_turns_are_dropped():
    turns = shape_history(mk(a("welcome"), a("again"), u("hi"), a("hello")))
    assert [t.role for t in turns] == ["USER", "ASSISTANT"]
    assert turns[0].chunks == ("hi",)


def test_only_assistant_items_give_empty_history():
    assert shape_history(mk(a("a"), a("b"))) == []


def test_drop_trailing_user():
    items = mk(u("q1"), a("a1"), u("q2"), u("q2 more"))
    assert [t.role for t in shape_history(items)] == ["USER", "ASSISTANT", "USER"]
    turns = shape_history(items, drop_trailing_user=True)
    assert turns == [HistoryTurn("USER", ("q1",)), HistoryTurn("ASSISTANT", ("a1",))]
    # nothing to drop when the history ends with the assistant
    assert shape_history(mk(u("q"), a("r")), drop_trailing_user=True) == shape_history(mk(u("q"), a("r")))
    assert shape_history(mk(u("only")), drop_trailing_user=True) == []


def test_oldest_whole_turns_are_dropped_first():
    items = mk(u("a" * 10), a("b" * 10), u("c" * 10), a("d" * 10))
    turns = shape_history(items, max_bytes=25)
    # d (10) + c (10) fit; b (10) would make 30; so b and a go, and history starts with USER "c"
    assert turns == [HistoryTurn("USER", ("c" * 10,)), HistoryTurn("ASSISTANT", ("d" * 10,))]


def test_budget_counts_utf8_bytes_not_characters():
    items = mk(u("é" * 10), a("ok"))  # 20 bytes + 2 bytes
    assert shape_history(items, max_bytes=22)[0].chunks == ("é" * 10,)
    turns = shape_history(items, max_bytes=21)
    assert sum(nbytes(c) for t in turns for c in t.chunks) <= 21


def test_user_turn_at_the_boundary_keeps_its_tail_so_history_still_starts_with_user():
    items = mk(u("old question"), a("old answer"), u("please summarise the following long text " * 5), a("Summary."))
    turns = shape_history(items, max_bytes=60)
    assert [t.role for t in turns] == ["USER", "ASSISTANT"]
    assert turns[1].chunks == ("Summary.",)
    user_text = " ".join(turns[0].chunks)
    assert ("please summarise the following long text " * 5).strip().endswith(user_text)
    assert user_text.split()[0] in "please summarise the following long text".split()  # cut at a word
    assert sum(nbytes(c) for t in turns for c in t.chunks) <= 60


def test_assistant_turn_at_the_boundary_is_not_kept_partially():
    items = mk(u("q1"), a("x " * 50), u("q2"), a("r2"))
    turns = shape_history(items, max_bytes=30)
    assert turns == [HistoryTurn("USER", ("q2",)), HistoryTurn("ASSISTANT", ("r2",))]


def test_single_newest_turn_over_budget_keeps_its_end_at_a_word():
    text = " ".join(f"word{i}" for i in range(200))  # ~1.3 KB
    turns = shape_history(mk(u(text)), max_bytes=100)
    assert len(turns) == 1
    kept = " ".join(turns[0].chunks)
    assert nbytes(kept) <= 100
    assert text.endswith(kept)
    assert kept.startswith("word") and text[len(text) - len(kept) - 1] == " "  # starts at a whole word
    assert kept.endswith("word199")


def test_single_newest_turn_without_spaces_is_cut_at_a_character():
    text = "😀" * 100  # 400 bytes
    turns = shape_history(mk(u(text)), max_bytes=10)
    assert turns == [HistoryTurn("USER", ("😀😀",))]  # 8 bytes; a third emoji would need 12


def test_chunks_split_at_spaces_within_limit():
    text = " ".join(["abcdefghi"] * 300)  # ~3 KB
    (turn,) = shape_history(mk(u(text)))
    assert len(turn.chunks) > 1
    assert all(nbytes(c) <= 1024 for c in turn.chunks)
    assert all(c == c.strip() and c.startswith("abc") and c.endswith("ghi") for c in turn.chunks)
    assert " ".join(turn.chunks) == text


def test_chunk_fills_up_to_the_limit_when_a_word_ends_exactly_there():
    (turn,) = shape_history(mk(u("aaaa bbbb cccc")), max_chunk_bytes=9)
    assert turn.chunks == ("aaaa bbbb", "cccc")


def test_chunks_split_without_spaces_at_character_boundaries():
    text = "中" * 1000  # 3000 bytes, 3 bytes each
    (turn,) = shape_history(mk(u(text)))
    assert [nbytes(c) for c in turn.chunks] == [1023, 1023, 954]
    assert "".join(turn.chunks) == text


def test_newline_split_point_is_kept_not_replaced():
    text = "x" * 600 + "\n" + "y" * 600
    (turn,) = shape_history(mk(u(text)))
    assert turn.chunks == ("x" * 600 + "\n", "y" * 600)
    assert "".join(turn.chunks) == text


def test_tiny_chunk_limit_is_rejected():
    with pytest.raises(ValueError):
        shape_history(mk(u("hi")), max_chunk_bytes=3)


def test_forty_kb_default_budget():
    items = mk(*[(u if i % 2 == 0 else a)("z" * 999 + f" {i}") for i in range(100)])
    turns = shape_history(items)
    total = sum(nbytes(c) for t in turns for c in t.chunks)
    assert 39 * KB < total <= 40 * KB
    assert turns[0].role == "USER"
    assert turns[-1].chunks[-1].endswith(" 99")


def test_history_events_shape():
    turns = [HistoryTurn("USER", ("hello", "world")), HistoryTurn("ASSISTANT", ("hi",))]
    events = history_events("P", turns)
    assert [event_name(e) for e in events] == [
        "contentStart",
        "textInput",
        "textInput",
        "contentEnd",
        "contentStart",
        "textInput",
        "contentEnd",
    ]
    starts = [event_body(e) for e in events if event_name(e) == "contentStart"]
    assert [(s["role"], s["type"], s["interactive"]) for s in starts] == [("USER", "TEXT", False), ("ASSISTANT", "TEXT", False)]
    assert all(event_body(e)["promptName"] == "P" for e in events)
    names = [event_body(e)["contentName"] for e in events]
    assert len(set(names[:4])) == 1 and len(set(names[4:])) == 1 and names[0] != names[4]
    assert [event_body(e)["content"] for e in events if event_name(e) == "textInput"] == ["hello", "world", "hi"]
    assert history_events("P", []) == []


# ---------------------------------------------------------------------------------------------
# trim_to_played


@pytest.mark.parametrize(
    "text, played, total, expected",
    [
        ("hello world foo", 0, 1000, ""),
        ("hello world foo", -5, 1000, ""),
        ("hello world foo", 1000, 1000, "hello world foo"),
        ("hello world foo", 5000, 1000, "hello world foo"),
        ("hello world foo", 500, 0, "hello world foo"),
        ("hello world foo", 400, 1000, "hello"),  # 6 chars: just past "hello "
        ("hello world foo", 734, 1000, "hello world"),  # 11 chars: just after "world"
        ("hello world foo", 300, 1000, ""),  # 4 chars: first word unfinished
        ("hello, world. Bye", 800, 1000, "hello, world."),
        ("", 500, 1000, ""),
    ],
)
def test_trim_to_played_examples(text, played, total, expected):
    assert trim_to_played(text, played, total) == expected


def test_trim_to_played_cuts_back_inside_a_word():
    assert trim_to_played("hello world foo", 600, 1000) == "hello"  # 9 chars lands inside "world"


# ---------------------------------------------------------------------------------------------
# Properties

ALPHABET = st.one_of(
    st.sampled_from([" ", " ", " ", "\n", "\t", "a", "b", "Z", ".", "é", "ß", "中", "文", "😀", "👍", "\U0001F3FD", "\u3000"]),
    st.characters(codec="utf-8"),
)
short_text = st.text(alphabet=ALPHABET, max_size=60)


@st.composite
def long_text(draw) -> str:
    """Cheap long texts: a fragment repeated, sometimes with no spaces at all."""
    return draw(st.text(alphabet=ALPHABET, min_size=1, max_size=12)) * draw(st.integers(1, 4000))


roles = st.sampled_from(["user", "assistant"])


def items_from(pairs: list[tuple[str, str]]) -> list[Item]:
    return mk(*pairs)


def check_invariants(items: list[Item], turns: list[HistoryTurn], *, max_bytes: int, max_chunk: int, drop: bool):
    if turns:
        assert turns[0].role == "USER"
    assert all(t.role in ("USER", "ASSISTANT") for t in turns)
    assert all(x.role != y.role for x, y in zip(turns, turns[1:]))
    assert all(t.chunks and all(c for c in t.chunks) for t in turns)
    assert all(nbytes(c) <= max_chunk for t in turns for c in t.chunks)
    assert sum(nbytes(c) for t in turns for c in t.chunks) <= max_bytes
    if drop and turns:
        assert turns[-1].role == "ASSISTANT"

    # The shaped turns are the newest merged turns; only the oldest kept one may be a tail.
    ref = reference_turns(items)
    if drop and ref and ref[-1][0] == "USER":
        ref = ref[:-1]
    first_start = 0  # where the oldest kept turn starts inside its merged text
    if turns:
        aligned = ref[len(ref) - len(turns) :]
        for i, (turn, (role, text)) in enumerate(zip(turns, aligned)):
            assert turn.role == role
            if i == 0:
                starts = [k for k in range(len(text)) if rejoins(turn.chunks, text[k:])]
                assert starts, "the oldest kept turn must be a suffix of its merged text"
                first_start = starts[0]
            else:
                assert rejoins(turn.chunks, text), "chunks must rejoin to the merged text"

    # The newest item survives (as the end of the last turn) when it fits.
    merged = reference_turns(items)
    if not merged or (drop and merged[-1][0] == "USER"):
        return
    newest = next(it.text.strip() for it in reversed(items) if it.text.strip())
    last_role, last_text = merged[-1]
    if last_role == "USER":
        fits = nbytes(newest) <= max_bytes
    else:  # the assistant turn must fit with room for at least one character of a user turn before it
        fits = len(merged) >= 2 and nbytes(last_text) + 4 <= max_bytes
    if fits:
        assert turns and turns[-1].role == last_role
        if len(turns) == 1:
            assert first_start <= len(last_text) - len(newest), "the newest item was cut"
        # with more turns, the last one rejoined exactly to last_text above, which ends with the newest item


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    pairs=st.lists(st.tuples(roles, short_text), max_size=25),
    max_bytes=st.integers(0, 400),
    max_chunk=st.integers(4, 40),
    drop=st.booleans(),
)
def test_property_small_limits(pairs, max_bytes, max_chunk, drop):
    items = items_from(pairs)
    turns = shape_history(items, max_bytes=max_bytes, max_chunk_bytes=max_chunk, drop_trailing_user=drop)
    check_invariants(items, turns, max_bytes=max_bytes, max_chunk=max_chunk, drop=drop)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(pairs=st.lists(st.tuples(roles, st.one_of(short_text, long_text())), max_size=30), drop=st.booleans())
def test_property_default_limits_with_long_texts(pairs, drop):
    items = items_from(pairs)
    turns = shape_history(items, drop_trailing_user=drop)
    check_invariants(items, turns, max_bytes=MAX_HISTORY_BYTES, max_chunk=MAX_TEXT_INPUT_BYTES, drop=drop)


@settings(max_examples=200, deadline=None)
@given(text=short_text, max_chunk=st.integers(4, 64))
def test_property_single_turn_chunks_rejoin_exactly(text, max_chunk):
    turns = shape_history(mk(u(text)), max_chunk_bytes=max_chunk)
    if not text.strip():
        assert turns == []
        return
    (turn,) = turns
    assert all(nbytes(c) <= max_chunk for c in turn.chunks)
    assert rejoins(turn.chunks, text.strip())
    # only single spaces are ever dropped, nothing else
    assert sorted("".join(turn.chunks).replace(" ", "")) == sorted(text.strip().replace(" ", ""))


@settings(max_examples=300, deadline=None)
@given(text=short_text, played=st.integers(-100, 3000), total=st.integers(-10, 3000))
def test_property_trim_to_played(text, played, total):
    heard = trim_to_played(text, played, total)
    assert text.startswith(heard)
    if played <= 0:
        assert heard == ""
    elif total <= 0 or played >= total:
        assert heard == text
    else:
        assert len(heard) <= len(text) * played // total
        # ends at a word boundary: nothing heard, or the next character is whitespace
        assert heard == "" or (not heard[-1].isspace() and text[len(heard) : len(heard) + 1].isspace())
        # monotone: hearing more never yields less
        assert text.startswith(heard) and trim_to_played(text, played + 1, total).startswith(heard)


def test_tail_does_not_throw_away_most_of_the_budget_to_reach_a_word():
    text = "a" * 90 + " bb"
    (turn,) = shape_history(mk(u(text)), max_bytes=50)
    assert turn.chunks == ("a" * 47 + " bb",)  # a cut word beats keeping only "bb"
