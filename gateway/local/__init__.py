"""The local engine: an offline, in-process stand-in for Amazon Nova Sonic.

It speaks the same bidirectional event protocol (protocol/nova_events.py) through the ModelTransport
interface (gateway/transport.py): VAD endpointing, offline ASR, a rule-based reply policy and offline TTS,
with Nova's output sequence, barge-in signals, input-order validation and timeouts. ScriptedEngine is the
same with cheap scripted back ends (energy VAD, canned transcripts and reply, a tone): a load-test model.
"""

from gateway.local.engine import LocalEngine, LocalEngineConfig, LocalStream, ScriptedEngine, scripted_config

__all__ = ["LocalEngine", "LocalEngineConfig", "LocalStream", "ScriptedEngine", "scripted_config"]
