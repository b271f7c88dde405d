#!/usr/bin/env bash
# Mutation testing (mutmut) of the math, metrics, partition and audit modules; outside CI.
#
#   tests/mutation/run.sh                      # every module, then the list of survivors
#   tests/mutation/run.sh 'fedcl.engine.audit*'  # one module (mutmut's mutant-name globs)
#   tests/mutation/run.sh results | show NAME  # any other mutmut command, on the last run
#
# Needs `pip install -e ".[mutation]"`. The config is `[tool.mutmut]` in pyproject.toml; its paths
# are those of the staged tree built here. mutmut names a mutant after its file's path, but
# strategies/ is installed as fedcl.strategies, so the sources are staged in the installed layout
# (fedcl/ with strategies/ as fedcl/strategies/) in .mutation/ (git-ignored) and mutmut runs
# there: the checkout's sources are never touched. Every run starts from a fresh mutants/ folder.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
work="$repo/.mutation"

case "${1:-run}" in
    run) shift $(($# > 0)) ;;
    results | show | browse | tests-for-mutant | export-cicd-stats)
        cd "$work"  # read the last run
        exec mutmut "$@"
        ;;
esac

rm -rf "$work"
mkdir -p "$work"
cp -R "$repo/fedcl" "$work/fedcl"
cp -R "$repo/strategies" "$work/fedcl/strategies"
cp -R "$repo/tests" "$work/tests"
cp "$repo/pyproject.toml" "$work/"
find "$work" -name __pycache__ -prune -exec rm -rf {} +

cd "$work"
# One BLAS/OpenMP thread per test process: mutmut forks one per mutant, two at a time.
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1
nice -n 19 mutmut run --max-children "${MUTMUT_CHILDREN:-2}" "$@"
mutmut results
