"""Nova Sonic events: builders match reference/nova-sonic.md §2–§3, the parser reads what builders
and the real service emit."""

from __future__ import annotations

import base64

import orjson
import pytest

from protocol import nova_events as ne
from protocol.usage import Tokens

P, C = "prompt-1", "content-1"
IDS = {"sessionId": "sess-1", "promptName": P, "completionId": "comp-1"}


# ---------------------------------------------------------------------------------------------
# Input builders: exact shapes of §2


def test_session_start_shape():
    assert ne.session_start() == {
        "event": {"sessionStart": {"inferenceConfiguration": {"maxTokens": 1024, "topP": 0.9, "temperature": 0.7}}}
    }
    assert ne.session_start(max_tokens=1000, top_p=0.5, temperature=0.1, endpointing_sensitivity="MEDIUM") == {
        "event": {
            "sessionStart": {
                "inferenceConfiguration": {"maxTokens": 1000, "topP": 0.5, "temperature": 0.1},
                "turnDetectionConfiguration": {"endpointingSensitivity": "MEDIUM"},
            }
        }
    }


def test_prompt_start_shape_without_tools():
    assert ne.prompt_start(P) == {
        "event": {
            "promptStart": {
                "promptName": P,
                "textOutputConfiguration": {"mediaType": "text/plain"},
                "audioOutputConfiguration": {
                    "mediaType": "audio/lpcm",
                    "sampleRateHertz": 24000,
                    "sampleSizeBits": 16,
                    "channelCount": 1,
                    "voiceId": "matthew",
                    "encoding": "base64",
                    "audioType": "SPEECH",
                },
            }
        }
    }


def test_prompt_start_with_tools_and_options():
    tool = {
        "toolSpec": {
            "name": "getDateAndTimeTool",
            "description": "get information about the current date and time",
            "inputSchema": {"json": '{"type":"object","properties":{},"required":[]}'},
        }
    }
    body = ne.event_body(ne.prompt_start(P, voice_id="tiffany", output_sample_rate=16000, tools=[tool]))
    assert body["audioOutputConfiguration"]["voiceId"] == "tiffany"
    assert body["audioOutputConfiguration"]["sampleRateHertz"] == 16000
    assert body["toolUseOutputConfiguration"] == {"mediaType": "application/json"}
    assert body["toolConfiguration"] == {"tools": [tool]}
    assert isinstance(body["toolConfiguration"]["tools"][0]["toolSpec"]["inputSchema"]["json"], str)


@pytest.mark.parametrize("role, interactive", [("SYSTEM", False), ("USER", False), ("ASSISTANT", False), ("USER", True)])
def test_text_content_start_shape(role, interactive):
    assert ne.text_content_start(P, C, role, interactive=interactive) == {
        "event": {
            "contentStart": {
                "promptName": P,
                "contentName": C,
                "type": "TEXT",
                "interactive": interactive,
                "role": role,
                "textInputConfiguration": {"mediaType": "text/plain"},
            }
        }
    }


def test_text_content_start_defaults_to_non_interactive():
    assert ne.event_body(ne.text_content_start(P, C, "SYSTEM"))["interactive"] is False


def test_audio_content_start_shape():
    assert ne.audio_content_start(P, C) == {
        "event": {
            "contentStart": {
                "promptName": P,
                "contentName": C,
                "type": "AUDIO",
                "interactive": True,
                "role": "USER",
                "audioInputConfiguration": {
                    "mediaType": "audio/lpcm",
                    "sampleRateHertz": 16000,
                    "sampleSizeBits": 16,
                    "channelCount": 1,
                    "audioType": "SPEECH",
                    "encoding": "base64",
                },
            }
        }
    }


def test_tool_content_start_shape():
    assert ne.tool_content_start(P, C, "tooluse_1") == {
        "event": {
            "contentStart": {
                "promptName": P,
                "contentName": C,
                "interactive": False,
                "type": "TOOL",
                "role": "TOOL",
                "toolResultInputConfiguration": {
                    "toolUseId": "tooluse_1",
                    "type": "TEXT",
                    "textInputConfiguration": {"mediaType": "text/plain"},
                },
            }
        }
    }


def test_content_events_shapes():
    pcm = bytes(range(256)) * 4
    assert ne.text_input(P, C, "You are…") == {"event": {"textInput": {"promptName": P, "contentName": C, "content": "You are…"}}}
    audio = ne.audio_input(P, C, pcm)
    assert audio == {
        "event": {"audioInput": {"promptName": P, "contentName": C, "content": base64.b64encode(pcm).decode("ascii")}}
    }
    assert base64.b64decode(ne.event_body(audio)["content"]) == pcm
    assert ne.tool_result(P, C, '{"formattedTime":"10:42 AM"}') == {
        "event": {"toolResult": {"promptName": P, "contentName": C, "content": '{"formattedTime":"10:42 AM"}'}}
    }


def test_end_events_shapes():
    assert ne.content_end(P, C) == {"event": {"contentEnd": {"promptName": P, "contentName": C}}}
    assert ne.prompt_end(P) == {"event": {"promptEnd": {"promptName": P}}}
    assert ne.session_end() == {"event": {"sessionEnd": {}}}


def test_text_block_is_one_content_block_with_a_fresh_name():
    events = ne.text_block(P, "SYSTEM", ["part one", "part two"])
    assert [ne.event_name(e) for e in events] == ["contentStart", "textInput", "textInput", "contentEnd"]
    names = {ne.event_body(e)["contentName"] for e in events}
    assert len(names) == 1
    (name,) = names
    assert name != ne.event_body(ne.text_block(P, "SYSTEM", ["x"])[0])["contentName"]
    assert ne.event_body(events[0])["interactive"] is False
    assert [ne.event_body(e)["content"] for e in events[1:3]] == ["part one", "part two"]


def test_new_name_is_a_lowercase_uuid():
    name = ne.new_name()
    assert len(name) == 36 and name == name.lower() and name.count("-") == 4
    assert ne.new_name() != name


def test_events_serialise_to_json():
    for e in [ne.session_start(), ne.prompt_start(P), ne.audio_input(P, C, b"\x00\x01"), *ne.text_block(P, "USER", ["é😀"])]:
        assert orjson.loads(orjson.dumps(e)) == e


def test_event_name_and_body():
    e = ne.prompt_end(P)
    assert ne.event_name(e) == "promptEnd"
    assert ne.event_body(e) == {"promptName": P}


# ---------------------------------------------------------------------------------------------
# Output builders -> parser round trip


def test_round_trip_completion_start_and_end():
    assert ne.parse_output_event(ne.completion_start(IDS)) == ne.CompletionStart("comp-1")
    assert ne.parse_output_event(ne.completion_end(IDS)) == ne.CompletionEnd("END_TURN")
    assert ne.parse_output_event(ne.completion_end(IDS, "INTERRUPTED")) == ne.CompletionEnd("INTERRUPTED")


@pytest.mark.parametrize("stage", ["SPECULATIVE", "FINAL", None])
def test_round_trip_text_content_start_stage(stage):
    ev = ne.output_content_start(IDS, "c1", type="TEXT", role="ASSISTANT", stage=stage)
    body = ne.event_body(ev)
    if stage:
        assert isinstance(body["additionalModelFields"], str)  # a JSON string, as the service sends it
    else:
        assert "additionalModelFields" not in body
    assert body["textOutputConfiguration"] == {"mediaType": "text/plain"}
    assert ne.parse_output_event(ev) == ne.ContentStart("c1", "TEXT", "ASSISTANT", stage, None)


@pytest.mark.parametrize("rate", ne.MODEL_OUTPUT_RATES)
def test_round_trip_audio_content_start(rate):
    ev = ne.output_content_start(IDS, "c2", type="AUDIO", role="ASSISTANT", sample_rate=rate)
    assert ne.event_body(ev)["audioOutputConfiguration"]["sampleRateHertz"] == rate
    assert ne.parse_output_event(ev) == ne.ContentStart("c2", "AUDIO", "ASSISTANT", None, rate)


def test_round_trip_tool_content_start_and_use():
    ev = ne.output_content_start(IDS, "c3", type="TOOL", role="TOOL")
    assert ne.event_body(ev)["toolUseOutputConfiguration"] == {"mediaType": "application/json"}
    assert ne.parse_output_event(ev) == ne.ContentStart("c3", "TOOL", "TOOL")
    use = ne.output_tool_use(IDS, "c3", "tooluse_9", "trackOrderTool", '{"orderId":"1234"}')
    assert ne.parse_output_event(use) == ne.ToolUse("c3", "tooluse_9", "trackOrderTool", '{"orderId":"1234"}')


def test_round_trip_text_output():
    ev = ne.output_text(IDS, "c1", "USER", "what time is it")
    assert ne.parse_output_event(ev) == ne.TextOutput("c1", "USER", "what time is it", False)


def test_round_trip_audio_output():
    pcm = b"\x01\x02" * 480
    parsed = ne.parse_output_event(ne.output_audio(IDS, "c2", pcm))
    assert parsed == ne.AudioOutput("c2", pcm)
    assert parsed.pcm == pcm


@pytest.mark.parametrize("type_, reason", [("TEXT", "PARTIAL_TURN"), ("AUDIO", "END_TURN"), ("TEXT", "INTERRUPTED"), ("TOOL", "TOOL_USE")])
def test_round_trip_content_end(type_, reason):
    ev = ne.output_content_end(IDS, "c9", type=type_, stop_reason=reason)
    assert ne.parse_output_event(ev) == ne.ContentEnd("c9", type_, reason)


def test_round_trip_usage():
    ev = ne.usage_event(IDS, input_speech=150, input_text=22, output_speech=40, output_text=5)
    body = ne.event_body(ev)
    assert body["details"]["total"] == {
        "input": {"speechTokens": 150, "textTokens": 22},
        "output": {"speechTokens": 40, "textTokens": 5},
    }
    assert (body["totalInputTokens"], body["totalOutputTokens"], body["totalTokens"]) == (172, 45, 217)
    assert ne.parse_output_event(ev) == ne.UsageEvent(Tokens(150, 22, 40, 5))


def test_output_events_carry_ids():
    for ev in [
        ne.completion_start(IDS),
        ne.output_text(IDS, "c", "ASSISTANT", "x"),
        ne.output_audio(IDS, "c", b"\x00\x00"),
        ne.output_content_end(IDS, "c", type="TEXT", stop_reason="END_TURN"),
        ne.completion_end(IDS),
    ]:
        body = ne.event_body(ev)
        assert {k: body[k] for k in IDS} == IDS


@pytest.mark.parametrize("as_", [bytes, str])
def test_parser_accepts_serialised_events(as_):
    ev = ne.output_text(IDS, "c1", "ASSISTANT", "Hello! How can I help?")
    raw = orjson.dumps(ev)
    data = raw if as_ is bytes else raw.decode()
    assert ne.parse_output_event(data) == ne.TextOutput("c1", "ASSISTANT", "Hello! How can I help?")


# ---------------------------------------------------------------------------------------------
# Captured service traffic (§3)


def test_parses_captured_text_content_start():
    raw = (
        b'{"event":{"contentStart":{"additionalModelFields":"{\\"generationStage\\":\\"SPECULATIVE\\"}",'
        b'"completionId":"a16f","contentId":"0243d58d","promptName":"b5e9","sessionId":"d7f5",'
        b'"role":"ASSISTANT","type":"TEXT","textOutputConfiguration":{"mediaType":"text/plain"}}}}'
    )
    assert ne.parse_output_event(raw) == ne.ContentStart("0243d58d", "TEXT", "ASSISTANT", "SPECULATIVE", None)


def test_parses_captured_usage_event():
    raw = {
        "event": {
            "usageEvent": {
                "completionId": "9443",
                "details": {
                    "delta": {"input": {"speechTokens": 150, "textTokens": 0}, "output": {"speechTokens": 0, "textTokens": 0}},
                    "total": {"input": {"speechTokens": 150, "textTokens": 22}, "output": {"speechTokens": 0, "textTokens": 0}},
                },
                "promptName": "ba6f",
                "sessionId": "4552",
                "totalInputTokens": 172,
                "totalOutputTokens": 0,
                "totalTokens": 172,
            }
        }
    }
    assert ne.parse_output_event(raw) == ne.UsageEvent(Tokens(150, 22, 0, 0))


# ---------------------------------------------------------------------------------------------
# Barge-in signal


@pytest.mark.parametrize(
    "text",
    [ne.INTERRUPTED_SIGNAL, '{ "interrupted" : true }', '{"interrupted":true}', '  {"interrupted": true}\n', '{"interrupted": true, "x": 1}'],
)
def test_interrupted_signal_detected(text):
    assert ne.is_interrupted_signal(text) is True
    parsed = ne.parse_output_event(ne.output_text(IDS, "c1", "ASSISTANT", text))
    assert isinstance(parsed, ne.TextOutput) and parsed.interrupted is True


@pytest.mark.parametrize(
    "text",
    [
        "interrupted",
        "I was interrupted",
        '{"interrupted": false}',
        '{"interrupted": "true"}',
        '{"interrupted": 1}',
        '{ "interrupted" : true',
        '["interrupted", true]',
        "{not json interrupted}",
        "",
        "{}",
    ],
)
def test_not_interrupted_signal(text):
    assert ne.is_interrupted_signal(text) is False
    assert ne.parse_output_event(ne.output_text(IDS, "c1", "ASSISTANT", text)).interrupted is False


def test_interrupted_signal_constant_matches_reference():
    assert ne.INTERRUPTED_SIGNAL == '{ "interrupted" : true }'


# ---------------------------------------------------------------------------------------------
# additionalModelFields stage parsing


def _content_start_with(fields: object) -> dict:
    body = {**IDS, "contentId": "c", "type": "TEXT", "role": "ASSISTANT"}
    if fields is not ...:
        body["additionalModelFields"] = fields
    return {"event": {"contentStart": body}}


@pytest.mark.parametrize(
    "fields, stage",
    [
        ('{"generationStage":"SPECULATIVE"}', "SPECULATIVE"),
        ('{"generationStage":"FINAL"}', "FINAL"),
        ('{"generationStage": "FINAL", "other": 1}', "FINAL"),
        ({"generationStage": "FINAL"}, "FINAL"),  # already decoded
        ('{"generationStage":"DRAFT"}', None),  # unknown stage
        ('{"generationStage":"final"}', None),
        ("{}", None),
        ("not json", None),
        ('["FINAL"]', None),
        ("", None),
        (None, None),
        (..., None),  # absent
    ],
)
def test_stage_parsing(fields, stage):
    parsed = ne.parse_output_event(_content_start_with(fields))
    assert isinstance(parsed, ne.ContentStart)
    assert parsed.stage == stage


# ---------------------------------------------------------------------------------------------
# Unknown events


def test_unknown_event_keeps_name_and_body():
    ev = {"event": {"somethingNew": {"a": 1, "promptName": P}}}
    assert ne.parse_output_event(ev) == ne.UnknownEvent("somethingNew", {"a": 1, "promptName": P})


def test_input_events_parse_as_unknown():
    """Input event names the output parser does not know are reported, not misread."""
    parsed = ne.parse_output_event(ne.audio_input(P, C, b"\x00\x00"))
    assert isinstance(parsed, ne.UnknownEvent) and parsed.name == "audioInput"


def test_missing_fields_default_to_empty():
    assert ne.parse_output_event({"event": {"contentEnd": {}}}) == ne.ContentEnd("", "", "")
    assert ne.parse_output_event({"event": {"textOutput": {}}}) == ne.TextOutput("", "", "", False)
    assert ne.parse_output_event({"event": {"usageEvent": {}}}) == ne.UsageEvent(Tokens())
