#!/usr/bin/env bash
# The GPU session's benchmarks in one device call (about 6 minutes after the machine starts),
# from the repo root there, with carry [".whl", ".gpu"] built by bench/gpu_carry.sh:
#
#     bash bench/gpu_session.sh "$OUT"  [PARTS]   # PARTS: any of pitch,synth,gpu (default all)
#
# Writes pitch.json, synth.json and gpu.json (and each one's log) into the given folder.
set -uo pipefail
out=${1:?usage: bench/gpu_session.sh OUT_DIR [pitch,synth,gpu]}
parts=${2:-pitch,synth,gpu}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || exit 1
cp -r .gpu/site/torchcrepe /tmp/site/
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, torch.version.cuda)"

status=0
run() {  # name, command...: a failing part is reported and the next one still runs
  local name=$1; shift
  echo "== $name: $*"
  "$@" 2>&1 | tee "$out/$name.log" || { echo "== $name failed"; status=1; }
}
case ",$parts," in *,pitch,*) run pitch python3 bench/pitch_gpu.py --out "$out/pitch.json" ;; esac
# one --work for both, so they share one fixture build (a minute or two) under it
case ",$parts," in *,synth,*) run synth python3 bench/synth_gpu.py --work /tmp/rvc-gpu --out "$out/synth.json" ;; esac
case ",$parts," in *,gpu,*)
  run gpu python3 bench/gpu.py --parts fidelity,throughput,transfers,reference --throughput-precisions fp16 \
    --mixed --seconds 10,60 --work /tmp/rvc-gpu --ref .gpu/ref --oracle .gpu/oracle --out "$out/gpu.json" ;;
esac
exit $status
