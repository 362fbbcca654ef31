"""The deployment files: compose.yaml, Dockerfile, .dockerignore, .env.example, the dev container
(.devcontainer/) and flake.nix. Static checks, no Docker engine: every command they run is one
that instaqueue's CLI accepts, no secret is written in them, and the production settings are
there (Redis append-only without eviction, scalable workers, one image, health checks).

.ci/run also validates compose.yaml and .devcontainer/compose.dev.yaml against the Compose
specification's schema and parses flake.nix with nix-instantiate.

compose.yaml is parsed with PyYAML, which the ``test`` extra must list.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
from pathlib import Path
from typing import Any, Iterator

import pytest

import instaqueue

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "compose.yaml"
DEV_COMPOSE = ROOT / ".devcontainer" / "compose.dev.yaml"
DEVCONTAINER = ROOT / ".devcontainer" / "devcontainer.json"

#: The services that run instaqueue from the one image, and what each runs.
APP_COMMANDS = {"initdb": "initdb", "worker": "worker", "beat": "beat", "flower": "flower"}
#: instaqueue commands a deployment may run. ``health`` and ``status`` are the operations
#: commands: the worker's health check runs ``health``.
DEPLOY_COMMANDS = {"worker", "beat", "flower", "run", "initdb", "health", "status"}
#: A value that is nothing but a variable substitution: ${VAR}, ${VAR:?message}, ${VAR:-default},
#: or the dev container's ${containerEnv:VAR} / ${localEnv:VAR}.
SUBSTITUTION = re.compile(r"\$\{(?:(?:containerEnv|localEnv):)?[A-Za-z_][A-Za-z0-9_]*(?::?[?-][^}]*)?\}")
#: Names whose values are secrets.
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|BASIC_AUTH|API_KEY|PRIVATE_KEY", re.I)


def _load_yaml(path: Path) -> Any:
    try:
        import yaml
    except ImportError:
        pytest.fail("PyYAML is missing: tests/test_deploy.py parses compose.yaml with it; the test extra in "
                    "pyproject.toml must list pyyaml (for now: pip install pyyaml)", pytrace=False)
    return yaml.safe_load(path.read_text())


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return _load_yaml(COMPOSE)


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


@pytest.fixture(scope="module")
def dev_compose() -> dict[str, Any]:
    return _load_yaml(DEV_COMPOSE)


@pytest.fixture(scope="module")
def devcontainer() -> dict[str, Any]:
    # Strict JSON (no comments), so that any JSON tool reads it.
    return json.loads(DEVCONTAINER.read_text())


# Helpers ####################################################################################

def _argv(command: str | list[str]) -> list[str]:
    return shlex.split(command) if isinstance(command, str) else [str(part) for part in command]


def _instaqueue_args(argv: list[str]) -> list[str] | None:
    """The arguments after ``python -m instaqueue`` (or the ``instaqueue`` script), else None."""
    if argv[:3] in (["python", "-m", "instaqueue"], ["python3", "-m", "instaqueue"]):
        return argv[3:]
    if argv[:1] == ["instaqueue"]:
        return argv[1:]
    return None


def _subcommands() -> set[str]:
    parser = instaqueue.build_parser()
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return set(actions[0].choices)


def _parse(args: list[str], where: str) -> str:
    """Parse ``args`` as instaqueue's CLI does (``main``); the command's name, or the test fails."""
    name = args[0] if args else ""
    if name not in _subcommands():
        if name == "health":
            pytest.fail(f"{where}: the `health` command is missing from instaqueue's CLI "
                        f"(compose.yaml's worker health check runs `python -m instaqueue health`)", pytrace=False)
        pytest.fail(f"{where}: `instaqueue {' '.join(args)}`: instaqueue has no command {name!r}", pytrace=False)
    try:
        parsed, extra = instaqueue.build_parser().parse_known_args(args)
    except SystemExit:
        pytest.fail(f"{where}: instaqueue's CLI rejects `instaqueue {' '.join(args)}`", pytrace=False)
    assert not extra or parsed.command in instaqueue._CELERY_COMMANDS, \
        f"{where}: `instaqueue {parsed.command}` takes no extra arguments {extra}"
    assert parsed.command in DEPLOY_COMMANDS, f"{where}: {parsed.command!r} is no command to deploy"
    return parsed.command


def _healthcheck_argv(service: dict[str, Any]) -> list[str]:
    test = service["healthcheck"]["test"]
    if isinstance(test, str):
        return shlex.split(test)
    if test[0] == "CMD-SHELL":
        return shlex.split(test[1])
    assert test[0] == "CMD", test
    return [str(part) for part in test[1:]]


def _strings(node: Any, path: str = "") -> Iterator[tuple[str, str]]:
    """Every (path, string) in a parsed YAML or JSON document, mapping keys included in the path."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _strings(value, f"{path}.{key}")
    elif isinstance(node, list):
        for index, value in enumerate(node):
            if isinstance(value, str) and "=" in value:  # environment: ["NAME=value"]
                name, _, rest = value.partition("=")
                yield f"{path}.{name}", rest
            else:
                yield from _strings(value, f"{path}[{index}]")
    elif isinstance(node, str):
        yield path, node


def _seconds(duration: str) -> float:
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|ms|us|m|s)", str(duration))
    assert parts and "".join(n + u for n, u in parts) == str(duration), f"not a Compose duration: {duration!r}"
    scale = {"h": 3600, "m": 60, "s": 1, "ms": 0.001, "us": 0.000001}
    return sum(float(n) * scale[u] for n, u in parts)


def _environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.partition("=")[::2] for item in env)
    return {k: str(v) for k, v in env.items()}


def _named_volumes(service: dict[str, Any]) -> list[str]:
    names = []
    for volume in service.get("volumes", []):
        source = volume["source"] if isinstance(volume, dict) else volume.split(":", 1)[0]
        if not source.startswith((".", "/", "~", "$")):
            names.append(source)
    return names


# Commands ###################################################################################

def test_every_command_in_compose_is_one_instaqueue_accepts(services):
    for name, service in services.items():
        args = _instaqueue_args(_argv(service["command"])) if "command" in service else None
        if name in APP_COMMANDS:
            assert args is not None, f"compose.yaml: {name} runs {service.get('command')!r}, not python -m instaqueue"
            assert _parse(args, f"compose.yaml services.{name}.command") == APP_COMMANDS[name]
        if "healthcheck" in service and (health := _instaqueue_args(_healthcheck_argv(service))) is not None:
            _parse(health, f"compose.yaml services.{name}.healthcheck")


def test_the_worker_health_check_runs_instaqueue_health(services):
    argv = _healthcheck_argv(services["worker"])
    assert argv == ["python", "-m", "instaqueue", "health"], argv
    assert _parse(argv[3:], "compose.yaml services.worker.healthcheck") == "health"


def test_the_operations_commands_parse():
    assert _parse(["health"], "instaqueue health") == "health"
    assert _parse(["status"], "instaqueue status") == "status"
    assert _parse(["status", "--json"], "instaqueue status --json") == "status"


def test_the_images_default_command_is_the_worker():
    dockerfile = (ROOT / "Dockerfile").read_text()
    cmd = [line for line in dockerfile.splitlines() if line.startswith("CMD ")]
    assert len(cmd) == 1, "the Dockerfile has one CMD"
    argv = json.loads(cmd[0].removeprefix("CMD "))  # the exec form: a JSON array, so SIGTERM reaches Python
    assert argv == ["python", "-m", "instaqueue", "worker"]
    assert _parse(argv[3:], "Dockerfile CMD") == "worker"


def test_every_instaqueue_command_named_in_the_deployment_files_exists():
    known = _subcommands()
    files = [COMPOSE, DEV_COMPOSE, DEVCONTAINER, ROOT / "Dockerfile", ROOT / ".env.example", ROOT / "flake.nix"]
    for path in files:
        for name in re.findall(r"-m instaqueue ([a-z][a-z-]*)", path.read_text()):
            assert name in known, f"{path.name} mentions `instaqueue {name}`, which instaqueue does not have"


# compose.yaml ###############################################################################

def test_redis_keeps_every_message(services):
    redis = services["redis"]
    assert str(redis["image"]).split(":")[0] == "redis" and str(redis["image"]).split(":")[1].startswith("7")
    argv = _argv(redis["command"])
    pairs = {argv[i]: argv[i + 1] for i in range(len(argv) - 1) if argv[i].startswith("--")}
    assert pairs.get("--appendonly") == "yes", "redis needs --appendonly yes"
    assert pairs.get("--maxmemory-policy") == "noeviction", "redis needs --maxmemory-policy noeviction"
    assert _named_volumes(redis), "redis keeps its data in a named volume"
    check = _healthcheck_argv(redis)
    assert "redis-cli" in check and "ping" in check


def test_postgres_has_a_volume_a_health_check_and_no_literal_password(services):
    postgres = services["postgres"]
    assert str(postgres["image"]).startswith("postgres:16")
    assert _named_volumes(postgres), "postgres keeps its data in a named volume"
    assert "pg_isready" in _healthcheck_argv(postgres)
    assert SUBSTITUTION.fullmatch(_environment(postgres)["POSTGRES_PASSWORD"])


def test_named_volumes_are_declared(compose, services):
    declared = set(compose.get("volumes") or {})
    for name, service in services.items():
        for volume in _named_volumes(service):
            assert volume in declared, f"services.{name} uses volume {volume!r}, not declared under volumes:"


def test_app_services_share_one_image_wait_for_healthy_stores_and_use_the_service_urls(services):
    images = {services[name]["image"] for name in APP_COMMANDS}
    assert len(images) == 1, f"worker, beat, flower and initdb use one image, not {images}"
    for name in APP_COMMANDS:
        service = services[name]
        build = service["build"]
        assert (build if isinstance(build, str) else build.get("context", ".")) in (".", "./")
        depends = service["depends_on"]
        for store in ("redis", "postgres"):
            assert depends[store]["condition"] == "service_healthy", f"{name} waits for a healthy {store}"
        env_files = service["env_file"]
        assert ".env" in ([env_files] if isinstance(env_files, str) else
                          [f if isinstance(f, str) else f["path"] for f in env_files])
        env = _environment(service)
        assert env["INSTAQUEUE_REDIS_URL"] == "redis://redis:6379/0"
        url = re.fullmatch(r"postgresql\+psycopg://instaqueue:(?P<password>.+)@postgres:5432/instaqueue",
                           env["INSTAQUEUE_DATABASE_URL"])
        assert url and SUBSTITUTION.fullmatch(url["password"]) and "POSTGRES_PASSWORD" in url["password"]
    for name in ("worker", "beat", "flower"):  # the tables exist before they start
        assert services[name]["depends_on"]["initdb"]["condition"] == "service_completed_successfully"


def test_the_worker_scales_and_stops_gracefully(services):
    worker = services["worker"]
    assert "container_name" not in worker and "ports" not in worker, \
        "docker compose up --scale worker=3 needs a worker without container_name and ports"
    assert worker["stop_signal"] == "SIGTERM"
    grace = instaqueue.Settings.model_fields["shutdown_grace"].default
    assert _seconds(worker["stop_grace_period"]) > grace, \
        f"stop_grace_period must outlast INSTAQUEUE_SHUTDOWN_GRACE ({grace:g} s) so that the cold shutdown requeues"


def test_one_beat(services):
    beat = services["beat"]
    assert (beat.get("deploy") or {}).get("replicas", 1) == 1 and beat.get("scale", 1) == 1


def test_flower_publishes_5555_and_takes_its_credentials_from_the_environment(services):
    flower = services["flower"]
    ports = [str(p["target"]) if isinstance(p, dict) else str(p).rsplit(":", 1)[-1] for p in flower["ports"]]
    assert ports == ["5555"]
    auth = _environment(flower)["INSTAQUEUE_FLOWER_BASIC_AUTH"]
    assert re.fullmatch(r"\$\{INSTAQUEUE_FLOWER_BASIC_AUTH:\?[^}]+\}", auth), "Flower's credentials are required"
    published = [name for name, service in services.items() if service.get("ports")]
    assert published == ["flower"], f"only Flower publishes a port, not {published}"


@pytest.mark.parametrize("path", [COMPOSE, DEV_COMPOSE], ids=lambda p: p.name)
def test_no_secret_is_written_in_a_compose_file(path):
    document = _load_yaml(path)
    for where, value in _strings(document):
        last = where.rsplit(".", 1)[-1]
        if SECRET_NAME.search(last):
            assert SUBSTITUTION.fullmatch(value), f"{path.name} {where}: a secret must come from .env, not {value!r}"
        if url := re.fullmatch(r"[a-z][a-z0-9+.-]*://(?P<userinfo>.*)@(?P<rest>[^@]*)", value):
            user, _, password = url["userinfo"].partition(":")
            assert not password or SUBSTITUTION.fullmatch(password), f"{path.name} {where}: password written in the URL"
    for line in path.read_text().splitlines():
        if m := re.match(r"\s*[\w-]*password\s*:\s*(\S.*)$", line, re.I):
            assert SUBSTITUTION.fullmatch(m[1].strip().strip("\"'")), f"{path.name}: {line.strip()}"
    assert "change-me" not in path.read_text()


# .env.example ###############################################################################

def _env_example() -> dict[str, str]:
    pairs = {}
    for line in (ROOT / ".env.example").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, sep, value = line.partition("=")
            assert sep, f".env.example: not NAME=value: {line!r}"
            pairs[name.strip()] = value.strip()
    return pairs


def test_env_example_documents_every_variable_compose_needs():
    documented = _env_example()
    for path in (COMPOSE, DEV_COMPOSE):
        for name in re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)", path.read_text()):
            assert name in documented, f"{path.name} uses ${{{name}}}; .env.example must document it"


def test_env_example_holds_placeholders_only():
    for name, value in _env_example().items():
        if SECRET_NAME.search(name):
            assert "change-me" in value, f".env.example {name}: a placeholder, not a secret"
        # env_file hands every variable to Flower's container, and Flower takes each FLOWER_* as an option.
        assert not name.startswith("FLOWER_"), f".env.example {name}: Flower would read it as an option"


def test_the_env_file_stays_out_of_git_and_the_image():
    assert ".env" in (ROOT / ".gitignore").read_text().split()
    ignore = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    assert ignore[0] == "*" and all(line.startswith("!") for line in ignore[1:]), ".dockerignore allows, never adds"
    assert not any(".env" in line for line in ignore[1:])
    assert {"!pyproject.toml", "!instaqueue.py", "!README.md"} <= set(ignore), "pip install . needs these"


# Dockerfile #################################################################################

def test_dockerfile_builds_the_project_on_python_311_slim_as_a_non_root_user():
    lines = [line.strip() for line in (ROOT / "Dockerfile").read_text().splitlines()]
    assert [line for line in lines if line.startswith("FROM ")] == ["FROM python:3.11-slim"]
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the image runs as a non-root user"
    assert any(re.search(r"pip install (--no-deps )?\.(\s|$)", line) for line in lines), "pip install ."


# Dev container ##############################################################################

#: devcontainer.json properties (the Dev Container specification) that a Compose-based config may use.
DEVCONTAINER_PROPERTIES = {
    "$schema", "name", "dockerComposeFile", "service", "runServices", "workspaceFolder", "shutdownAction",
    "overrideCommand", "remoteUser", "containerUser", "updateRemoteUserUID", "userEnvProbe", "forwardPorts",
    "portsAttributes", "otherPortsAttributes", "remoteEnv", "containerEnv", "initializeCommand", "onCreateCommand",
    "updateContentCommand", "postCreateCommand", "postStartCommand", "postAttachCommand", "waitFor",
    "customizations", "features", "overrideFeatureInstallOrder", "hostRequirements", "mounts", "init",
    "privileged", "capAdd", "securityOpt", "secrets",
}


def _is_command(value: Any) -> bool:
    if isinstance(value, str):
        return True
    if isinstance(value, list):
        return bool(value) and all(isinstance(v, str) for v in value)
    return isinstance(value, dict) and all(_is_command(v) and not isinstance(v, dict) for v in value.values())


def test_devcontainer_json_has_the_shape_of_the_specification(devcontainer):
    # The official devContainer.base.schema.json is in no package that CI can install (PyPI, npm,
    # Debian), so its main rules for a Compose-based config are checked here.
    unknown = set(devcontainer) - DEVCONTAINER_PROPERTIES
    assert not unknown, f"devcontainer.json: properties the specification does not have: {unknown}"
    files = devcontainer["dockerComposeFile"]
    assert isinstance(files, (str, list)) and isinstance(devcontainer["service"], str)
    assert isinstance(devcontainer["workspaceFolder"], str) and devcontainer["workspaceFolder"].startswith("/")
    assert devcontainer.get("shutdownAction", "none") in ("none", "stopCompose")
    for port in devcontainer.get("forwardPorts", []):
        assert (isinstance(port, int) and 0 < port < 65536) or re.fullmatch(r"[a-z0-9-]+:\d{1,5}", str(port))
    for key in ("remoteEnv", "containerEnv"):
        assert all(isinstance(v, str) or (key == "remoteEnv" and v is None)
                   for v in devcontainer.get(key, {}).values()), key
    for hook in ("initializeCommand", "onCreateCommand", "updateContentCommand", "postCreateCommand",
                 "postStartCommand", "postAttachCommand"):
        if hook in devcontainer:
            assert _is_command(devcontainer[hook]), f"devcontainer.json {hook}: a string, an array or an object of them"
    assert isinstance(devcontainer.get("runServices", []), list)
    assert isinstance(devcontainer.get("customizations", {}), dict)


def test_devcontainer_runs_on_the_compose_services(devcontainer, services, dev_compose):
    files = devcontainer["dockerComposeFile"]
    files = [files] if isinstance(files, str) else files
    assert files[0] == "../compose.yaml", "the dev container starts from compose.yaml"
    for name in files:
        assert (DEVCONTAINER.parent / name).resolve().is_file(), f"dockerComposeFile {name} does not exist"
    merged = {**services, **dev_compose["services"]}
    assert devcontainer["service"] in merged
    assert set(devcontainer.get("runServices", merged)) <= set(merged)
    assert {"redis", "postgres", devcontainer["service"]} <= set(devcontainer.get("runServices", merged))
    dev = merged[devcontainer["service"]]
    assert dev["image"] == services["worker"]["image"] and dev["build"] in (".", "./"), "the dev service uses the same image"
    assert _argv(dev["command"]) == ["sleep", "infinity"]
    # Paths in the second compose file are relative to the first one's folder: the repository.
    mounts = [v.split(":")[:2] for v in dev["volumes"] if isinstance(v, str)]
    assert [".", devcontainer["workspaceFolder"]] in mounts, "the repository is mounted at workspaceFolder"
    assert 5555 in devcontainer["forwardPorts"]


def test_devcontainer_installs_the_test_extras_and_points_the_tests_at_the_compose_services(devcontainer):
    hook = devcontainer["postCreateCommand"]
    commands = [hook] if isinstance(hook, (str, list)) else list(hook.values())
    texts = [c if isinstance(c, str) else " ".join(c) for c in commands]
    assert any("pip install" in t and "-e '.[test]'" in t for t in texts), "postCreateCommand: pip install -e '.[test]'"
    env = {**devcontainer.get("containerEnv", {}), **devcontainer.get("remoteEnv", {})}
    redis = re.fullmatch(r"redis://redis:6379/(\d+)", env["INSTAQUEUE_TEST_REDIS_URL"])
    assert redis and redis[1] != "0", "the tests flush their Redis database: not the app's database 0"
    database = re.fullmatch(r"postgresql\+psycopg://instaqueue:(?P<password>[^@]+)@postgres:5432/(?P<db>\w+)",
                            env["INSTAQUEUE_TEST_DATABASE_URL"])
    assert database, env["INSTAQUEUE_TEST_DATABASE_URL"]
    assert database["db"] != "instaqueue", "the tests truncate their database's tables: not the app's database"
    assert SUBSTITUTION.fullmatch(database["password"]), "the password comes from the container's environment"
    for where, value in _strings(devcontainer):
        if SECRET_NAME.search(where.rsplit(".", 1)[-1]):
            assert SUBSTITUTION.fullmatch(value), f"devcontainer.json {where}"


# flake.nix ##################################################################################

def test_flake_has_the_dev_shell_and_the_worker_and_beat_apps():
    flake = (ROOT / "flake.nix").read_text()
    for needed in ('"x86_64-linux"', '"aarch64-linux"', "devShells", "default = pkgs.mkShell", "python311",
                   "pkgs.redis", "pkgs.postgresql", "shellHook", "-m venv .venv", "pip install --quiet -e '.[test]'",
                   'worker = app "worker"', 'beat = app "beat"', "writeShellApplication",
                   'exec .venv/bin/python -m instaqueue ${command} "$@"'):
        assert needed in flake, f"flake.nix lacks {needed}"
