#!/usr/bin/env bash
# Mutation testing of one module with the test files that exercise it (mutmut 3).
#
#   pip install mutmut
#   bash benchmarks/mutation.sh ics_toolkit/moments.py tests/test_bounding.py \
#       tests/test_extreme_scales.py tests/test_precision.py tests/test_speed_paths.py \
#       tests/test_precision_formulas.py
#
#   FUNCTIONS="_u3_float32_sums _best_axis" bash benchmarks/mutation.sh ics_toolkit/bounding.py ...
#   FUNCTIONS="_hadamard_rows _KeptCoordinates.plan" bash benchmarks/mutation.sh ics_toolkit/sketch.py ...
#
# Works in a fresh clone of this checkout under a temporary folder (mutmut rewrites the
# package into mutants/ there; nothing here changes), mutates only the given module and
# prints each surviving mutant's diff: a survivor is a change of the formula code no test
# notices (or a change that does not matter: speed-only buffers, error messages).
set -euo pipefail
module=${1:?usage: mutation.sh MODULE.py TEST_FILE...}
shift
[ "$#" -gt 0 ] || { echo "name the test files that exercise $module" >&2; exit 2; }
command -v mutmut >/dev/null || { echo "mutmut not found: pip install mutmut" >&2; exit 2; }
here=$(git rev-parse --show-toplevel)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
git clone -q "$here" "$work/repo"
# uncommitted changes of the module and the tests count too
cp "$here/$module" "$work/repo/$module"
for t in "$@"; do cp "$here/$t" "$work/repo/$t"; done
cd "$work/repo"
tests=$(printf '"%s", ' "$@")
cat >> pyproject.toml <<EOF

[tool.mutmut]
source_paths = ["ics_toolkit"]
also_copy = ["ics_toolkit"]
tests_dir = [${tests%, }]
pytest_add_cli_args = ["-p", "no:cacheprovider"]
EOF
pattern=$(echo "${module%.py}" | tr / .)
# FUNCTIONS="_u3_float32_sums _best_axis" limits the run to those functions of the module
targets=("${pattern}*")
if [ -n "${FUNCTIONS:-}" ]; then
    targets=()
    for f in $FUNCTIONS; do
        if [[ $f == *.* ]]; then  # Class.method: mutmut names it xǁClassǁmethod
            targets+=("${pattern}.xǁ${f%%.*}ǁ${f#*.}__mutmut_*")
        else
            targets+=("${pattern}.x_${f}__mutmut_*")
        fi
    done
fi
mutmut run --max-children "$(nproc)" "${targets[@]}" > mutmut.log 2>&1 || true
results=$(mutmut results --all true 2>/dev/null | grep "^ *${pattern}\." | grep -v "not checked" || true)
echo "$module:" $(echo "$results" | awk -F': ' '{print $2}' | sort | uniq -c | tr '\n' ' ')
echo "$results" | grep ": survived" | sed 's/: survived//' | while read -r name; do
    echo "--- $name"
    mutmut show "$name" 2>/dev/null | grep '^[-+] ' || true
done
