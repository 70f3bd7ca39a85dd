"""Readers for the deployment files, as the tools that consume them would read them.

* ``docker-compose.yml``: YAML with merge keys, then ``${VAR}`` interpolation from
  ``.env`` (here ``.env.example``) the way ``docker compose`` does it.
* ``Dockerfile``: the stages, and the final stage's ENV, USER, EXPOSE, HEALTHCHECK,
  ENTRYPOINT and CMD.
* ``deploy/k8s/``: every YAML document, by file.
* ``service/config.py``: the ``SYNCLOCK_*`` names it reads.
"""

from __future__ import annotations

import ast
import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
K8S = ROOT / "deploy" / "k8s"
PROMETHEUS = ROOT / "deploy" / "prometheus"
GRAFANA = ROOT / "grafana"
CONFIG_PY = ROOT / "service" / "config.py"

# $$, ${NAME}, ${NAME:-default}, ${NAME-default}, ${NAME:?error}, ${NAME?error}, $NAME
_REFERENCE = re.compile(
    r"\$(?:(?P<dollar>\$)"
    r"|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}"
    r"|(?P<bare>[A-Za-z_][A-Za-z0-9_]*))"
)


class InterpolationError(ValueError):
    pass


def read_env_file(path: Path = ENV_EXAMPLE) -> dict[str, str]:
    """``KEY=VALUE`` lines; blank lines and ``#`` comments are skipped."""
    values: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if not sep:
            raise ValueError(f"{path.name}: not KEY=VALUE: {line!r}")
        values[key.strip()] = value.strip()
    return values


def interpolate(text: str, values: dict[str, str]) -> str:
    """Compose's substitution. An unset variable without a default is an error here
    (compose would warn and use ""): .env.example must name everything."""

    def substitute(match: re.Match[str]) -> str:
        if match.group("dollar"):
            return "$"
        name = match.group("braced") or match.group("bare")
        op, arg = match.group("op"), match.group("arg") or ""
        present = name in values
        value = values.get(name, "")
        if op in (":-", "-"):
            use_default = not value if op == ":-" else not present
            return arg if use_default else value
        if op in (":?", "?"):
            if (op == ":?" and not value) or not present:
                raise InterpolationError(f"{name}: {arg}")
            return value
        if not present:
            raise InterpolationError(f"{name} is referenced but not set")
        return value

    return _REFERENCE.sub(substitute, text)


def references(text: str) -> dict[str, bool]:
    """Every variable ``text`` refers to, and whether it has a default."""
    found: dict[str, bool] = {}
    for match in _REFERENCE.finditer(text):
        name = match.group("braced") or match.group("bare")
        if name:
            has_default = match.group("op") in (":-", "-")
            found[name] = found.get(name, False) or has_default
    return found


def _walk(node: Any, values: dict[str, str]) -> Any:
    if isinstance(node, str):
        return interpolate(node, values)
    if isinstance(node, list):
        return [_walk(item, values) for item in node]
    if isinstance(node, dict):
        return {key: _walk(value, values) for key, value in node.items()}
    return node


def load_compose(values: dict[str, str] | None = None) -> dict[str, Any]:
    """The compose file after YAML merge keys; interpolated when ``values`` is given."""
    document: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return document if values is None else _walk(document, values)


def environment(service: dict[str, Any]) -> dict[str, str]:
    """A service's ``environment`` (mapping or list form) as strings."""
    raw = service.get("environment") or {}
    if isinstance(raw, list):
        pairs = (item.partition("=") for item in raw)
        return {key: value for key, _, value in pairs}
    return {key: "" if value is None else str(value) for key, value in raw.items()}


def depends_on(service: dict[str, Any]) -> dict[str, str]:
    """A service's dependencies and their conditions (short form: service_started)."""
    raw = service.get("depends_on") or {}
    if isinstance(raw, list):
        return {name: "service_started" for name in raw}
    return {name: (spec or {}).get("condition", "service_started") for name, spec in raw.items()}


def start_order(services: dict[str, Any]) -> list[str]:
    """A topological order of the services by ``depends_on``; raises on a cycle."""
    order: list[str] = []
    visiting: set[str] = set()

    def visit(name: str) -> None:
        if name in order:
            return
        if name in visiting:
            raise ValueError(f"depends_on cycle through {name}")
        visiting.add(name)
        for dependency in sorted(depends_on(services[name])):
            visit(dependency)
        visiting.discard(name)
        order.append(name)

    for name in services:
        visit(name)
    return order


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]

    def last(self, keyword: str) -> str | None:
        found = self.all(keyword)
        return found[-1] if found else None

    def env(self) -> dict[str, str]:
        values: dict[str, str] = {}
        for args in self.all("ENV"):
            for item in shlex.split(args):
                key, _, value = item.partition("=")
                values[key] = value
        return values

    def exec_form(self, keyword: str) -> list[str]:
        """ENTRYPOINT or CMD, which must be in exec (JSON array) form."""
        args = self.last(keyword)
        if args is None:
            return []
        parsed = json.loads(args)
        if not (isinstance(parsed, list) and all(isinstance(a, str) for a in parsed)):
            raise ValueError(f"{keyword} is not in exec form: {args}")
        return parsed

    def healthcheck(self) -> tuple[dict[str, str], list[str]]:
        """The HEALTHCHECK's options and its exec-form command."""
        args = self.last("HEALTHCHECK") or ""
        options_part, sep, command = args.partition(" CMD ")
        if not sep:
            raise ValueError(f"HEALTHCHECK has no exec-form CMD: {args}")
        options = dict(item.removeprefix("--").split("=", 1) for item in shlex.split(options_part))
        return options, json.loads(command)


def dockerfile_stages(path: Path = DOCKERFILE) -> list[Stage]:
    """Stages in order. ARGs before the first FROM are substituted into FROM lines."""
    lines = [line for line in path.read_text().splitlines() if not line.lstrip().startswith("#")]
    logical = re.sub(r"\\\n", " ", "\n".join(lines))
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in logical.splitlines():
        if not line.strip():
            continue
        keyword, _, args = line.strip().partition(" ")
        keyword, args = keyword.upper(), args.strip()
        if keyword == "FROM":
            words = args.split()
            base = re.sub(r"\$\{(\w+)\}", lambda m: global_args[m.group(1)], words[0])
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            stages.append(Stage(base, name))
        elif not stages and keyword == "ARG":
            key, _, value = args.partition("=")
            global_args[key] = value
        elif stages:
            stages[-1].instructions.append((keyword, args))
    return stages


def k8s_documents() -> dict[str, list[dict[str, Any]]]:
    """Every non-empty YAML document under deploy/k8s/, by file name."""
    return {
        path.name: [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
        for path in sorted(K8S.glob("*.yaml"))
    }


def k8s_by_kind() -> dict[str, dict[str, Any]]:
    """The manifests by kind (one of each kind here)."""
    found: dict[str, dict[str, Any]] = {}
    for documents in k8s_documents().values():
        for document in documents:
            assert document["kind"] not in found, f"two {document['kind']} manifests"
            found[document["kind"]] = document
    return found


def config_variables() -> set[str]:
    """The SYNCLOCK_* names that service/config.py mentions as string literals."""
    tree = ast.parse(CONFIG_PY.read_text())
    return {
        node.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and re.fullmatch(r"SYNCLOCK_[A-Z0-9_]+", node.value)
    }
