#!/usr/bin/env bash
# Render thinkrl's HTML pages in headless Chromium, to look at the screenshots (a check for people, not for CI).
#   bash scripts/check_html.sh PAGE.html [PAGE.html ...]        # writes PAGE.png beside each page (or into $SHOTS)
#   bash scripts/check_html.sh --demo OUT                        # runs a small comparison and an evaluation, then renders
# --demo: `thinkrl prompts compare` of 4 templates on 24 GSM8K items and `thinkrl eval` on 20 items, with a random
# scratch model that reads SmolLM2's tokenizer (real words, fast on CPU; SmolLM2 itself is slow at 24 items × 4).
# Chromium comes from Debian's packages: apt-get install -y chromium (the pages are self-contained: no network).
set -euo pipefail
cd "$(dirname "$0")/.."
browser=$(command -v chromium || command -v chromium-browser || true)
[ -n "$browser" ] || { echo "no chromium: apt-get install -y chromium" >&2; exit 2; }
size=${WINDOW_SIZE:-1400,2000}
if [ "${1:-}" = "--demo" ]; then
    out=${2:?--demo needs an output folder}
    tok=$(.venv/bin/python -c 'from thinkrl.models.smollm2 import smollm2_folder; print(smollm2_folder())')
    scratch=(model.default.path=scratch "model.tokenizer=$tok" "model.weight_groups=[A,A,A]" "model.freeze=[]"
        head.form=none data.interpreter_window=0 rollout.max_thought_len=40 trainer.report_to=none)
    export HF_HUB_OFFLINE=1
    .venv/bin/thinkrl prompts compare thinking/plain thinking/system thinking/chat thinking/fewshot \
        --config configs/default.yaml --task gsm8k --limit 24 --seed 0 --thoughts null,sampled:3 --max-new-tokens 6 \
        --output "$out/compare" "${scratch[@]}"
    .venv/bin/thinkrl eval --config configs/default.yaml --task gsm8k --limit 20 --seed 0 \
        --thoughts none,null,sampled:3 --max-new-tokens 6 --output "$out/eval" "${scratch[@]}"
    set -- "$out/compare/compare.html" "$out/eval/report.html"
fi
for page in "$@"; do
    page=$(realpath "$page")
    shot=${SHOTS:+$SHOTS/}$(basename "${page%.html}").png
    [ -n "${SHOTS:-}" ] || shot=${page%.html}.png
    timeout 120 "$browser" --headless --no-sandbox --disable-gpu --hide-scrollbars --screenshot="$shot" \
        --window-size="$size" "file://$page" 2>/dev/null
    echo "$page -> $shot"
    if [ "$(basename "$page")" = compare.html ]; then  # the item table scrolled: its header must stay on top
        scrolled=$(mktemp --suffix=.html)
        sed -e "s#</style></head><body>#</style></head><body><div id=sc style='height:1150px;overflow:auto'>#" \
            -e "s#</body></html>#</div><script>sc.scrollTop = 4000</script></body></html>#" "$page" > "$scrolled"
        timeout 120 "$browser" --headless --no-sandbox --disable-gpu --hide-scrollbars --virtual-time-budget=3000 \
            --screenshot="${shot%.png}-scrolled.png" --window-size=1400,1200 "file://$scrolled" 2>/dev/null
        rm -f "$scrolled"
        echo "$page (scrolled) -> ${shot%.png}-scrolled.png"
    fi
done
