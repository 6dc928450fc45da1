"""docker/: the image and the compose cluster agree with the code, checked without an engine.

No Docker engine runs on the project's machines, so nothing here builds or starts a container.
What can be checked is checked: compose.yaml parses (PyYAML, with `${VAR:-default}` resolved
the way compose does), its published ports bind to loopback unless configured, the `ray start`
and `mlflow server` flags it uses are ones those commands accept (their own --help), MLflow
answers the Host the Ray nodes use, the dist-trainer commands its comments and docker/README.md
show compose and pass the config checks, the Dockerfile EXPOSEs what compose uses and installs
torch the way the Makefile does. `docker compose config` runs where the compose plugin exists.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from dist_trainer import cli
from dist_trainer.config import ScalingConfig, TrackingConfig, load_config, resolve_config
from dist_trainer.ray_cluster import file_store_conflict
from dist_trainer.tracking import normalize_tracking_uri

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
COMPOSE = DOCKER / "compose.yaml"
DOCKERFILE = DOCKER / "Dockerfile"
README = DOCKER / "README.md"
MAKEFILE = ROOT / "Makefile"

RAY_NODES = ("ray-head", "ray-worker", "ray-worker-gpu")
LOOPBACK = "127.0.0.1"

# ---------------------------------------------------------------------------------------------
# compose's interpolation: ${VAR}, ${VAR:-default} (unset or empty), ${VAR-default} (unset), $$.

_VARIABLE = re.compile(r"\$\$|\$\{(?P<name>[A-Za-z_]\w*)(?:(?P<op>:?-)(?P<default>[^}]*))?\}")


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """`value` with compose's variables resolved from `env` (defaults when unset)."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def one(match: re.Match) -> str:
        if match.group(0) == "$$":
            return "$"
        name, op, default = match.group("name", "op", "default")
        given = env.get(name)
        if op == ":-" and not given or op == "-" and given is None:
            return default
        assert given is not None, f"${{{name}}} has no default in {COMPOSE.name}"
        return given

    return _VARIABLE.sub(one, value)


def load_compose(env: dict[str, str] | None = None) -> dict[str, Any]:
    """compose.yaml as compose sees it (YAML merge keys applied) with `env` (default: none set)."""
    return interpolate(yaml.safe_load(COMPOSE.read_text()), env or {})


def argv(service: dict[str, Any]) -> list[str]:
    """What a service runs: its entrypoint and command (both in list form here)."""
    entrypoint, command = service.get("entrypoint", []), service.get("command", [])
    assert isinstance(entrypoint, list) and isinstance(command, list), "use the list forms"
    return [str(a) for a in (*entrypoint, *command)]


def published(port: str | dict[str, Any]) -> tuple[str | None, str, str]:
    """(host ip or None when it binds every interface, host port, container port)."""
    if isinstance(port, dict):  # long syntax
        return port.get("host_ip"), str(port.get("published", "")), str(port["target"])
    spec = str(port).split("/", 1)[0]
    if spec.startswith("["):  # [::1]:5000:5000
        host_ip, _, rest = spec[1:].partition("]:")
        host_port, container = rest.split(":")
        return host_ip, host_port, container
    parts = spec.split(":")
    if len(parts) == 3:
        return parts[0], parts[1], parts[2]
    if len(parts) == 2:
        return None, parts[0], parts[1]
    return None, "", parts[0]


def option(args: list[str], name: str) -> str:
    """The value of `--name value` or `--name=value` in args."""
    for i, arg in enumerate(args):
        if arg == name:
            return args[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    raise AssertionError(f"{name} not in {args}")


def flags(args: list[str]) -> set[str]:
    return {a.split("=", 1)[0] for a in args if a.startswith("-")}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_compose()


@pytest.fixture(scope="module")
def services(compose) -> dict[str, dict[str, Any]]:
    return compose["services"]


# ---------------------------------------------------------------------------------------------
# What the real CLIs accept, read once: `ray start --help`, and `mlflow server --help` plus
# MLflow's own Host check, in one Python process (importing MLflow costs seconds), in parallel.

_MLFLOW_PROBE = """
import json, sys
from click.testing import CliRunner
from mlflow.cli import cli
from mlflow.server.security_utils import is_allowed_host_header
allowed, hosts = sys.argv[1].split(","), json.loads(sys.argv[2])
result = CliRunner().invoke(cli, ["server", "--help"], prog_name="mlflow")
print(json.dumps({
    "code": result.exit_code,
    "help": result.output,
    "allowed": {h: is_allowed_host_header(allowed, h) for h in hosts},
}))
"""
# Host headers: the Ray nodes' URI, the host's browser through the published port, and one that
# must be refused (the allow-list is a list, not '*').
_FOREIGN_HOST = "attacker.example:5000"


def help_options(text: str) -> set[str]:
    """The long options of a click --help text (option lines are indented by two spaces)."""
    found: set[str] = set()
    for line in text.splitlines():
        match = re.match(r"^  (-\S.*?)(?:\s{2,}|$)", line)
        if match:
            found.update(re.findall(r"--[A-Za-z0-9][\w-]*", match.group(1)))
    return found


def _tool(name: str) -> str:
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed (it comes with the project's dependencies)")
    return found


@pytest.fixture(scope="module")
def real_clis(services) -> dict[str, Any]:
    mlflow = services["mlflow"]
    allowed = option(argv(mlflow), "--allowed-hosts")
    host_port = published(mlflow["ports"][0])[1]
    hosts = [
        tracking_host(services),
        f"{LOOPBACK}:{host_port}",
        f"localhost:{host_port}",
        _FOREIGN_HOST,
    ]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    ray = subprocess.Popen(
        [_tool("ray"), "start", "--help"], stdout=subprocess.PIPE, text=True, env=env
    )
    probe = subprocess.Popen(
        [sys.executable, "-c", _MLFLOW_PROBE, allowed, json.dumps(hosts)],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    ray_out, _ = ray.communicate(timeout=120)
    probe_out, _ = probe.communicate(timeout=120)
    assert ray.returncode == 0 and probe.returncode == 0
    result = json.loads(probe_out.strip().splitlines()[-1])
    assert result["code"] == 0, result["help"]
    return {
        "ray_start": help_options(ray_out),
        "mlflow_server": help_options(result["help"]),
        "allowed": result["allowed"],
    }


def tracking_host(services) -> str:
    """host:port of MLFLOW_TRACKING_URI on the Ray nodes (they all get the same)."""
    uris = {services[n]["environment"]["MLFLOW_TRACKING_URI"] for n in RAY_NODES}
    assert len(uris) == 1, uris
    uri = uris.pop()
    assert uri.startswith("http://"), uri
    return uri[len("http://") :].rstrip("/")


# ---------------------------------------------------------------------------------------------
# Services, ports, volumes


def test_the_cluster_services_exist(services):
    assert {"postgres", "mlflow", "ray-head", "ray-worker", "ray-worker-gpu"} <= set(services)
    assert services["postgres"]["image"].split(":")[0] == "postgres"  # the official image
    images = {services[n]["image"] for n in ("mlflow", *RAY_NODES)}
    builds = [services[n]["build"] for n in ("mlflow", *RAY_NODES)]
    assert len(images) == 1 and all(b == builds[0] for b in builds), "one image, one build"
    assert (COMPOSE.parent / builds[0]["context"]).resolve() == ROOT
    assert (ROOT / builds[0]["dockerfile"]).resolve() == DOCKERFILE


def test_gpus_are_reserved_only_under_the_gpu_profile(services):
    """A plain `up` must work on a host without NVIDIA's runtime."""
    for name, service in services.items():
        devices = (
            service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices")
        )
        if devices:
            assert service.get("profiles") == ["gpu"], name
            assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert services["ray-worker-gpu"]["profiles"] == ["gpu"]
    assert "profiles" not in services["ray-worker"]


def test_published_ports_bind_to_loopback_by_default(services):
    seen = 0
    for name, service in services.items():
        for port in service.get("ports", []):
            host_ip, host_port, _ = published(port)
            assert host_ip == LOOPBACK, f"{name}: {port!r} binds {host_ip or 'every interface'}"
            assert host_port, f"{name}: {port!r} publishes a random port"
            seen += 1
    assert seen >= 2  # MLflow and the Ray dashboard
    assert "ports" not in services["postgres"]  # only MLflow talks to it


def test_binding_and_host_ports_are_configurable():
    env = {"DT_BIND": "0.0.0.0", "MLFLOW_PORT": "5001", "RAY_DASHBOARD_PORT": "8266"}
    services = load_compose(env)["services"]
    assert published(services["mlflow"]["ports"][0]) == ("0.0.0.0", "5001", "5000")
    assert published(services["ray-head"]["ports"][0]) == ("0.0.0.0", "8266", "8265")


@pytest.mark.parametrize(
    ("port", "expected"),
    [
        ("127.0.0.1:5000:5000", ("127.0.0.1", "5000", "5000")),
        ("0.0.0.0:5000:5000", ("0.0.0.0", "5000", "5000")),
        ("5000:5000", (None, "5000", "5000")),
        ("5000", (None, "", "5000")),
        ("[::1]:5000:5000/tcp", ("::1", "5000", "5000")),
        ({"target": 5000, "published": 5000}, (None, "5000", "5000")),
    ],
)
def test_port_parser_sees_what_a_port_binds(port, expected):
    """The loopback check above fails on anything but 127.0.0.1, e.g. 0.0.0.0 or no address."""
    assert published(port) == expected


def test_unset_variables_without_default_are_refused():
    with pytest.raises(AssertionError, match="no default"):
        interpolate("${NOT_SET_ANYWHERE}", {})
    assert interpolate("a$${B}", {}) == "a${B}"
    assert interpolate("${X:-d}", {"X": ""}) == "d" and interpolate("${X-d}", {"X": ""}) == ""


def test_volumes_persist_and_checkpoints_are_shared_storage(compose, services):
    declared = set(compose["volumes"])
    for service in services.values():
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            assert source in declared, f"{volume}: a named volume, declared at the top"
    assert any(v.endswith(":/var/lib/postgresql/data") for v in services["postgres"]["volumes"])
    # Ray Train on several nodes needs storage every node reaches: the default storage_path,
    # relative to the image's working directory, is one volume mounted on every Ray node.
    workdir = re.findall(r"^WORKDIR\s+(\S+)", DOCKERFILE.read_text(), re.M)[-1]
    storage = f"{workdir}/{ScalingConfig().storage_path}"
    for name in RAY_NODES:
        assert f"ray-storage:{storage}" in services[name]["volumes"], name
        assert services[name].get("shm_size"), f"{name}: Ray's object store lives in /dev/shm"


# ---------------------------------------------------------------------------------------------
# Commands: ray start, mlflow server, postgres


def test_ray_commands_use_flags_ray_start_accepts(services, real_clis):
    accepted = real_clis["ray_start"]
    assert {"--head", "--address", "--block"} <= accepted  # the help was really parsed
    for name in RAY_NODES:
        args = argv(services[name])
        assert args[:2] == ["ray", "start"], name
        unknown = flags(args[2:]) - accepted
        assert not unknown, f"{name}: ray start does not accept {sorted(unknown)}"
        assert "--block" in args, f"{name}: without --block the container exits"


def test_ray_workers_join_the_head(services):
    head = argv(services["ray-head"])
    assert "--head" in head
    # The published dashboard (and Jobs API) must listen on the container's interface.
    assert option(head, "--dashboard-host") == "0.0.0.0"
    gcs_port = option(head, "--port")
    dashboard_port = option(head, "--dashboard-port")
    assert published(services["ray-head"]["ports"][0])[2] == dashboard_port
    for name in ("ray-worker", "ray-worker-gpu"):
        assert option(argv(services[name]), "--address") == f"ray-head:{gcs_port}", name
        assert services[name]["depends_on"]["ray-head"]["condition"] == "service_healthy"
        assert "ports" not in services[name]  # replicas would fight over a host port
    assert str(services["ray-worker"]["deploy"]["replicas"]) == "1"
    replicas = load_compose({"RAY_WORKERS": "3"})["services"]["ray-worker"]["deploy"]["replicas"]
    assert str(replicas) == "3"
    assert services["ray-head"]["healthcheck"]["test"][1:] == ["ray", "status"]


def test_mlflow_command_uses_flags_mlflow_server_accepts(services, real_clis):
    accepted = real_clis["mlflow_server"]
    assert {"--backend-store-uri", "--host", "--port"} <= accepted  # the help was really parsed
    args = argv(services["mlflow"])
    assert args[:2] == ["mlflow", "server"]
    unknown = flags(args[2:]) - accepted
    assert not unknown, f"mlflow server does not accept {sorted(unknown)}"


def test_mlflow_serves_on_the_published_port_with_postgres_and_artifacts(services):
    mlflow, postgres = services["mlflow"], services["postgres"]
    args = argv(mlflow)
    assert option(args, "--host") == "0.0.0.0"  # else the published port reaches nothing
    port = option(args, "--port")
    assert published(mlflow["ports"][0])[2] == port
    assert f":{port}/health" in " ".join(mlflow["healthcheck"]["test"])
    env = postgres["environment"]
    user, password, db = env["POSTGRES_USER"], env["POSTGRES_PASSWORD"], env["POSTGRES_DB"]
    scheme, _, rest = option(args, "--backend-store-uri").partition("://")
    assert rest == f"{user}:{password}@postgres:5432/{db}"
    assert "--serve-artifacts" in args
    destination = option(args, "--artifacts-destination")
    assert any(v.endswith(f":{destination}") for v in mlflow["volumes"])
    assert mlflow["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert "pg_isready" in " ".join(postgres["healthcheck"]["test"])
    # The store URI names its driver (SQLAlchemy 2.1 changed a bare postgresql://'s default
    # from psycopg2 to psycopg), and the image installs that driver.
    drivers = {"postgresql+psycopg": '"psycopg[binary]', "postgresql+psycopg2": '"psycopg2-binary'}
    assert scheme in drivers, f"{scheme}://: name the driver"
    assert drivers[scheme] in DOCKERFILE.read_text()


def test_ray_nodes_track_to_the_mlflow_service_and_it_answers_them(services, real_clis):
    mlflow_port = option(argv(services["mlflow"]), "--port")
    assert tracking_host(services) == f"mlflow:{mlflow_port}"
    # MLflow >= 3.5 refuses API calls whose Host is not allowed (403; /health is exempt, so
    # dist-trainer's reachability check would pass and the first logged param would fail).
    allowed = real_clis["allowed"]
    assert allowed.pop(_FOREIGN_HOST) is False
    assert all(allowed.values()), allowed


# ---------------------------------------------------------------------------------------------
# The documented ways to submit a job agree with the CLI and the driver


def _documented_commands() -> list[list[str]]:
    """Every `dist-trainer <verb> ...` shown in docker/ (comments, README), as argv."""
    commands = []
    for path in (COMPOSE, DOCKERFILE, README):
        if not path.exists():
            continue
        text = re.sub(r"\\\n\s*#?\s*", " ", path.read_text())  # join continued lines
        for match in re.finditer(r"dist-trainer ([a-z][\w-]*)([^\n`]*)", text):
            rest = match.group(2).split("#", 1)[0]
            commands.append(["dist-trainer", match.group(1), *shlex.split(rest)])
    return commands


def _verbs() -> set[str]:
    usage = cli._USAGE.split("verbs:", 1)[1].split("\n\n", 1)[0]
    verbs = {
        line.split()[0] for line in usage.splitlines() if line.startswith("  ") and line[2:3] != " "
    }
    assert set(cli._VERBS) <= verbs
    return verbs


def test_documented_dist_trainer_commands_exist_and_compose(capsys):
    commands = _documented_commands()
    assert any(c[1] == "train" for c in commands), "docker/ shows no way to submit a job"
    verbs = _verbs()
    for command in commands:
        verb, rest = command[1], command[2:]
        assert verb in verbs, f"{' '.join(command)}: no verb {verb!r} in dist_trainer.cli"
        if verb == "report":
            from dist_trainer.study_report import main as report_main

            assert report_main(["--help"]) == 0
            accepted = set(re.findall(r"--[\w-]+", capsys.readouterr().out))
            assert flags(rest) <= accepted, f"{' '.join(command)}: not a report flag"
            continue
        # train / bench-comm: Hydra overrides (a sweep's first value), composed and checked.
        overrides = [
            o.split("=", 1)[0] + "=" + o.split("=", 1)[1].split(",")[0] for o in rest if "=" in o
        ]
        job = resolve_config(load_config(overrides))
        if "scaling.address=auto" not in rest:
            continue
        # Joining the compose cluster: its nodes are other machines to the driver, which refuses
        # a file store then; the documented tracking URI is the MLflow service.
        assert job.scaling.address == "auto"
        assert job.tracking.uri.startswith("http://mlflow:"), " ".join(command)
        nodes = ["172.18.0.4", "172.18.0.5"]
        assert file_store_conflict(job.tracking.uri, nodes, nodes[0]) is None
        assert file_store_conflict(normalize_tracking_uri(TrackingConfig().uri), nodes, nodes[0])


def test_documented_tracking_uri_is_the_ray_nodes_one(services):
    expected = f"tracking.uri=http://{tracking_host(services)}"
    shown = [c for c in _documented_commands() if "scaling.address=auto" in c]
    assert shown and all(expected in c for c in shown)


def test_entrypoint_is_the_console_script_with_a_real_verb():
    text = DOCKERFILE.read_text()
    scripts = re.search(r"\[project\.scripts\]\n(\S+)\s*=", (ROOT / "pyproject.toml").read_text())
    assert scripts and json.loads(re.search(r"^ENTRYPOINT (.+)$", text, re.M).group(1)) == [
        scripts.group(1)
    ]
    cmd = json.loads(re.search(r"^CMD (.+)$", text, re.M).group(1))
    assert cmd[0] in _verbs()


# ---------------------------------------------------------------------------------------------
# The Dockerfile


def _arg_default(text: str, name: str) -> str:
    match = re.search(rf"^ARG {name}=(\S+)$", text, re.M)
    assert match, f"ARG {name}=... not in the Dockerfile"
    return match.group(1).strip('"')


def test_exposed_ports_are_the_ports_compose_uses(services):
    exposed = set()
    for line in re.findall(r"^EXPOSE\s+(.+)$", DOCKERFILE.read_text(), re.M):
        exposed.update(p.split("/")[0] for p in line.split())
    used = {
        option(argv(services["mlflow"]), "--port"),
        option(argv(services["ray-head"]), "--port"),
        option(argv(services["ray-head"]), "--dashboard-port"),
    }
    containers = {
        published(p)[2] for n in ("mlflow", *RAY_NODES) for p in services[n].get("ports", [])
    }
    assert containers <= used
    assert exposed == used


def test_image_installs_torch_then_the_project_like_make_setup(services):
    text = DOCKERFILE.read_text()
    makefile = MAKEFILE.read_text()
    match = re.search(r"^TORCH_SPEC \?= \$\(if .*?,torch,(torch==[\w.]+)\)", makefile, re.M)
    assert match, "Makefile's TORCH_SPEC default changed shape"
    cpu_spec = match.group(1)
    assert _arg_default(text, "TORCH_SPEC") == cpu_spec
    assert _arg_default(text, "TORCH_INDEX_URL").endswith("/whl/cpu")
    # The default base is a CUDA PyTorch image with the same torch the Makefile pins.
    version = cpu_spec.split("==", 1)[1]
    base = _arg_default(text, "BASE")
    assert re.fullmatch(rf"pytorch/pytorch:{re.escape(version)}-cuda12\.\d+-cudnn\d+-runtime", base)
    assert re.search(r"^FROM \$\{BASE\}$", text, re.M)
    assert services["ray-head"]["build"]["args"]["BASE"] == base  # compose builds the same
    # torch first (a base without it gets the CPU pin), then the project, torch held.
    torch_step = text.index('"${TORCH_SPEC}"')
    project_step = text.index("pip install -c /tmp/torch-constraint.txt .")
    assert torch_step < project_step
    copies = " ".join(re.findall(r"^COPY (.+)$", text, re.M))
    for needed in ("pyproject.toml", "README.md", "dist_trainer", "conf"):
        assert needed in copies, f"the wheel needs {needed}"
    assert re.search(r"^USER (?!root)\w+", text, re.M), "runs as a non-root user"


# ---------------------------------------------------------------------------------------------
# compose's own parser, where the plugin exists (it needs no daemon)


def _compose_plugin() -> list[str] | None:
    docker = shutil.which("docker")
    if docker is None:
        return None
    probe = subprocess.run([docker, "compose", "version"], capture_output=True, text=True)
    return [docker, "compose"] if probe.returncode == 0 else None


def test_docker_compose_config_parses_it():
    command = _compose_plugin()
    if command is None:
        pytest.skip("no `docker compose` plugin here (docker compose config needs no daemon)")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DT_", "RAY_", "MLFLOW_"))}
    env = {k: v for k, v in env.items() if not k.startswith(("POSTGRES_", "COMPOSE_"))}
    result = subprocess.run(
        [*command, "-f", str(COMPOSE), "--profile", "gpu", "config", "--format", "json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    config = json.loads(result.stdout)
    assert set(config["services"]) == set(load_compose()["services"])
    for name, service in config["services"].items():
        for port in service.get("ports", []):
            assert port.get("host_ip") == LOOPBACK, f"{name}: {port}"
