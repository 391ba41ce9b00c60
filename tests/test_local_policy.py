"""The local engine's deterministic reply policy."""

from __future__ import annotations

from gateway.local import speech
from gateway.local.policy import NOT_CAUGHT, STORY, reply

SMITH = "i met with doctor smith today at two pm"


def test_empty_text_is_not_caught():
    assert reply("", []) == [NOT_CAUGHT] == ["Sorry, I didn't catch that."]
    assert reply("  ...  ", [("USER", "hello")]) == [NOT_CAUGHT]


def test_recall_quotes_earlier_user_turns():
    history = [("USER", SMITH), ("ASSISTANT", "Got it.")]
    for question in ("what did we discuss", "What did we talk about?", "Can you remind me?",
                     "what have we discussed so far"):
        out = reply(question, history)
        assert out[0] == "We talked about this: you said I met with Doctor Smith today at two pm.", question
    out = " ".join(reply("what did we discuss", [("USER", "I like cats"), ("USER", "what did we discuss"),
                                                  ("USER", SMITH)]))
    assert "cats" in out and "Doctor Smith" in out and out.count("what did we discuss") == 0


def test_recall_without_history():
    out = reply("what did we discuss", [("ASSISTANT", "Hello!")])
    assert out[0] == "We haven't talked about anything yet."


def test_greeting():
    out = reply("Hello!", [])
    assert out[0].startswith("Hello") and len(out) == 2
    assert reply("good morning", [])[0].startswith("Good morning")
    assert reply("hi", [("USER", SMITH)])[0].startswith("Hello again")


def test_story_is_long_enough_for_barge_in():
    out = reply("tell me a story", [])
    assert out == list(STORY)
    assert len(out) >= 8
    assert reply("say something long", []) == list(STORY)
    assert reply("how long is the river", []) != list(STORY)
    seconds = len(speech.synthesize(" ".join(out), 16000, "espeak")) / 2 / 16000
    assert seconds >= 10.0


def test_default_echoes_and_asks_a_follow_up():
    out = reply(SMITH, [])
    assert len(out) == 2
    assert out[0] == "Got it, you said: I met with Doctor Smith today at two pm."
    assert out[1].endswith("?")
    assert reply(SMITH, []) == out  # deterministic
    q = reply("where is the station?", [])
    assert len(q) == 2 and "where is the station" in q[0].lower()


def test_long_user_text_is_capped_in_the_echo():
    out = reply(" ".join(["word"] * 100), [])
    assert len(out[0].split()) < 45


def test_other_small_talk():
    assert reply("thank you", [])[0] == "You're very welcome!"
    assert reply("goodbye", [])[0].startswith("Goodbye")
    assert "well" in reply("how are you", [])[0]
    assert "Nova Sonic" in reply("who are you", [])[0]
