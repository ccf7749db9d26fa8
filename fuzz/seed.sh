#!/bin/sh
# Regenerates the committed seed corpora fuzz/seeds/<target>/ for every target from the
# repository's known-answer vectors (tests/vectors), plus hand-built op sequences for the
# structured targets (disco_parse mode 1, relay_packet, relay_client). fuzz/run.sh copies them into corpus/.
# Usage: fuzz/seed.sh   (run from anywhere; needs python3 and the zstd CLI)
set -eu
here=$(cd "$(dirname "$0")" && pwd)
vectors="$here/../tests/vectors"
python3 "$here/seeds.py" "$here" "$vectors"
echo "seeded $here/seeds"
