#!/usr/bin/env bash
# The SmolLM2-135M-Instruct study (issue 10), one recipe at a time, seed by seed:
#   1. `thinkrl sweep` of the recipe for that seed, followed by its compute-matched no-thought LM baseline;
#   2. `thinkrl eval` of both final checkpoints on the recipe's held-out slice (thought run: no thought, the null
#      thought and K sampled thoughts; baseline: no thought);
# then, over every seed evaluated in the output folder so far, the sweep's study (training curves, in-training
# evaluations) and `thinkrl aggregate` of the evaluations (mean ± sd over seeds, pooled intervals over items, the
# compute-matched comparison, the thoughts that helped and hurt most). Every stage resumes: rerun the same command
# after a stop and finished work is kept; a seed is evaluated as soon as it is trained, so a stop mid-study still
# leaves whole seeds.
#
#   scripts/study_smollm2.sh a            # thoughts before GSM8K answers    (configs/smollm2/study_a_gsm8k.yaml)
#   scripts/study_smollm2.sh b            # thoughts that must carry text    (configs/smollm2/study_b_wikitext.yaml)
#   scripts/study_smollm2.sh c            # the Quiet-STaR setting            (configs/smollm2/study_c_quiet_star.yaml)
#   scripts/study_smollm2.sh d            # (b) from an LM-adapted start      (configs/smollm2/study_d_wikitext.yaml)
#   SEEDS=0 OUT=runs/try scripts/study_smollm2.sh a   # another seed list or output folder
set -euo pipefail
cd "$(dirname "$0")/.."
THINKRL=${THINKRL:-$( [ -x .venv/bin/thinkrl ] && echo .venv/bin/thinkrl || echo thinkrl )}
SEEDS=${SEEDS:-0,1,2}
case "${1:-}" in
  a) config=configs/smollm2/study_a_gsm8k.yaml; task=gsm8k; limit=300; k=4 ;;
  b) config=configs/smollm2/study_b_wikitext.yaml; task=text; limit=256; k=4 ;;
  c) config=configs/smollm2/study_c_quiet_star.yaml; task=text; limit=508; k=2 ;;
  d) config=configs/smollm2/study_d_wikitext.yaml; task=text; limit=256; k=4 ;;
  *) echo "usage: scripts/study_smollm2.sh a|b|c|d   (SEEDS=0,1,2 OUT=runs/study-smollm2-<recipe>)" >&2; exit 2 ;;
esac
out=${OUT:-runs/study-smollm2-$1}
if [ "$1" = d ]; then
  # Stage 1: LM adaptation until the held-out NLL is flat (the rule is in study_d_adapt.yaml); both arms start there;
  # then the upper bound (all 256 tokens, no thought) and the copy gauge's chance level (untrained thoughts). These
  # live beside the sweep's folder (<out>-start), which the sweep owns alone.
  start="$out-start"
  PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
  THINKRL="$THINKRL" "$PYTHON" scripts/adapt_until_flat.py \
    --config configs/smollm2/study_d_adapt.yaml --out "$start/adapt"
  config_d=("model.init_from=$start/adapt")
  [ -f "$start/upper_bound/results.json" ] || "$THINKRL" eval --config "$config" --task "$task" --limit "$limit" \
    --no-generate --thoughts none --output "$start/upper_bound" "${config_d[@]}" data.interpreter_window=0
  [ -f "$start/untrained/results.json" ] || "$THINKRL" eval --config "$config" --task "$task" --limit "$limit" \
    --no-generate --thoughts "none,null,sampled:$k" --output "$start/untrained" "${config_d[@]}"
else
  config_d=()
fi

for seed in ${SEEDS//,/ }; do
  "$THINKRL" sweep --config "$config" --seeds "$seed" --compute-matched-baseline --out "$out" "${config_d[@]}"
  "$THINKRL" eval --model "$out/seed-$seed" --task "$task" --limit "$limit" --no-generate \
    --thoughts "none,null,sampled:$k" --output "$out/eval/thoughts/seed-$seed"
  "$THINKRL" eval --model "$out/baseline/seed-$seed" --task "$task" --limit "$limit" --no-generate \
    --thoughts none --output "$out/eval/baseline/seed-$seed"
done
# The study covers every seed evaluated in $out so far, not only this call's SEEDS (SEEDS=2 adds seed 2 to 0 and 1).
done_seeds=$(for f in "$out"/eval/baseline/seed-*/results.json; do basename "$(dirname "$f")"; done |
  sed 's/^seed-//' | sort -n)
evals=()
for seed in $done_seeds; do evals+=("$out/eval/thoughts/seed-$seed" "$out/eval/baseline/seed-$seed"); done
"$THINKRL" sweep --config "$config" --seeds "$(echo $done_seeds | tr ' ' ,)" --compute-matched-baseline --out "$out" \
  "${config_d[@]}"
"$THINKRL" aggregate "${evals[@]}" --out "$out/eval/study"
