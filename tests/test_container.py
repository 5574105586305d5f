"""What can be checked of the container setup without a container daemon: docker-compose.yml
against the compose schema and for what it must run, docker/haproxy.cfg with the compose
environment, and docker/Dockerfile's steps run in a clean venv up to its entrypoint serving."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
import tomllib
import urllib.request
from dataclasses import dataclass
from importlib.metadata import Distribution, PackageNotFoundError, distribution
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from server.local_cluster import HAPROXY_CONFIG, free_port, get_json
from server.settings import REPO_ROOT
from vita.tiny_checkpoint import TINY_CHECKPOINT_VERSION

COMPOSE = REPO_ROOT / "docker-compose.yml"
COMPOSE_TLS = REPO_ROOT / "docker" / "compose.tls.yml"
DOCKERFILE = REPO_ROOT / "docker" / "Dockerfile"


def compose_command() -> list[str] | None:
    """Docker's compose (v2 plugin, or v1 from Debian's docker-compose package); neither needs a daemon for config."""
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    return ["docker-compose"] if shutil.which("docker-compose") else None


@pytest.mark.skipif(compose_command() is None,
                    reason="no docker compose / docker-compose (Debian: apt-get install docker-compose; .ci/run does)")
def test_compose_files_are_valid_compose(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VITA_")}

    def config(*files: Path, **extra: str) -> dict:
        options = [arg for f in files for arg in ("-f", str(f))]
        run = subprocess.run([*compose_command(), *options, "config"], cwd=REPO_ROOT, capture_output=True,
                             text=True, env=env | extra)
        assert run.returncode == 0, run.stderr
        return yaml.safe_load(run.stdout)

    def checkpoint_sources(services: dict) -> set[str]:
        return {volume["source"] if isinstance(volume, dict) else volume.split(":")[0]
                for name in ("vita-0", "vita-1") for volume in services[name]["volumes"]}

    real = config(COMPOSE, VITA_CHECKPOINT_DIR="/srv/VITA1.5_ckpt")["services"]
    assert checkpoint_sources(real) == {"/srv/VITA1.5_ckpt"}
    tiny_with_tls = config(COMPOSE, COMPOSE_TLS, VITA_TLS_PEM=str(tmp_path / "site.pem"))["services"]
    assert checkpoint_sources(tiny_with_tls) == {"no-checkpoint"}  # unset: an empty volume, the tiny checkpoint
    assert tiny_with_tls["balancer"]["environment"]["VITA_LB_TLS_BIND"] == ":8443"


def test_compose_runs_one_replica_per_gpu_behind_the_balancer() -> None:
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    replicas = sorted(name for name in services if name.startswith("vita-"))
    assert len(replicas) >= 2
    gpus = []
    for name in replicas:
        replica = services[name]
        devices = replica["deploy"]["resources"]["reservations"]["devices"]
        assert len(devices) == 1 and devices[0]["driver"] == "nvidia" and len(devices[0]["device_ids"]) == 1
        gpus.append(devices[0]["device_ids"][0])
        assert replica["environment"]["VITA_DEVICE"] == "cuda"
        assert replica["environment"]["FORWARDED_ALLOW_IPS"] == "*"  # client addresses from the balancer
        assert any(v.endswith(":/checkpoint:ro") and "VITA_CHECKPOINT_DIR" in v for v in replica["volumes"])
        assert "/healthz" in " ".join(replica["healthcheck"]["test"])  # liveness; /readyz is the balancer's
        assert replica["restart"] == "unless-stopped" and "ports" not in replica  # reached through the balancer only
    assert len(set(gpus)) == len(gpus)  # a GPU of its own each

    balancer = services["balancer"]
    assert {k: v for k, v in balancer["environment"].items() if k.startswith("VITA_REPLICA_")} == {
        f"VITA_REPLICA_{name.split('-')[1]}": f"{name}:8000" for name in replicas
    }
    assert set(balancer["depends_on"]) == set(replicas) and balancer["restart"] == "unless-stopped"
    assert "/readyz" in " ".join(balancer["healthcheck"]["test"])


@pytest.mark.skipif(shutil.which("haproxy") is None,
                    reason="haproxy is not installed (Debian: apt-get install haproxy; .ci/run installs it)")
@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make a certificate")
def test_haproxy_accepts_its_config_with_the_compose_environment(tmp_path: Path) -> None:
    environment = yaml.safe_load(COMPOSE.read_text())["services"]["balancer"]["environment"]
    pem = tmp_path / "site.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=vita",
                    "-keyout", str(pem), "-out", str(pem)], check=True, capture_output=True)
    tls = yaml.safe_load(COMPOSE_TLS.read_text())["services"]["balancer"]["environment"]
    for extra in ({}, tls | {"VITA_LB_TLS_PEM": str(pem)}):
        check = subprocess.run(["haproxy", "-c", "-f", str(HAPROXY_CONFIG)], capture_output=True, text=True,
                               env={"PATH": os.environ["PATH"], **environment, **extra})
        assert check.returncode == 0, check.stdout + check.stderr


# --- docker/Dockerfile, run without docker ----------------------------------------------------------------------


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    instructions, current = [], ""
    for line in path.read_text().splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        current += line.rstrip()[:-1] + " " if line.rstrip().endswith("\\") else line
        if not line.rstrip().endswith("\\"):
            keyword, _, arguments = current.strip().partition(" ")
            instructions.append((keyword.upper(), arguments.strip()))
            current = ""
    return instructions


def requirement_closure(requirements: list[str]) -> dict[str, Distribution]:
    """The installed distributions these requirements pull in, recursively (extras and other platforms left out)."""
    found: dict[str, Distribution] = {}
    seen: set[tuple[str, frozenset[str]]] = set()
    pending = [Requirement(r) for r in requirements]
    while pending:
        requirement = pending.pop()
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
            continue
        name = canonicalize_name(requirement.name)
        if (name, frozenset(requirement.extras)) in seen:
            continue
        seen.add((name, frozenset(requirement.extras)))
        try:
            found[name] = distribution(name)
        except PackageNotFoundError:
            continue  # pip reports it below, as the image build would
        for text in found[name].requires or []:
            child = Requirement(text)
            if child.marker is None or any(child.marker.evaluate({"extra": e}) for e in requirement.extras | {""}):
                child.marker = None
                pending.append(child)
    return found


def base_layer(folder: Path, distributions: dict[str, Distribution]) -> Path:
    """A folder of links to the installed files of ``distributions``: what the base image and PyPI would bring."""
    folder.mkdir()
    for dist in distributions.values():
        site = Path(dist.locate_file(""))
        for top in {Path(f).parts[0] for f in dist.files or () if not str(f).startswith("..")}:
            if not (folder / top).exists():
                (folder / top).symlink_to(site / top)
    return folder


@dataclass
class ImageStandIn:
    """docker/Dockerfile's steps after FROM, carried out in a clean venv standing for the image."""

    instructions: list[tuple[str, str]]
    python: Path
    env: dict[str, str]  # the image's environment: ENV lines, the venv and the image's /usr/local/bin first on PATH
    workdir: Path
    skipped: list[str]  # RUN steps not carried out here


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> ImageStandIn:
    """The base image's torch and the PyPI packages come from this environment's installed copies (linked into
    a base layer the venv sees; pip offline, the torch build argument set to the torch installed here);
    apt-get steps are not run. Absolute paths of the image live under ``root``."""
    tmp = tmp_path_factory.mktemp("image")
    instructions = dockerfile_instructions(DOCKERFILE)
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    root, venv = tmp / "root", tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = Path(subprocess.check_output([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                                        text=True).strip())
    installed = requirement_closure(project["dependencies"] + ["pip", "setuptools"])
    (site / "base_layer.pth").write_text(f"{base_layer(tmp / 'base', installed)}\n")
    (venv / "bin" / "pip").write_text(f"#!{python}\nimport sys\nfrom pip._internal.cli.main import main\nsys.exit(main())\n")
    (venv / "bin" / "pip").chmod(0o755)

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH" and not k.startswith(("VITA_", "PIP_"))}
    env |= {"PATH": f"{venv / 'bin'}:{root / 'usr/local/bin'}:{env['PATH']}", "PIP_NO_INDEX": "1",
            "PIP_NO_BUILD_ISOLATION": "0", "PIP_CONFIG_FILE": os.devnull}  # offline; the build backend is in the base layer
    workdir, build_args = root, {"TORCH": f"torch=={distribution('torch').version}"}
    skipped = []
    for keyword, arguments in instructions[1:]:
        if keyword == "WORKDIR":
            workdir = root / arguments.lstrip("/")
            workdir.mkdir(parents=True, exist_ok=True)
        elif keyword == "ENV":
            env |= dict(pair.split("=", 1) for pair in shlex.split(arguments))
        elif keyword == "ARG":
            name, _, default = arguments.partition("=")
            env[name] = build_args.get(name, default)
        elif keyword == "COPY":
            *sources, target = arguments.split()
            destination = root / target.lstrip("/") if target.startswith("/") else workdir / target
            for source in sources:
                copy = shutil.copytree if (REPO_ROOT / source).is_dir() else shutil.copy2
                destination.parent.mkdir(parents=True, exist_ok=True)
                copy(REPO_ROOT / source, destination / source if target.endswith("/") else destination)
        elif keyword == "RUN" and "apt-get" in arguments:
            skipped.append(arguments)
        elif keyword == "RUN":
            run = subprocess.run(["bash", "-c", arguments], cwd=workdir, env=env, capture_output=True, text=True)
            assert run.returncode == 0, f"RUN {arguments}\n{run.stdout}\n{run.stderr}"
    return ImageStandIn(instructions, python, env, workdir, skipped)


def test_dockerfile_pins_its_base_and_a_torch_the_project_accepts() -> None:
    instructions = dockerfile_instructions(DOCKERFILE)
    assert instructions[0][0] == "FROM" and ":" in instructions[0][1] and "latest" not in instructions[0][1]
    pinned = Requirement(dict(a.split("=", 1) for k, a in instructions if k == "ARG")["TORCH"])
    (pin,) = pinned.specifier
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    torch_range = next(Requirement(r) for r in project["dependencies"] if Requirement(r).name == "torch")
    assert pin.operator == "==" and torch_range.specifier.contains(pin.version)  # `pip install -e .` keeps it


def test_dockerfile_steps_install_the_image_own_copy_of_the_server(image: ImageStandIn, tmp_path: Path) -> None:
    assert len(image.skipped) == 1 and "gcc" in image.skipped[0]  # the C compiler Triton needs (not run here)
    where = subprocess.check_output([image.python, "-c", "import server, vita, tts; print(server.__file__)"],
                                    env=image.env, cwd=tmp_path, text=True)
    assert Path(where.strip()).is_relative_to(image.workdir)
    assert shutil.which("vita-entrypoint", path=image.env["PATH"]) and shutil.which("vita-server", path=image.env["PATH"])


@pytest.mark.parametrize("mounted", [True, False], ids=["checkpoint_mounted", "empty_volume"])
def test_entrypoint_serves_the_mounted_checkpoint_or_the_tiny_one(
    image: ImageStandIn, mounted: bool, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    cache, empty = tmp_path / "cache", tmp_path / "empty_volume"
    cache.mkdir()
    empty.mkdir()
    cached_tiny = cache / f"vita_tiny_ckpt_v{TINY_CHECKPOINT_VERSION}"
    cached_tiny.symlink_to(tiny_checkpoint)  # skip regenerating it
    port = free_port()  # as `docker run -e` would: loopback, a free port, this test's folders
    env = image.env | {"VITA_HOST": "127.0.0.1", "VITA_PORT": str(port), "VITA_CACHE_DIR": str(cache),
                       "VITA_CHECKPOINT_MOUNT": str(tiny_checkpoint if mounted else empty)}
    entrypoint = json.loads(next(a for k, a in image.instructions if k == "ENTRYPOINT"))
    healthcheck = json.loads(next(a for k, a in image.instructions if k == "HEALTHCHECK").split(" CMD ", 1)[1])
    with open(tmp_path / "server.log", "w") as log:
        server = subprocess.Popen(entrypoint, env=env, cwd=image.workdir, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while (status := ready_status(port)) != 200 and time.monotonic() < deadline:
            assert server.poll() is None, (tmp_path / "server.log").read_text()
            time.sleep(0.1)
        model = get_json(f"http://127.0.0.1:{port}/readyz")[1]["model"]
        assert status == 200  # /readyz names the checkpoint folder
        assert model == tiny_checkpoint.name if mounted else model.startswith(f"{cached_tiny.name} (tiny random")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as page:
            assert b"<html" in page.read().lower()  # web/ was copied beside the code
        assert subprocess.run(healthcheck, env=env, capture_output=True).returncode == 0
    finally:
        server.kill()
        server.wait()
    assert subprocess.run(healthcheck, env=env, capture_output=True).returncode != 0  # and it notices a dead server


def ready_status(port: int) -> int | None:
    try:
        return get_json(f"http://127.0.0.1:{port}/readyz")[0]
    except OSError:
        return None
