"""`novagate` command line: serve, check, client, emulate."""

from __future__ import annotations

import argparse
import asyncio
import sys

from protocol import messages

from .config import ConfigError, Settings, add_arguments, settings_from_args


def _serve(args: argparse.Namespace) -> int:
    from . import logs
    from .app import create_app

    try:
        settings = settings_from_args(args)
    except ConfigError as e:
        print(f"novagate: configuration error: {e}", file=sys.stderr)
        return 2
    logs.setup(settings.log_level, show_text=settings.log_transcripts)
    from .tokens import Authenticator, load_previous_secrets, load_secret

    try:  # secrets (environment or files, never flags): a short or unreadable one stops us now
        load_secret(settings.secret, settings.secret_file)
        load_previous_secrets(settings.secret_previous, settings.secret_previous_file)
        Authenticator.from_settings(settings)
        if settings.engine == "local":  # its speech packages are the `local` extra: missing, say so now
            from .local.speech import check_installed

            check_installed(settings.local_asr, settings.local_tts)
    except (ConfigError, OSError) as e:
        print(f"novagate: configuration error: {e}", file=sys.stderr)
        return 2
    if settings.engine == "bedrock" or settings.store == "agent-runtime":
        from .bedrock import BedrockSetupError, check_credentials

        try:  # fail now, with a message, rather than at the first caller
            found = asyncio.run(check_credentials(settings.aws_region))
        except BedrockSetupError as e:
            print(f"novagate: cannot use AWS: {e}", file=sys.stderr)
            return 2
        print(f"novagate: AWS region {found.region}, credentials {found.access_key_id}"
              + (" (temporary)" if found.temporary else ""), file=sys.stderr)
        if settings.preflight and not _preflight(settings):
            return 2
    from . import workers

    n = settings.workers or workers.default_workers()
    if n > 1:  # a supervisor and n worker processes on one socket (gateway/workers.py)
        return workers.serve(settings, n)
    from . import server

    try:  # e.g. NOVAGATE_ALLOWED_HOSTS unset while listening beyond loopback
        app = create_app(settings)
    except ConfigError as e:
        print(f"novagate: configuration error: {e}", file=sys.stderr)
        return 2
    admin = f"; /metrics on http://{settings.metrics_host}:{settings.metrics_port}/" if settings.metrics_port else ""
    print(f"novagate: serving on http://{settings.host}:{settings.port}/ (engine {settings.engine}, "
          f"store {settings.store}){admin}", file=sys.stderr, flush=True)
    server.build(settings, app).run()
    return 0


def _preflight(settings: Settings) -> bool:
    """The start-up permission check (gateway/preflight.py): False when a permission is missing."""
    from . import preflight

    results = asyncio.run(preflight.run(settings))
    for r in results:
        print(f"novagate: preflight: {r.line()}", file=sys.stderr)
    fatal = [r for r in results if r.fatal]
    if fatal:
        print(f"novagate: cannot start: {fatal[0].check}: {fatal[0].detail}. See docs/iam.md; "
              "NOVAGATE_PREFLIGHT=false starts without the check", file=sys.stderr, flush=True)
        return False
    if any(r.status == preflight.UNREACHABLE for r in results):
        print("novagate: warning: the permission check could not finish (above); starting anyway",
              file=sys.stderr, flush=True)
    return True


def _check(args: argparse.Namespace) -> int:
    """`novagate check`: the start-up checks, one line each. Exit 0: all passed; 2: a permission or the
    configuration is wrong; 1: a check could not finish (unreachable, throttled), nothing wrong found."""
    from . import preflight

    try:
        settings = settings_from_args(args)
    except ConfigError as e:
        print(f"novagate check: configuration error: {e}", file=sys.stderr)
        return 2
    if settings.engine != "bedrock" and settings.store != "agent-runtime":
        print(f"nothing to check: engine {settings.engine} and store {settings.store} use no AWS service")
        return 0

    async def run() -> list:
        creds = await preflight.check_credentials(settings, settings.preflight_timeout_s)
        return [creds] + ([] if creds.fatal else await preflight.run(settings))

    results = asyncio.run(run())
    for r in results:
        print(r.line(), flush=True)
    print(f"novagate check: {preflight.summary(results)}", flush=True)
    if any(r.fatal for r in results):
        return 2
    return 1 if any(r.status == preflight.UNREACHABLE for r in results) else 0


def _client(args: argparse.Namespace) -> int:
    from .client import run_cli

    try:
        return asyncio.run(run_cli(args))
    except (ConnectionError, OSError, TimeoutError) as e:
        print(f"novagate client: {e}", file=sys.stderr)
        return 1


def _revoke(args: argparse.Namespace) -> int:
    """Log out everywhere: resume tokens minted so far stop working; a live session, on any instance,
    is closed (4409) at its next write."""
    from .store import ConversationGone, StoreError, open_store

    async def run() -> int:
        store = open_store(Settings.from_env(store=args.store, sqlite_path=args.sqlite_path))
        try:
            epoch = await store.revoke(args.conversation_id)
        except ConversationGone as e:
            print(f"novagate revoke: {args.conversation_id}: {e.reason}", file=sys.stderr)
            return 1
        except StoreError as e:
            print(f"novagate revoke: the store is unavailable: {e}", file=sys.stderr)
            return 1
        finally:
            await store.aclose()
        print(f"revoked {args.conversation_id}: epoch {epoch}; earlier resume tokens no longer work")
        return 0

    return asyncio.run(run())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="novagate", description="WebSocket gateway for Amazon Nova Sonic")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser(
        "serve", help="run the gateway",
        description="Run the gateway. Every setting is an environment variable NOVAGATE_<NAME> or a flag. "
        "Secrets are never flags (a command line is visible in ps): set NOVAGATE_SECRET and "
        "NOVAGATE_AUTH_JWT_SECRET in the environment, or point --secret-file / --auth-jwt-secret-file at a "
        "file (mode 0600). See docs/auth.md.")
    add_arguments(serve)
    serve.set_defaults(func=_serve)

    check = sub.add_parser(
        "check", help="check the AWS permissions the configuration needs, one line per check (docs/iam.md)",
        description="Run the start-up permission check of `novagate serve` with the same settings (environment or "
        "flags) and print one line per check. Exit 0: every check passed; 2: a permission is missing or the "
        "configuration is wrong; 1: a check could not finish (service unreachable, throttled).")
    add_arguments(check)
    check.set_defaults(func=_check)

    client = sub.add_parser("client", help="talk to a gateway: a WAV file or a text turn")
    client.add_argument("--url", default="ws://127.0.0.1:8000/v1/voice")
    src = client.add_mutually_exclusive_group()
    src.add_argument("--wav", help="16-bit mono WAV to stream in real time (8/16/24/48 kHz)")
    src.add_argument("--text", help="send a typed turn instead of audio")
    client.add_argument("--out", help="write the assistant's audio to this WAV")
    client.add_argument("--state", help="state file: resume token and unsaved receipts (resumes when present)")
    client.add_argument("--new", action="store_true", help="start a new conversation even if --state has a token")
    client.add_argument("--token", help="bearer token (JWT) for an authenticated user")
    client.add_argument("--voice")
    client.add_argument("--output-rate", type=int, default=None, choices=messages.CLIENT_OUTPUT_RATES,
                        help="default: 24000 (mu-law: 8000)")
    client.add_argument("--codec", default="pcm16", choices=messages.CODECS,
                        help="audio both ways: pcm16 (default), opus (raw 20 ms packets, 16 kHz up, 24 kHz down) or "
                        "mulaw (G.711, 8 kHz); the WAV is resampled as needed (docs/mobile.md)")
    client.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the reply")
    client.set_defaults(func=_client)

    revoke = sub.add_parser("revoke", help="log a conversation out everywhere (its resume tokens stop working)")
    revoke.add_argument("conversation_id")
    revoke.add_argument("--store", help="sqlite | agent-runtime (default: NOVAGATE_STORE)")
    revoke.add_argument("--sqlite-path", help="default: NOVAGATE_SQLITE_PATH")
    revoke.set_defaults(func=_revoke)

    from .tools import command as tools_cmd  # light: the sources load when it runs

    tools = sub.add_parser("tools", help="load the configured tools (MCP servers, Python) and list them, or run "
                           "one with --call (docs/tools.md)")
    tools_cmd.add_arguments(tools)
    tools.set_defaults(func=tools_cmd.main)

    from .loadtest import command as loadtest_cmd  # light: the load tool itself loads when it runs

    loadtest = sub.add_parser("loadtest", help="N scripted voice users against a gateway: latency, gaps, errors, "
                              "server CPU and memory (docs/loadtest.md)")
    loadtest_cmd.add_arguments(loadtest)
    loadtest.set_defaults(func=loadtest_cmd.main)

    emulate = sub.add_parser("emulate", help="run a wire-level stand-in for an AWS service on loopback")
    services = emulate.add_subparsers(dest="service", required=True)
    nova = services.add_parser("nova", help="Nova Sonic: HTTP/2 + TLS + AWS event stream, the local engine behind it")
    agent = services.add_parser("agent-runtime", help="Bedrock Agent Runtime sessions (REST-JSON), in memory")
    from .emulate import agent_runtime as agent_mod
    from .emulate import nova as nova_mod

    nova_mod.add_arguments(nova)
    nova.set_defaults(func=nova_mod.run)
    agent_mod.add_arguments(agent)
    agent.set_defaults(func=agent_mod.run)

    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
