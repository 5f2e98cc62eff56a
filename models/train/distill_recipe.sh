#!/usr/bin/env bash
# Distil Qwen2.5-Coder-0.5B (a GGUF) into the student (models/train/distill.py) on one GPU.
# Run from the repository root with the machine's python3 (torch, tokenizers, numpy,
# safetensors, pyyaml); nothing is installed: `gguf` comes carried in $WORK/pydeps when absent.
#
# Here (where the GGUF is):
#   bash models/train/distill_recipe.sh pieces GGUF        # .work/teacher/part-NN (<= 56 MiB) + SHA256, .work/pydeps/gguf
# There (one call per piece, each carrying .work/teacher/part-NN; the first also SHA256 and .work/pydeps):
#   bash models/train/distill_recipe.sh receive             # moves carried pieces to $TEACHER_DIR (/tmp/teacher)
#   bash models/train/distill_recipe.sh data                # detached: tokenizer from part-00, Python corpus, tokens
#   MINUTES=8 bash models/train/distill_recipe.sh start     # detached: join + check the teacher, wait for the data,
#                                                           #   prune, distil; BASELINE=1 also the no-teacher run
#   bash models/train/distill_recipe.sh watch               # progress of data, distillation, baseline
#   bash models/train/distill_recipe.sh export [distill|baseline|float]   # pieces (<= 15 MiB) under $OUT
# TINY=1 (any target): 2 MB of corpus, a tiny student, CPU-sized batches: the dry run, with the
# teacher from `tiny-teacher PATH.gguf` (see models/train/README.md).
set -euo pipefail
WORK=${WORK:-.work}
TEACHER_DIR=${TEACHER_DIR:-/tmp/teacher}
TEACHER=${TEACHER:-$WORK/teacher.gguf}
DATA=${DATA:-$WORK/qdata}
RUN=${RUN:-$WORK/distill}
BASE=${BASE:-$WORK/baseline}
MINUTES=${MINUTES:-7}
SHAPE=${SHAPE:-d768-L8-F1536-r128}
DISTILL_ARGS=${DISTILL_ARGS:-}
PY=${PY:-python3}
export PYTHONUNBUFFERED=1
if [ -d "$WORK/pydeps" ]; then export PYTHONPATH="$WORK/pydeps${PYTHONPATH:+:$PYTHONPATH}"; fi
if [ "${TINY:-0}" = 1 ]; then
  SHAPE=${TINY_SHAPE:-L2-F64-r16}
  CORPUS_ARGS="--max-bytes 2000000"
  SIZES="--seq-len 128 --batch-size 4 --micro-batch 2 --workers 0 --eval-every 5 --eval-batches 2 --log-every 1
         --save-every 5 --warmup-steps 2 --loss-chunk 256 --top-k 16 --calibration-rows 4 --measure-steps 3 --no-compile"
else
  CORPUS_ARGS=""
  SIZES="--seq-len 2048 --batch-size 32 --micro-batch 16 --workers 6 --eval-every 250 --eval-batches 4
         --save-every 500 --warmup-steps 100 --loss-chunk 4096 --top-k 64 --calibration-rows 32"
fi

case "${1:-}" in
tiny-teacher)  # the dry run's teacher: a Qwen2-shaped GGUF of random weights (needs gguf)
  $PY -c "import sys; from models.testing import write_tiny_qwen_gguf; write_tiny_qwen_gguf(sys.argv[1], dim=64, n_layers=4)" \
    "${2:?usage: distill_recipe.sh tiny-teacher PATH.gguf}"
  ;;
pieces)  # here: the teacher in carryable pieces, its checksum, and the gguf package
  GGUF=${2:?usage: distill_recipe.sh pieces GGUF}
  mkdir -p "$WORK/teacher" "$WORK/pydeps"
  rm -f "$WORK"/teacher/part-*
  split -b "${PIECE:-56M}" -d -a 2 "$GGUF" "$WORK/teacher/part-"
  (cd "$(dirname "$GGUF")" && sha256sum "$(basename "$GGUF")") | awk '{print $1}' > "$WORK/teacher/SHA256"
  GGUF_PKG=$($PY -c 'import gguf, os; print(os.path.dirname(gguf.__file__))')
  rm -rf "$WORK/pydeps/gguf" && cp -r "$GGUF_PKG" "$WORK/pydeps/gguf" && rm -rf "$WORK/pydeps/gguf/__pycache__"
  ls -la "$WORK/teacher" && du -sh "$WORK/pydeps"
  ;;
receive)  # there: carried pieces out of the working tree, into $TEACHER_DIR
  mkdir -p "$TEACHER_DIR"
  for f in "$WORK"/teacher/part-* "$WORK"/teacher/SHA256; do [ -f "$f" ] && mv "$f" "$TEACHER_DIR/"; done
  ls -la "$TEACHER_DIR"
  ;;
data)  # detached: tokenizer.json from the first piece's header, the Python corpus, tokens
  mkdir -p "$WORK"
  setsid nohup bash -c "bash '$0' data-now" > "$WORK/data.log" 2>&1 < /dev/null &
  echo "data: started; log $WORK/data.log"
  ;;
data-now)
  rm -f "$DATA.done"
  FIRST=$(ls "$TEACHER_DIR"/part-00 2>/dev/null || echo "$TEACHER")
  mkdir -p "$DATA"
  $PY -m models.train.tokenizer from-gguf "$FIRST" --out "$WORK/qwen-tokenizer.json" > /dev/null
  rm -rf "$WORK/corpus/python"
  $PY -m models.train.corpus python --out "$WORK/corpus/python" $CORPUS_ARGS
  $PY -m models.train.corpus manifest "$WORK/corpus/python"
  $PY -m models.train.prepare --corpus "$WORK/corpus/python" --tokenizer "$WORK/qwen-tokenizer.json" --out "$DATA" \
    > "$DATA.meta.log"
  $PY -c "import json,sys; t=json.load(open(sys.argv[1]))['totals']; print(json.dumps({k: t[k] for k in ('files','bytes','tokens','splits')}))" "$DATA/manifest.json"
  touch "$DATA.done"
  ;;
teacher)  # the pieces joined and checked (once)
  if [ ! -f "$TEACHER" ]; then
    cat "$TEACHER_DIR"/part-* > "$TEACHER.tmp"
    echo "$(cat "$TEACHER_DIR/SHA256")  $TEACHER.tmp" | sha256sum -c - >/dev/null
    mv "$TEACHER.tmp" "$TEACHER"
  fi
  echo "teacher: $TEACHER ($(stat -c %s "$TEACHER") bytes, sha256 checked)"
  ;;
start)  # detached: teacher, data, prune + distil; with BASELINE=1 the no-teacher run beside it
  mkdir -p "$RUN"
  setsid nohup bash -c "bash '$0' start-now" > "$RUN/job.log" 2>&1 < /dev/null &
  echo "start: job $! ; log $RUN/job.log, then $RUN/train_log.jsonl"
  ;;
start-now)
  bash "$0" teacher
  while [ ! -f "$DATA.done" ]; do sleep 5; done
  $PY -m models.train.distill --data "$DATA" --out "$RUN" --teacher "$TEACHER" --init "$RUN/student-init" \
    --init-shape "$SHAPE" --minutes "$MINUTES" $SIZES $DISTILL_ARGS > "$RUN/stdout.log" 2>&1 &
  echo $! > "$RUN/pid"
  if [ "${BASELINE:-0}" = 1 ]; then
    while [ ! -f "$RUN/student-init/prune.json" ] && kill -0 "$(cat "$RUN/pid")" 2>/dev/null; do sleep 5; done
    mkdir -p "$BASE"
    $PY -m models.train.distill --data "$DATA" --out "$BASE" --init "$RUN/student-init" --baseline \
      --follow "$RUN/train_log.jsonl" --minutes "$MINUTES" $SIZES $DISTILL_ARGS > "$BASE/stdout.log" 2>&1 &
    echo $! > "$BASE/pid"
  fi
  wait
  echo "start-now: done"
  ;;
watch)
  tail -n 2 "$WORK/data.log" 2>/dev/null || true
  [ -f "$DATA.done" ] && echo "data: ready" || echo "data: not ready"
  tail -n 3 "$RUN/job.log" 2>/dev/null || true
  for dir in "$RUN" "$BASE"; do
    [ -d "$dir" ] || continue
    if [ -f "$dir/pid" ] && kill -0 "$(cat "$dir/pid")" 2>/dev/null; then echo "$dir: running"; else echo "$dir: not running"; fi
    grep -h '"init"\|"schedule"' "$dir/train_log.jsonl" 2>/dev/null | cut -c1-400 || true
    grep -h val_loss "$dir/train_log.jsonl" 2>/dev/null | tail -3 || true
    tail -n 2 "$dir/train_log.jsonl" 2>/dev/null || true
    grep -iE "error|traceback" "$dir/stdout.log" 2>/dev/null | tail -5 || true
  done
  nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader 2>/dev/null || true
  ;;
export)  # pieces of at most 15 MiB (a call brings back 8 files of 16 MiB at most) under $OUT
  WHICH=${2:-distill}
  DEST=${OUT:?OUT: the folder whose files come back}
  case "$WHICH" in  # the bf16 folder is ~126 MB: 8 pieces of 15.9 MiB, no logs (the int8 tar has them)
  distill) SRC=$RUN PREC=int8 PIECE_ARGS="--piece-mib 15" ;;
  baseline) SRC=$BASE PREC=int8 PIECE_ARGS="--piece-mib 15" ;;
  float) SRC=$RUN PREC=bf16 PIECE_ARGS="--piece-mib 15.9 --no-logs" ;;
  *) echo "export distill|baseline|float" >&2; exit 2 ;;
  esac
  cp "$DATA/manifest.json" "$SRC/manifest.json"
  [ -f "$RUN/student-init/prune.json" ] && cp "$RUN/student-init/prune.json" "$SRC/prune.json"
  $PY -m models.train.export --run "$SRC" --out "$WORK/export/$WHICH" --precision "$PREC" --pieces "$DEST" \
    --name "student-$WHICH" $PIECE_ARGS
  ls -la "$DEST"
  ;;
*)
  sed -n '2,18p' "$0"
  exit 2
  ;;
esac
