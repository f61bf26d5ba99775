#!/usr/bin/env bash
# The closed-loop experiment (issue 16), one command, every stage resumable: rerun it after a kill
# and each stage goes on where it stopped (a finished stage is skipped).
#
#   bash experiments/closed_loop/run.sh [TASKS] [STEPS]       # TASKS: LIBERO-Spatial indices, default "0"
#   EPISODES=100 NOISE=0.5 bash experiments/closed_loop/run.sh  # the recording's size and perturbation (defaults)
#
# 1. record EPISODES successful scripted demonstrations per task on placements drawn by LIBERO's own
#    sampler (never the suite's fixed initial states), the executed motion perturbed by slowly varying
#    noise of std NOISE while the labels stay the controller's clean commands (demonstrations of how to
#    get back on course) -> data/closed_loop (+ tokenizer, norm stats)
# 2. train the both-camera policy from scratch (--preset closed_loop) -> outputs/pi05_libero_closed_loop
# 3. evaluate it on the suite's fixed initial states, 50 episodes per task, openpi's protocol
# 4. the report's question at this scale: B1 (agentview zeroed) and B2 (agentview removed), same recipe,
#    evaluated with the agentview removed (B1: --eval-view deployed, i.e. zeros as a robot without it gives)
set -euo pipefail
cd "$(dirname "$0")/../.."
TASKS="${1:-0}"
STEPS="${2:-3000}"
EPISODES="${EPISODES:-100}"
NOISE="${NOISE:-0.5}"
export MUJOCO_GL="${MUJOCO_GL:-egl}"
DATA=data/closed_loop
OUT=experiments/closed_loop
IFS=, read -ra TASK_LIST <<< "$TASKS"
N=$((50 * ${#TASK_LIST[@]}))

resume_flag() { [ -e "$1" ] && echo --resume || true; }

# 1. record (successful episodes only; ~1-3 min an attempt on a 2-core CPU, 2 simulator processes)
python -m eqx_pi05.eval.record "$DATA" --tasks ${TASKS//,/ } --episodes-per-task "$EPISODES" --workers 2 \
  --action-noise "$NOISE" \
  $(resume_flag "$DATA/recording/manifest.json")

for variant in pi05_libero wristonly_zero wristonly_physdrop; do
  run=outputs/${variant}_closed_loop
  # 2. train (resumable: checkpoints every 250 steps)
  python train.py --variant "$variant" --preset closed_loop --num-train-steps "$STEPS" \
    $(resume_flag "$run/checkpoints")
  # keep the loss curve beside the evaluation: outputs/ is scratch space that a new machine may not have
  mkdir -p "$OUT/eval_${variant}" && cp "$run/metrics.jsonl" "$OUT/eval_${variant}/train_metrics.jsonl"
  # 3. evaluate on the fixed initial states of the recorded tasks (resumes from episodes.jsonl)
  python evaluate.py --checkpoint "$run" --tasks "$TASKS" --n "$N" --num-envs 2 --output-dir "$OUT/eval_${variant}"
done
python -m eqx_pi05.eval.report "$OUT"/eval_{pi05_libero,wristonly_zero,wristonly_physdrop} --output "$OUT/results_table"  # .md and .png
cat "$OUT/results_table.md"
