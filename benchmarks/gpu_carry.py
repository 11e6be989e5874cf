"""What the GPU check needs beyond a lent machine's image, carried there as wheels (issue 36).

A lent GPU machine reaches no package index, runs a call for at most 10 minutes and takes at
most 64 MiB of files with it (the working tree included). So the packages its image lacks
travel as wheels in ``.gpu-carry/<n>/`` folders of at most 60 MiB each, one folder per call:

* ``prepare`` (``bash benchmarks/gpu_check.sh --prepare-carry``, where the index is reachable)
  downloads, for CPython 3.12 x86-64 manylinux, the wheels of each part's packages and of
  their dependencies that the image lacks (:data:`IMAGE_PACKAGES`), trims the ray wheel of
  files the check never loads (:data:`TRIM`; 79 MB -> about 46 MB, so no wheel is split),
  writes folder 1 (the parts of the first call: fungivision, dense) and folder 2 on (the
  pipeline part), and prints the device calls to make, in order;
* ``install`` (run by ``gpu_check.sh`` before the check, on any machine) installs the carried
  wheels of every distribution not installed yet into ``--site`` (a folder on PYTHONPATH,
  kept between two calls on a warm machine), then tries the package index once, with a
  short timeout, for what is still missing; it never fails: what stays missing is written
  to ``<site>/install_notes.json`` and the check lists the parts that need it under
  ``failed`` with that reason, while the other parts run.

The versions carried are those installed here, the ones this checkout's tests run.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CARRY = Path(os.environ.get("FUNGI_GPU_CARRY", ROOT / ".gpu-carry"))
"""The carried folders (``FUNGI_GPU_CARRY`` names another place, e.g. in a test)."""
FOLDER_LIMIT = 60 * 2**20
"""Each folder travels in one call, beside the working tree, under the call's 64 MiB."""
CALL_LIMIT = 64 * 2**20

# part -> {module the part imports: requirement that provides it}; the engine needs only the image
PART_NEEDS: dict[str, dict[str, str]] = {
    "engine": {"timm": "timm>=1.0", "transformers": "transformers>=4.40", "tokenizers": "tokenizers"},
    "fungivision": {"fungivision": "fungivision==0.0.2"},
    "dense": {"faiss": "faiss-cpu>=1.8"},
    "pipeline": {"ray": "ray[data]>=2.40", "psutil": "psutil>=5.9", "yaml": "pyyaml>=6"},
}
CALLS: tuple[tuple[str, ...], ...] = (("engine", "fungivision", "dense"), ("pipeline",))
"""The device calls, in order: the most wanted figures (those needing only the first folder) first."""

IMAGE_PACKAGES = frozenset("""
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock
flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx
huggingface-hub humanize hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin
jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax
llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack
multidict multipledispatch mypy-extensions nanobind narwhals networkx ninja numba numba-cuda numpy numpyro
nvidia-ml-py onnx onnx-ir onnxruntime onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx
optimistix orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy portalocker
prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing pyproject-hooks
pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist python-dateutil
pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image
scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six
sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl
tifffile tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics
torchvision tqdm transformers treescope triton typer typing-extensions typing-inspect urllib3 uvloop
wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp
""".split())
"""The lent machines' image ('cuda', /work/.library/device/KINDS.md, read 2026-11-17): never carried."""

TRIM: dict[str, tuple[str, ...]] = {
    "ray": (
        r"ray/jars/.*",  # ray_dist.jar, 34.5 MB: Java workers only
        r"ray/dashboard/client/build/.*\.map",  # the dashboard's source maps, 6.6 MB: browsers' debuggers only
    ),
}
"""Files (regular expressions on wheel paths) that the check never loads, cut from a wheel (and its RECORD)."""

TARGET = {"python_version": "3.12", "implementation": "cp", "abi": "cp312",
          "platforms": ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")}
NOTES = "install_notes.json"


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def installed(distribution: str) -> bool:
    try:
        importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def missing_modules(part: str) -> dict[str, str]:
    """{module: requirement} of ``part`` that cannot be imported here."""
    return {module: req for module, req in PART_NEEDS[part].items() if not importable(module)}


def importable(module: str) -> bool:
    """Whether ``module`` is installed (found on the path), without importing it (ray takes seconds)."""
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:  # a finder that knows it is absent
        return False


def read_notes(site: str | None) -> dict[str, str]:
    """What ``install`` wrote about the requirements it could not install ({} when it did not run)."""
    path = Path(site) / NOTES if site else None
    return json.loads(path.read_text()) if path and path.is_file() else {}


# -- install (on the GPU machine) ----------------------------------------------------
def wheel_distribution(path: Path) -> str:
    return canonical(path.name.split("-")[0])


def install(site: Path, index_timeout_s: float) -> int:
    """Carried wheels first, the index once for the rest; never fails (see the module docstring)."""
    site.mkdir(parents=True, exist_ok=True)
    wheels = [w for w in sorted(CARRY.glob("*/*.whl")) if not installed(wheel_distribution(w))]
    notes: dict[str, str] = {}
    if wheels:
        print(f"gpu_carry: installing {len(wheels)} carried wheels into {site}", file=sys.stderr, flush=True)
        # compiled here (no --no-compile): Ray's processes that would each compile ray at start made
        # its raylet give up on its dashboard agent on a busy machine (tests/test_gpu_check.py)
        done = _pip(["install", "-q", "--no-index", "--no-deps", "--no-cache-dir", "--upgrade",
                     "--target", str(site), *map(str, wheels)])
        if done.returncode != 0:
            notes["*"] = f"installing the carried wheels failed: {done.stderr.strip()[-500:]}"
        importlib.invalidate_caches()
    wanted = {req: module for part in PART_NEEDS for module, req in PART_NEEDS[part].items()}
    missing = [req for req, module in wanted.items() if not importable(module)]
    if missing:
        print(f"gpu_carry: trying the package index once ({index_timeout_s:g} s timeout) for {' '.join(missing)}",
              file=sys.stderr, flush=True)
        done = _pip(["install", "-q", "--timeout", f"{index_timeout_s:g}", "--retries", "0", *_constraints(), *missing])
        importlib.invalidate_caches()
        carried = ", ".join(sorted({w.parent.name for w in CARRY.glob("*/*.whl")})) or "none"
        for req in missing:
            if not importable(wanted[req]):
                last = (done.stderr.strip().splitlines() or ["no message"])[-1][:300]
                notes[req] = (f"not in the image, not in the carried folders ({carried}), and the package index "
                              f"gave nothing (pip exit {done.returncode}: {last})")
    (site / NOTES).write_text(json.dumps(notes, indent=1))
    return 0


def _pip(arguments: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", *arguments],
                          capture_output=True, text=True)


def _constraints() -> list[str]:
    """Keep the machine's torch and numpy: an index install must not replace the CUDA build."""
    pins = [f"{name}=={importlib.metadata.version(name)}" for name in ("torch", "torchvision", "torchaudio", "numpy")
            if installed(name)]
    handle = tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False)
    handle.write("\n".join(pins) + "\n")
    handle.close()
    return ["-c", handle.name]


# -- prepare (where the index is reachable) ------------------------------------------
def prepare(carry: Path, python_version: str) -> list[dict]:
    """Fill ``carry`` with the folders of :data:`CALLS`; returns the folders' listing."""
    from packaging.requirements import Requirement

    abi = "cp" + python_version.replace(".", "")
    environment = {"python_version": python_version, "python_full_version": f"{python_version}.0", "sys_platform": "linux",
                   "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
                   "implementation_name": "cpython", "platform_python_implementation": "CPython"}
    if carry.exists():
        shutil.rmtree(carry)
    downloads = carry / ".downloads"
    folders: list[dict] = []
    for call, parts in enumerate(CALLS, start=1):  # each call's folders whole: a call may find a fresh machine
        wanted = [_pinned(Requirement(req)) for part in parts for req in PART_NEEDS[part].values()]
        wheels = _closure(wanted, downloads, python_version, abi, environment)
        folders += _pack(carry, call, wheels, len(folders))
    shutil.rmtree(downloads)
    (carry / "MANIFEST.json").write_text(json.dumps({"python": python_version, "folders": folders, "trimmed": TRIM}, indent=1))
    return folders


def _pinned(requirement) -> "Requirement":  # noqa: F821 - packaging's, imported lazily
    """The version installed here (the one the tests run), with the requirement's extras."""
    from packaging.requirements import Requirement

    if not installed(requirement.name):
        return requirement
    extras = f"[{','.join(sorted(requirement.extras))}]" if requirement.extras else ""
    return Requirement(f"{requirement.name}{extras}=={importlib.metadata.version(requirement.name)}")


def _closure(wanted: list, downloads: Path, python_version: str, abi: str, environment: dict) -> list[Path]:
    """Wheels of ``wanted`` and of their dependencies, minus the image's packages."""
    from packaging.requirements import Requirement

    queue, wheels, taken = list(wanted), [], set()
    while queue:
        requirement = queue.pop(0)
        name = canonical(requirement.name)
        if name in IMAGE_PACKAGES or name in taken:
            continue
        taken.add(name)
        wheel = _download(str(requirement), downloads, python_version, abi)
        wheels.append(wheel)
        with zipfile.ZipFile(wheel) as archive:
            metadata = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
            lines = archive.read(metadata).decode().splitlines()
        for line in lines:
            if not line.startswith("Requires-Dist:"):
                continue
            dependency = Requirement(line.split(":", 1)[1].strip())
            extras = requirement.extras or {""}
            if dependency.marker is None or any(dependency.marker.evaluate({**environment, "extra": e}) for e in extras):
                queue.append(dependency)
    return wheels


def _download(requirement: str, downloads: Path, python_version: str, abi: str) -> Path:
    before = set(downloads.glob("*.whl"))
    platforms = [arg for platform in TARGET["platforms"] for arg in ("--platform", platform)]
    done = _pip(["download", "-q", "--no-deps", "--only-binary=:all:", "--python-version", python_version,
                 "--implementation", "cp", "--abi", abi, "--abi", "abi3", "--abi", "none", *platforms,
                 "-d", str(downloads), requirement])
    if done.returncode != 0:
        raise SystemExit(f"gpu_carry: cannot download {requirement}: {done.stderr.strip()[-800:]}")
    (wheel,) = set(downloads.glob("*.whl")) - before
    return wheel


def trim_wheel(wheel: Path, destination: Path, patterns: tuple[str, ...]) -> list[str]:
    """Copy ``wheel`` without the files matching ``patterns`` (and their RECORD lines); returns those cut."""
    cut_re = re.compile("|".join(f"(?:{p})" for p in patterns))
    cut: list[str] = []
    with zipfile.ZipFile(wheel) as source, zipfile.ZipFile(destination, "w", zipfile.ZIP_DEFLATED) as target:
        for info in source.infolist():
            if cut_re.fullmatch(info.filename):
                cut.append(info.filename)
                continue
            data = source.read(info)
            if info.filename.endswith(".dist-info/RECORD"):
                data = b"".join(line for line in data.splitlines(keepends=True)
                                if not cut_re.fullmatch(line.decode().split(",", 1)[0]))
            target.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED)
    return cut


def _pack(carry: Path, call: int, wheels: list[Path], earlier: int) -> list[dict]:
    """Move ``wheels`` (trimmed where :data:`TRIM` says) into folders of at most :data:`FOLDER_LIMIT` for ``call``."""
    folders: list[dict] = []
    for wheel in sorted(wheels, key=lambda w: -w.stat().st_size):
        name = wheel_distribution(wheel)
        if name in TRIM:
            trimmed = wheel.with_suffix(".trim")
            cut = trim_wheel(wheel, trimmed, TRIM[name])
            print(f"gpu_carry: {wheel.name}: {wheel.stat().st_size / 2**20:.1f} MiB -> {trimmed.stat().st_size / 2**20:.1f} MiB "
                  f"without {len(cut)} files never loaded ({', '.join(cut)})", file=sys.stderr)
            trimmed.replace(wheel)
        size = wheel.stat().st_size
        if size > FOLDER_LIMIT:
            raise SystemExit(f"gpu_carry: {wheel.name} is {size / 2**20:.1f} MiB, over a folder's {FOLDER_LIMIT / 2**20:.0f} MiB: "
                             "add files it never loads to TRIM")
        folder = next((f for f in folders if f["bytes"] + size <= FOLDER_LIMIT), None)
        if folder is None:
            folder = {"folder": str(earlier + len(folders) + 1), "call": call, "bytes": 0, "wheels": []}
            folders.append(folder)
            (carry / folder["folder"]).mkdir(parents=True)
        shutil.move(str(wheel), carry / folder["folder"] / wheel.name)
        folder["bytes"] += size
        folder["wheels"].append(wheel.name)
    return folders


def tree_bytes() -> int:
    """What every call carries besides its folders: the tracked and untracked-not-ignored files."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout.split("\0")
    return sum((ROOT / name).stat().st_size for name in listed if name and (ROOT / name).is_file())


def device_calls(folders: list[dict]) -> list[dict]:
    """The calls to make on the lent machine, in order, as the device tool's arguments."""
    calls = []
    for call, parts in enumerate(CALLS, start=1):
        carried = [f".gpu-carry/{f['folder']}" for f in folders if f["call"] == call]
        budget = 240 if call == 1 else 180
        command = (f"nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; "
                   f"bash benchmarks/gpu_check.sh --parts {','.join(parts)} --budget-s {budget}")
        calls.append({"command": command, "carry": carried, "timeout_s": 360 if call == 1 else 240})
    return calls


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    prep = commands.add_parser("prepare", help="download and pack the wheels into .gpu-carry/ (needs the index)")
    prep.add_argument("--python-version", default=TARGET["python_version"], help="the target's CPython (default: %(default)s)")
    prep.add_argument("--carry", default=str(CARRY), help="folder to fill (default: .gpu-carry in the checkout)")
    inst = commands.add_parser("install", help="install carried wheels, then try the index once (never fails)")
    inst.add_argument("--site", required=True, help="folder to install into (on PYTHONPATH)")
    inst.add_argument("--index-timeout-s", type=float, default=5.0)
    args = parser.parse_args(argv)
    if args.command == "install":
        return install(Path(args.site), args.index_timeout_s)
    carry = Path(args.carry)
    folders = prepare(carry, args.python_version)
    tree = tree_bytes()
    print(f"gpu_carry: {carry}: " + "; ".join(f"folder {f['folder']} (call {f['call']}): {f['bytes'] / 2**20:.1f} MiB, "
                                               f"{' '.join(f['wheels'])}" for f in folders))
    print(f"the calls to make on a lent GPU machine, in order (the working tree is {tree / 2**20:.1f} MiB of each call):")
    for number, call in enumerate(device_calls(folders), start=1):
        carried = sum(f["bytes"] for f in folders if f".gpu-carry/{f['folder']}" in call["carry"])
        if carried + tree > CALL_LIMIT:
            raise SystemExit(f"gpu_carry: call {number} would carry {(carried + tree) / 2**20:.1f} MiB, over {CALL_LIMIT / 2**20:.0f} MiB")
        print(f"{number}. {json.dumps(call)}")
    print("then give the machine back; the tables are in each call's output and its files (gpu_check.json)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
