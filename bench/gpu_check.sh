#!/usr/bin/env bash
# CUDA variants of the scale benchmarks (issues 9 and 27), about 7 minutes on one H200.
#
# Expects torch with CUDA and torch_geometric to be installed; never changes them (pip runs
# with a constraint on the installed torch). Also needs, and installs when missing (offline
# from $WHEELS if set: pip --no-index --find-links "$WHEELS"):
#   recbole==1.2.1 (--no-deps: its ray / thop / plotly extras are not used here) and what it
#   imports on this path: colorlog colorama texttable scikit-learn tensorboard psutil;
#   faiss-cpu>=1.8 (k-means / code search on CPU), numpy<2 and pandas<3 (RecBole 1.2.1),
#   scipy pyyaml tqdm matplotlib.
# The plugin itself runs from this checkout (PYTHONPATH); nothing else is installed.
#
#   bash bench/gpu_check.sh                # writes to $OUT (the device tool's folder) or bench/results/gpu
#
# Steps: (1) DPPMG vs LightGCN and the scaling table on synthetic 1e5 (full epochs) and 1e6
# (100 batches, scaled), DPPMG in both propagation modes (full and sampled, the scale table's
# settings), (2) RecBole's DDP path on CUDA with NCCL (one rank: a single GPU cannot hold two
# NCCL ranks), in both modes (sampled: the sparse table gradients through NCCL), (3) the batch-rows propagation on CUDA against the full one, (4) smoke
# runs of bench_text / bench_image on CUDA with tiny models (bench_tokens is FAISS on CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT_DIR=${OUT:-bench/results/gpu}
mkdir -p "$OUT_DIR"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, torch.cuda.get_device_name(0))"
KEEP=$(mktemp)
"$PY" -c "import torch; print(f'torch=={torch.__version__}')" > "$KEEP"
PIP=("$PY" -m pip install -q -c "$KEEP" ${WHEELS:+--no-index --find-links "$WHEELS"})

need=$("$PY" - <<'EOF'
import importlib.util
wanted = {"colorlog": "colorlog", "colorama": "colorama", "texttable": "texttable", "sklearn": "scikit-learn",
          "tensorboard": "tensorboard", "psutil": "psutil", "faiss": "faiss-cpu>=1.8", "scipy": "scipy",
          "yaml": "pyyaml", "tqdm": "tqdm", "matplotlib": "matplotlib", "pandas": "pandas<3"}
print(" ".join(spec for module, spec in wanted.items() if importlib.util.find_spec(module) is None))
EOF
)
[ -n "$need" ] && "${PIP[@]}" $need
"$PY" -c "import numpy, sys; sys.exit(int(numpy.__version__.split('.')[0]) >= 2)" || "${PIP[@]}" "numpy<2"
"$PY" -c "import pandas, sys; sys.exit(int(pandas.__version__.split('.')[0]) >= 3)" || "${PIP[@]}" "pandas<3"
"$PY" -c "import recbole" 2>/dev/null || "${PIP[@]}" --no-deps "recbole==1.2.1"

DATA=$(mktemp -d)
trap 'rm -rf "$DATA" "$KEEP"' EXIT
THREADS=4

echo "== (1) DPPMG vs LightGCN on CUDA and the scaling table: 1e5 (full epochs), 1e6 (100 batches, scaled)"
timeout 420 "$PY" bench/bench_stage1.py --scale 1e5,1e6 --modes full,sampled --full-below 2e5 --device cuda \
  --threads $THREADS --repeats 3 --max-batches 100 --max-eval-batches 20 --train-batch-size 2048 \
  --set loss_type=bpr --set graph_dropout=0 --data-root "$DATA" --out "$OUT_DIR/scale" \
  || echo "scale: stopped (time limit); finished sizes are in $OUT_DIR/scale/synth-*.json"

echo "== (2) DDP on CUDA through RecBole's path (NCCL, 1 rank), full and sampled"
timeout 180 "$PY" - "$DATA" <<'EOF'
import sys
import torch.distributed as dist
from recbole_dppmg.data.synthetic import SyntheticSpec, write_synthetic
from recbole_dppmg.distributed import free_port
from recbole_dppmg.quick_start import run
root = sys.argv[1]
folder = write_synthetic(SyntheticSpec(interactions=20000), root, "synth-ddp")
for mode in ("full", "sampled"):
    settings = {"data_path": root, "checkpoint_dir": root + "/saved", "epochs": 2, "state": "WARNING",
                "local_rank": 0, "nproc": 1, "world_size": 1, "ip": "127.0.0.1", "port": free_port(),
                "propagation": mode}
    result = run("DPPMG", "synth-ddp", [str(folder / "synth-ddp.yaml")], settings)
    print(mode, "| backend", dist.get_backend() if dist.is_initialized() else "destroyed", "| test", result.test_result)
    if dist.is_initialized():
        dist.destroy_process_group()  # the next mode joins a fresh group
EOF

echo "== (3) batch-rows propagation on CUDA: same values and gradients as the full one"
timeout 60 "$PY" - <<'EOF'
import torch
from recbole_dppmg.model.graph import LightGCNPropagation, normalized_adjacency
import numpy as np, scipy.sparse as sp
rng = np.random.default_rng(0)
inter = sp.coo_matrix((np.ones(5000), (rng.integers(1, 300, 5000), rng.integers(1, 200, 5000))), shape=(300, 200))
adj = normalized_adjacency(inter, 300, 200).cuda()
x = torch.randn(500, 32, device="cuda", requires_grad=True)
rows = torch.randperm(500, device="cuda")[:80]
w = torch.randn(80, 32, device="cuda")
prop = LightGCNPropagation(2)
(prop(x, adj)[rows] * w).sum().backward(); full = x.grad.clone(); x.grad = None
(prop(x, adj, rows) * w).sum().backward()
print("max |grad diff|", float((x.grad - full).abs().max()))
assert torch.allclose(x.grad, full, atol=1e-5)
EOF
echo "== (4) smoke checks of the generation benches on CUDA (tiny models built from config: the real"
echo "   SmolLM2 / TAEF2 weights are not on a bare GPU machine; copy them and drop --tiny / --backbone tiny)"
timeout 120 "$PY" bench/bench_text.py --backbone tiny --device cuda --users 4 --batch-sizes 1,4 --new-tokens 8 \
  --threads $THREADS | tee "$OUT_DIR/text_tiny.md" || echo "bench_text: failed"
timeout 60 "$PY" bench/bench_image.py --tiny --device cuda --posters 4 --steps 4 --repeats 2 \
  | tee "$OUT_DIR/image_tiny.md" || echo "bench_image: failed"
echo "results in $OUT_DIR"
