"""The Docker deployment files: docker-compose.yml validates and wires the services together, and
the Dockerfiles copy files that exist, are not excluded by .dockerignore, and install what the
containers run. No image is built here (no Docker daemon in tests)."""

from __future__ import annotations

import fnmatch
import importlib
import importlib.util
import os
import re
import shlex
import shutil
import subprocess
try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILES = [ROOT / "docker" / "Dockerfile.api", ROOT / "docker" / "Dockerfile.worker"]
APP_SERVICES = ("api", "worker", "webhook-worker")


def _with_defaults(text: str) -> str:
    """Compose interpolation as it happens with no variables set: `${X:-d}` -> d, `${X}` -> ''."""
    return re.sub(r"\$\{[A-Za-z_][A-Za-z0-9_]*(?::?-([^}]*))?\}", lambda m: m.group(1) or "", text)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(_with_defaults(COMPOSE.read_text()))


@pytest.fixture(scope="module")
def pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_docker_compose_config_validates() -> None:
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.skip("docker-compose is not installed (Debian: apt-get install -y docker-compose); "
                    "the YAML checks below still run")
    env = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/tmp")}
    run = subprocess.run([binary, "-f", str(COMPOSE), "config", "-q"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr


def test_services_redis_persistence_and_gpu_reservation(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {"redis", "api", "worker", "webhook-worker", "rq-dashboard"} <= set(services)

    redis = services["redis"]
    command = redis["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    assert any(v.split(":")[1] == "/data" and v.split(":")[0] in compose["volumes"] for v in redis["volumes"])
    assert redis["healthcheck"]["test"][-1] == "ping"

    devices = services["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert any("gpu" in d["capabilities"] and d.get("driver") == "nvidia" for d in devices)
    assert "deploy" not in services["api"] and "deploy" not in services["webhook-worker"]

    assert "dashboard" in services["rq-dashboard"]["profiles"]
    assert any(str(p).endswith("8000") for p in services["api"]["ports"])


def test_app_services_share_redis_models_and_outputs(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name in APP_SERVICES:
        env = services[name]["environment"]
        assert env["TD_REDIS_URL"].startswith("redis://redis:6379"), name
        assert services[name]["depends_on"]["redis"]["condition"] == "service_healthy", name
    mounts = {name: {v.split(":")[1]: v.split(":")[0] for v in services[name]["volumes"]} for name in ("api", "worker")}
    assert mounts["api"] == mounts["worker"]
    assert {"/models", "/data"} <= set(mounts["api"])
    for source in mounts["api"].values():
        assert source in compose["volumes"]
    env = services["api"]["environment"]
    assert env["TD_MODELS_DIR"] == "/models" and env["TD_STORAGE_DIR"].startswith("/data/")


def test_service_commands(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert services["worker"]["command"][:3] == ["turbodiffusion", "worker", "--model"]
    assert services["webhook-worker"]["command"] == ["turbodiffusion", "webhook-worker"]
    api = services["api"]["command"]
    assert api[:2] == ["uvicorn", "server.app:create_app"] and "--factory" in api
    for name in APP_SERVICES:
        assert (ROOT / services[name]["build"]["context"] / services[name]["build"]["dockerfile"]).is_file()


def test_compose_environment_is_accepted_by_the_settings(compose: dict[str, Any], monkeypatch) -> None:
    from server.settings import Settings

    for key in [k for k in os.environ if k.startswith("TD_")]:
        monkeypatch.delenv(key)
    for key, value in compose["services"]["api"]["environment"].items():
        monkeypatch.setenv(key, "" if value is None else str(value))
    settings = Settings()
    assert settings.redis_url == "redis://redis:6379/0"
    assert settings.allow_private_webhooks is False and settings.api_keys == []
    assert str(settings.models_dir) == "/models"


def test_entry_points_the_containers_run(compose: dict[str, Any], pyproject: dict[str, Any]) -> None:
    assert pyproject["project"]["scripts"]["turbodiffusion"] == "turbodiffusion.cli:main"
    assert callable(importlib.import_module("server.app").create_app)
    from turbodiffusion.cli import build_parser

    parser = build_parser()
    parser.parse_args(compose["services"]["webhook-worker"]["command"][1:])
    if importlib.util.find_spec("worker.main") is None:
        pytest.skip("worker/main.py (the `worker` subcommand) is not written yet")
    parser.parse_args(compose["services"]["worker"]["command"][1:])


# ------------------------------------------------------------------------------------------------
# Dockerfiles
# ------------------------------------------------------------------------------------------------
def _instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    pairs = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            pairs.append((word.upper(), rest.strip()))
    return pairs


def _copy_sources(dockerfile: Path) -> list[str]:
    sources = []
    for word, rest in _instructions(dockerfile):
        if word in ("COPY", "ADD"):
            parts = [p for p in shlex.split(rest) if not p.startswith("--")]
            sources += parts[:-1]
    return sources


def _dockerignored(path: str, patterns: list[str]) -> bool:
    """Whether .dockerignore excludes `path` (or a folder above it); the last matching pattern wins."""
    parts = path.strip("/").split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    excluded = False
    for raw in patterns:
        negate = raw.startswith("!")
        pattern = raw.lstrip("!").strip("/")
        if pattern.startswith("**/"):
            tail = pattern[3:]
            hit = any(fnmatch.fnmatchcase(p.rsplit("/", 1)[-1], tail) for p in prefixes)
        else:
            hit = any(fnmatch.fnmatchcase(p, pattern) for p in prefixes)
        if hit:
            excluded = not negate
    return excluded


def _dockerignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


def test_dockerignore_matcher_behaves_like_docker() -> None:
    patterns = ["tests", "**/__pycache__", "models", "!models/keep"]
    assert _dockerignored("tests/test_x.py", patterns)
    assert _dockerignored("server/routes/__pycache__/a.pyc", patterns)
    assert not _dockerignored("server/models.py", patterns)
    assert not _dockerignored("models/keep", patterns)


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_copies_existing_files_the_build_needs(dockerfile: Path, pyproject: dict[str, Any]) -> None:
    sources = _copy_sources(dockerfile)
    patterns = _dockerignore_patterns()
    for source in sources:
        assert (ROOT / source).exists(), f"{dockerfile.name} copies {source}, which is not in the repository"
        assert not _dockerignored(source, patterns), f"{dockerfile.name} copies {source}, but .dockerignore excludes it"
    # `pip install .` needs the readme pyproject names and every package it installs.
    assert pyproject["project"]["readme"] in sources
    assert "pyproject.toml" in sources
    for package in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]:
        assert package.rstrip("*") in sources, f"{dockerfile.name} does not copy package {package}"


def test_dockerfiles_use_the_right_bases_and_installs(pyproject: dict[str, Any]) -> None:
    api, worker = (dict(_instructions(p)) for p in DOCKERFILES)
    worker_runs = " ".join(rest for word, rest in _instructions(DOCKERFILES[1]) if word == "RUN")
    assert api["FROM"] == "python:${PYTHON_VERSION}-slim" and _arg_default(DOCKERFILES[0], "PYTHON_VERSION")
    assert _arg_default(DOCKERFILES[0], "TORCH_INDEX_URL").endswith("/whl/cpu")
    base = _arg_default(DOCKERFILES[1], "BASE_IMAGE")
    assert worker["FROM"] == "${BASE_IMAGE}" and "cuda" in base and "runtime" in base
    assert 'pip install ".[gpu]"' in worker_runs and "gpu" in pyproject["project"]["optional-dependencies"]
    assert "server.app:create_app" in api["CMD"] and "--factory" in api["CMD"]
    assert '"turbodiffusion", "worker"' in worker["CMD"]


def _arg_default(dockerfile: Path, name: str) -> str:
    for word, rest in _instructions(dockerfile):
        if word == "ARG" and rest.startswith(name + "="):
            return rest.split("=", 1)[1]
    raise AssertionError(f"{dockerfile.name} has no ARG {name}=<default>")


def test_gpu_runbook_parses_and_handles_every_documented_step() -> None:
    """bench/gpu_runs.sh is what a GPU session runs: bash accepts it, every step its header lists has a
    branch, and without a step it prints its usage and exits 2 (before installing anything)."""
    script = ROOT / "bench" / "gpu_runs.sh"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    text = script.read_text()
    header = text.split("set -uo pipefail")[0]
    documented = set(re.findall(r"^#   (\w+)  ", header, flags=re.M))
    handled = set(re.findall(r"^  (\w+)\)$", text, flags=re.M))
    assert documented and documented == handled, (documented, handled)
    usage = subprocess.run(["bash", str(script)], capture_output=True, text=True)
    assert usage.returncode == 2 and "kernels" in usage.stdout and "mp4" in usage.stdout
    assert "pipefail" not in usage.stdout and usage.stdout.rstrip().endswith('"Benchmarks").')  # the header only
