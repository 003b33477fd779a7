"""The Dockerfile, read as Docker reads it: instructions, stages, build arguments and the
configuration of the image a build makes."""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from .tools import REPO

# Both service images come from this one file: `--build-arg SERVICE=<name>`, one of
# image_services(), picks the workspace member services/<name> and the stage service-<name>.
DOCKERFILE = REPO / "Dockerfile"
_ARG_REFERENCE = re.compile(r"\$\{(\w+)\}|\$(\w+)")


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    found = []
    text = re.sub(r"\\\n", " ", path.read_text(encoding="utf-8"))
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            found.append((word.upper(), rest.strip()))
    return found


@dataclass(frozen=True)
class DockerStage:
    """One FROM of a Dockerfile, with the build arguments in scope substituted."""

    base: str  # the image or stage it is built FROM
    name: str | None  # its AS name
    instructions: tuple[tuple[str, str], ...]  # after the FROM; ARG lines as written


def dockerfile_stages(path: Path, **build_args: str) -> list[DockerStage]:
    """The stages of a Dockerfile built with `--build-arg NAME=value` for each of build_args.

    As Docker does: an ARG before the first FROM may be used in FROM lines; inside a stage an
    argument is substituted only after its ARG line (which may take the global default).
    Only ARG values are substituted; $PATH in an ENV, say, stays as written.
    """
    global_args: dict[str, str] = {}
    stages: list[tuple[str, str | None, dict[str, str], list[tuple[str, str]]]] = []

    def expand(text: str, scope: Mapping[str, str]) -> str:
        def value(match: re.Match[str]) -> str:
            name = match.group(1) or match.group(2)
            return scope.get(name, match.group(0))

        return _ARG_REFERENCE.sub(value, text)

    for word, rest in dockerfile_instructions(path):
        if word == "FROM":
            parts = expand(rest, global_args).split()
            name = parts[2] if len(parts) == 3 and parts[1].upper() == "AS" else None
            stages.append((parts[0], name, {}, []))
        elif word == "ARG":
            name, has_default, default = rest.partition("=")
            if not stages:
                global_args[name] = build_args.get(name, default)
                continue
            if name in build_args:
                stages[-1][2][name] = build_args[name]
            else:
                stages[-1][2][name] = default if has_default else global_args.get(name, "")
            stages[-1][3].append((word, rest))
        elif stages:
            stages[-1][3].append((word, expand(rest, stages[-1][2])))
    return [DockerStage(base, name, tuple(body)) for base, name, _, body in stages]


def dockerfile_image(path: Path, **build_args: str) -> list[DockerStage]:
    """The stages an image is made of, root first: the last stage, the stage it is built FROM,
    and so on back to a stage built FROM an image that is no stage of the file."""
    stages = dockerfile_stages(path, **build_args)
    by_name = {stage.name: stage for stage in stages if stage.name}
    chain = [stages[-1]]
    while chain[-1].base in by_name:
        assert len(chain) <= len(stages), "a stage is built FROM itself"
        chain.append(by_name[chain[-1].base])
    return chain[::-1]


def image_config(stages: Sequence[DockerStage]) -> dict[str, str]:
    """The image configuration those stages give, as Docker computes it: the last USER,
    STOPSIGNAL, WORKDIR, ENTRYPOINT and CMD; EXPOSE collects the ports of every stage; and an
    ENTRYPOINT resets a CMD inherited from an earlier stage."""
    config: dict[str, str] = {}
    ports: list[str] = []
    for stage in stages:
        cmd_in_stage = False
        for word, rest in stage.instructions:
            if word == "EXPOSE":
                ports += [p for p in rest.split() if p not in ports]
            elif word == "ENTRYPOINT":
                config["ENTRYPOINT"] = rest
                if not cmd_in_stage:
                    config.pop("CMD", None)
            elif word in ("USER", "STOPSIGNAL", "CMD", "WORKDIR"):
                config[word] = rest
                cmd_in_stage |= word == "CMD"
    if ports:
        config["EXPOSE"] = " ".join(ports)
    return config


@functools.cache
def image_services() -> tuple[str, ...]:
    """The values of the Dockerfile's SERVICE: the names of its service-<name> stages."""
    names = [s.name for s in dockerfile_stages(DOCKERFILE, SERVICE="") if s.name]
    return tuple(n.removeprefix("service-") for n in names if n.startswith("service-"))


def service_image(service: str) -> list[DockerStage]:
    """The stages of the image `--build-arg SERVICE=<service>` builds from the Dockerfile."""
    return dockerfile_image(DOCKERFILE, SERVICE=service)


def exec_form(arguments: str) -> list[str] | None:
    """The JSON array of an exec-form ENTRYPOINT/CMD, or None for the shell form."""
    try:
        value = json.loads(arguments)
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, list) and all(isinstance(v, str) for v in value) else None
