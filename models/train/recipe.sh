#!/usr/bin/env bash
# Train the shipped default model on a GPU machine. Run from the repository root with the
# system python3 (torch, tokenizers, numpy, safetensors); nothing is installed: modules run
# as `python3 -m models.train.*` (relative imports only, so no package mapping is needed).
#
#   bash models/train/recipe.sh data            # Python corpus from this interpreter + carried shards -> tokens
#   MINUTES=20 bash models/train/recipe.sh train   # detached (setsid nohup), survives the shell
#   bash models/train/recipe.sh watch           # last log lines, val losses, whether it runs
#   bash models/train/recipe.sh export DIR      # copy final weights, config, tokenizer, manifest
#   MINUTES=20 bash models/train/recipe.sh all  # data + train, both detached (log: $WORK/all.log)
#   bash models/train/recipe.sh distill TARGET  # distillation from a GGUF teacher (distill_recipe.sh)
#
# Inputs: models/default/tokenizer.json (in git) and the carried bundle $CARRY/shards/*.jsonl.xz
# (built by models/train/build_carry.sh). Everything else goes under $WORK (default .work).
set -euo pipefail
WORK=${WORK:-.work}
CARRY=${CARRY:-$WORK/carry}
RUN=${RUN:-$WORK/run}
MINUTES=${MINUTES:-20}
PRESET=${PRESET:-default}
TOKENIZER=${TOKENIZER:-models/default/tokenizer.json}
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1

case "${1:-}" in
data)
  if [ -f "$CARRY.tar" ]; then tar -xf "$CARRY.tar" -C "$(dirname "$CARRY")"; fi
  ls "$CARRY"/shards/*.jsonl.xz >/dev/null
  rm -rf "$WORK/corpus/python"
  python3 -m models.train.corpus python --out "$WORK/corpus/python"
  python3 -m models.train.corpus manifest "$WORK/corpus/python"
  python3 -m models.train.prepare --corpus "$WORK/corpus/python" "$CARRY/shards" \
    --tokenizer "$TOKENIZER" --out "$WORK/data"
  python3 -c "import json,sys; t=json.load(open(sys.argv[1]))['totals']; print(json.dumps({k: t[k] for k in ('files','bytes','tokens','share_by_lang','splits')}, indent=1))" "$WORK/data/manifest.json"
  ;;
train)
  NGPU=${NGPU:-$(python3 -c 'import torch; print(torch.cuda.device_count())')}
  mkdir -p "$RUN"
  setsid nohup torchrun --standalone --nproc_per_node "$NGPU" -m models.train.train \
    --data "$WORK/data" --out "$RUN" --preset "$PRESET" --minutes "$MINUTES" ${TRAIN_ARGS:-} \
    > "$RUN/stdout.log" 2>&1 < /dev/null &
  echo $! > "$RUN/pid"
  echo "started pid $(cat "$RUN/pid") on $NGPU GPU(s); log: $RUN/train_log.jsonl"
  ;;
all)  # data then train, all detached: survives the calling shell; watch with `watch`
  mkdir -p "$WORK"
  setsid nohup bash -c "bash '$0' data && bash '$0' train" > "$WORK/all.log" 2>&1 < /dev/null &
  echo "started; log: $WORK/all.log, then $RUN/train_log.jsonl"
  ;;
watch)
  tail -n 3 "$WORK/all.log" 2>/dev/null || true
  if kill -0 "$(cat "$RUN/pid")" 2>/dev/null; then echo running; else echo "not running"; fi
  grep -h '"schedule"' "$RUN/train_log.jsonl" 2>/dev/null | tail -1 || true
  grep -h val_loss "$RUN/train_log.jsonl" 2>/dev/null | tail -5 || true
  tail -n 3 "$RUN/train_log.jsonl" 2>/dev/null || true
  grep -iE "error|traceback" "$RUN/stdout.log" 2>/dev/null | tail -5 || true
  ;;
export)
  DEST=${2:?usage: recipe.sh export DIR}
  mkdir -p "$DEST"
  cp "$RUN/final.safetensors" "$RUN/config.json" "$RUN/tokenizer.json" "$RUN/train_log.jsonl" "$DEST/"
  cp "$WORK/data/manifest.json" "$WORK/data/meta.json" "$DEST/"
  ls -la "$DEST"
  ;;
distill)  # the distillation's targets (pieces, receive, data, start, watch, export): distill_recipe.sh
  shift
  exec bash "$(dirname "$0")/distill_recipe.sh" "$@"
  ;;
*)
  sed -n '2,14p' "$0"
  exit 2
  ;;
esac
