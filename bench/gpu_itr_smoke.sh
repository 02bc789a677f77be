#!/usr/bin/env bash
# Seed 004 on a GPU, once: train.py --task itr (frozen and --lora) and eval.py --itr_dataset on the tiny model with
# --device cuda (CPU tests never put the heads, the ITM sampler or the LoRA path on a CUDA device).
# Usage on the device machine: bash bench/gpu_itr_smoke.sh OUT_DIR [DEVICE]
set -euo pipefail
out=${1:-outputs/gpu_itr_smoke}; dev=${2:-cuda}
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
python3 -m colintern.testing.tiny "$out/tiny" > /dev/null
python3 -m colintern.itr.scenes "$out/scenes" --n_train 256 --n_eval 16
common=(--task itr --model_id "$out/tiny" --train_itr "$out/scenes/train/itr.jsonl" --dim 64 --fusion_dim 64
        --image_size 224 --max_tiles 4 --batch_size 32 --lr 1e-3 --device "$dev")
python3 train.py "${common[@]}" --out_dir "$out/single" --stage single --epochs 2
python3 train.py "${common[@]}" --out_dir "$out/lora" --stage single --epochs 1 --lora
for run in single lora; do
  python3 eval.py --ckpt "$out/$run/colintern_heads_epoch$([ $run = single ] && echo 2 || echo 1).pt" \
      --model_id "$out/tiny" --itr_dataset "$out/scenes/eval" --itm_rerank 4 --out_dir "$out/eval" \
      --run_name "$run" --device "$dev"
done
