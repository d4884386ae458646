#!/usr/bin/env bash
# Rebuild the tiny scene model from scratch with `goflow-gpu dev train-tiny` alone.
#
#   scripts/rebuild-scene-model.sh OUT [TRAIN-TINY OPTIONS...]
#   scripts/rebuild-scene-model.sh rebuild --device cuda     # minutes on a GPU node
#
# Each stage is one train-tiny command that continues from the stage before (--continue-from),
# so the last folder's training.json holds every command that made it, down to random weights.
# Extra options (--device cuda) go to every stage. OUT/<stage>/.stage-command holds the command
# a stage finished with: run the script again after a stop and it goes on at the first stage not
# finished with that exact command; every stage after one that ran runs again. Give OUT as a
# relative path: the commands are recorded, and a shipped record should not name your machine.
#
# The stages are a curriculum (PROMPTS.md, "The trained tiny model"): one shape per scene first
# (the colour is learned within ~750 steps, the kind of shape later), then two, then the
# simulator's one to three; then the recipe of run16, the weights shipped before this rebuild
# (more object-detection, a stronger layout loss). Each prints held-out grades as it goes; the
# last folder is the model (2026-12-01: 167 minutes on 2 cores, and the shipped folder is its
# s5): `goflow-gpu demo --model OUT/s5 --media 24` grades it through vLLM.
set -euo pipefail

out=${1:?usage: scripts/rebuild-scene-model.sh OUT [TRAIN-TINY OPTIONS...]}
shift
extra=("$@")
train=(${GOFLOW_GPU:-goflow-gpu} dev train-tiny)
mix=(--mix object-detection=0.7 --mix text-recognition=0.25 --mix people-count=0.05)
gentle=(--lr 1e-3 --warmup 10)

ran=0
stage() {
  local name=$1
  shift
  local dir="$out/$name"
  local run=("${train[@]}" "$dir" "$@" "${extra[@]}")
  local command="${run[*]}"
  if [[ $ran == 0 && -f "$dir/.stage-command" && "$(cat "$dir/.stage-command")" == "$command" ]]; then
    echo "rebuild: $name already done ($dir)"
    return
  fi
  echo "rebuild: $name: $command"
  rm -f "$dir/.stage-command"
  "${run[@]}"
  echo "$command" > "$dir/.stage-command"
  ran=1
}

stage s1 --shapes 1-1 --steps 1000 --eval-every 500
stage s2 --continue-from "$out/s1" --shapes 1-1 --steps 1000 --eval-every 500 "${gentle[@]}" "${mix[@]}"
stage s3 --continue-from "$out/s2" --shapes 1-2 --steps 600 --eval-every 300 "${gentle[@]}" "${mix[@]}"
stage s4 --continue-from "$out/s3" --steps 1700 --eval-every 425 "${gentle[@]}" "${mix[@]}"
stage s5 --continue-from "$out/s4" --steps 1200 --eval-every 400 "${gentle[@]}" \
  --mix object-detection=0.85 --mix text-recognition=0.1 --mix people-count=0.05 --layout-weight 0.4
echo "rebuild: done; the model is $out/s5 (goflow-gpu demo --model $out/s5 --media 24 grades it)"
