"""gateway/audio.py's voice activity: what it says does not depend on how the audio is cut."""

from __future__ import annotations

import math
import random
from array import array

import pytest
import webrtcvad

from gateway.audio import SpeechActivity

FRAME = SpeechActivity.FRAME


def stream() -> bytes:
    """Speech-like harmonics, silence and noise: webrtcvad says yes and no to parts of it."""
    vowel = array("h", (int(2500 * sum(math.sin(2 * math.pi * 140 * h * i / 16000) / h for h in range(1, 8)))
                        for i in range(16000))).tobytes()
    return vowel + bytes(16000) + random.Random(7).randbytes(16000) + vowel[:7000]


def reference(pcm: bytes) -> list[bool]:
    """webrtcvad over every whole 30 ms frame, one by one."""
    vad = webrtcvad.Vad(2)
    return [vad.is_speech(pcm[i : i + FRAME], 16000) for i in range(0, len(pcm) - FRAME + 1, FRAME)]


@pytest.mark.parametrize("sizes", [[640], [960], [1920], [2], [32000], [0, 2, 640, 700, 960, 1282, 4000]])
@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_each_feed_says_whether_the_frames_it_completed_hold_voice(sizes, kind):
    pcm = stream()
    frames = reference(pcm)
    assert any(frames) and not all(frames)
    vad, cut, done, pick = SpeechActivity(), 0, 0, random.Random(len(sizes))
    while cut < len(pcm):
        size = pick.choice(sizes)
        chunk, cut = pcm[cut : cut + size], cut + size
        completed = min(cut, len(pcm)) // FRAME
        assert vad.feed(kind(chunk)) == any(frames[done:completed])
        done = completed
    assert done == len(frames)
