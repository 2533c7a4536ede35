#!/bin/bash
# The default SmolLM2 compress at an older commit and at the working tree, alternating (old,
# new, old, new, ...), so that both see the same machine: wall seconds and stage seconds.
#   bash benchmarks/alternate_commits.sh OLD_COMMIT [ROUNDS] [MODEL] [CALIBRATION]
# e.g. bash benchmarks/alternate_commits.sh 185cebe 2 /root/.cache/smollm2-135m \
#          /tmp/lowrank-debian-10000-12000.txt   (reports/speed.md, 2026-12-07)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
old=$1; rounds=${2:-2}
model=${3:-/root/.cache/smollm2-135m}; calibration=${4:-/tmp/lowrank-debian-10000-12000.txt}
work=$(mktemp -d)
trap 'git -C "$root" worktree remove --force "$work/old" >/dev/null 2>&1; rm -rf "$work"' EXIT
git -C "$root" worktree add -q --detach "$work/old" "$old"
cd "$work"  # not the repository: python -c puts the current directory first on sys.path
for i in $(seq "$rounds"); do
  for which in old new; do
    src=$root; [ "$which" = old ] && src=$work/old
    start=$(date +%s.%N)
    HF_HUB_OFFLINE=1 PYTHONPATH=$src "$root/.venv/bin/python" -c "import sys; \
sys.argv = ['lowrank', 'compress', '$model', '$work/out-$which-$i', '--param-ratio', '0.85', \
'--calibration', '$calibration', '--no-cache', '--json']; from lowrank.cli import main; main()" \
      > "$work/$which-$i.json" 2>/dev/null
    wall=$(echo "$(date +%s.%N) - $start" | bc)
    python3 -c "import json; print('$which', $i, 'wall', round($wall, 1), {s['stage']: s['seconds'] \
for s in json.load(open('$work/$which-$i.json'))['stages']})"
  done
done
