#!/usr/bin/env bash
# Re-runs every benchmark quoted in the README; outputs go to benchmarks/results/*.txt.
set -uo pipefail
cd "$(dirname "$0")/.."
mkdir -p benchmarks/results
run() { local name="$1"; shift; echo "== $name: $*"; { date -u; "$@"; } > "benchmarks/results/$name.txt" 2>&1; tail -3 "benchmarks/results/$name.txt"; }
run practical python benchmarks/bench_practical.py
# scripts that write their own result file (--out) run as "own NAME ...": their console output goes to a log
own() { local name="$1"; shift; echo "== $name: $*"; "$@" > "benchmarks/results/$name.log" 2>&1; tail -3 "benchmarks/results/$name.log"; }
own certified python benchmarks/bench_certified.py --threads 1 --repeats 3
own certified_mlp python benchmarks/bench_certified.py --threads 1 --repeats 3 --model mlp --append
own alpha     python benchmarks/bench_alpha.py
own objectives python benchmarks/bench_objectives.py
run attacks   python benchmarks/bench_attacks.py
run campaign  python benchmarks/bench_campaign.py
run trainers  python benchmarks/bench_trainers.py --out benchmarks/results/trainers.md
run train     python benchmarks/bench_train.py --models cnn-small --epochs 3
run complete  python benchmarks/bench_complete.py --per-config 5 --certified --hard
own complete_mnist python benchmarks/bench_complete_mnist.py --fresh --nets mlp,cnn --norms inf,2 --eps-inf 0.002,0.005 --eps-2 0.03 --budgets 1,10,60 --images 8
own complete_input python benchmarks/bench_complete_input.py
own complete_beta python benchmarks/bench_complete_beta.py --per-config 3 --hard --mnist
own complete_maxpool python benchmarks/bench_complete_maxpool.py --eps 0.01 0.03 0.05
run certtrain python benchmarks/bench_certtrain.py --out benchmarks/results/certtrain.md
# the demo (issue 11): both nets, l_inf and l_2, every bound vs the attacks on the function it bounds;
# compare table and times in benchmarks/results/demo.txt; models, store and report (index.html) in
# ${TMPDIR:-/tmp}/certattr-demo-bench (a fresh run: the folder is removed first)
run demo      bash -c 'd="${TMPDIR:-/tmp}/certattr-demo-bench"; rm -rf "$d"; time certattr demo --out "$d" --no-progress'
# the radius sweep behind the demo's radii, on the demo's two models
run radius_sweep python benchmarks/bench_radius_sweep.py --models "${TMPDIR:-/tmp}/certattr-demo-bench"
