#!/usr/bin/env bash
# Refiner-ViT on 2 nodes x 8 GPUs with torchrun. Run it once on each node, with the same
# MASTER_ADDR (node 0's address, reachable from node 1) and NODE_RANK 0 on node 0, 1 on node 1:
#   MASTER_ADDR=10.0.0.1 NODE_RANK=0 scripts/torchrun_2x8.sh configs/imagenet/base.yaml \
#     configs/imagenet/refiner_vit_l.yaml --data.data_dir /path/to/imagenet
#   MASTER_ADDR=10.0.0.1 NODE_RANK=1 scripts/torchrun_2x8.sh configs/imagenet/base.yaml \
#     configs/imagenet/refiner_vit_l.yaml --data.data_dir /path/to/imagenet
# torchrun starts NPROC_PER_NODE (8) processes per node and Lightning reads the ranks from its
# environment (TorchElasticEnvironment). The leading .yaml arguments are the configs, in order;
# the rest go to `cli.py fit` after configs/trainer/ddp_2x8_bf16.yaml. Optional: MASTER_PORT (29500),
# PYTHON (python). Both nodes must see the same files (code, data, runs/).
set -euo pipefail
usage="usage: MASTER_ADDR=... NODE_RANK=0|1 $0 CONFIG.yaml... [cli.py fit options]"
: "${MASTER_ADDR:?$usage}"
: "${NODE_RANK:?$usage}"
configs=()
while [[ $# -gt 0 && $1 == *.yaml ]]; do configs+=(--config "$1"); shift; done
(( ${#configs[@]} )) || { echo "$usage" >&2; exit 2; }
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
exec "${PYTHON:-python}" -m torch.distributed.run \
  --nnodes 2 --node_rank "$NODE_RANK" --nproc_per_node "${NPROC_PER_NODE:-8}" \
  --master_addr "$MASTER_ADDR" --master_port "${MASTER_PORT:-29500}" \
  "$repo/cli.py" fit "${configs[@]}" --trainer "$repo/configs/trainer/ddp_2x8_bf16.yaml" "$@"
