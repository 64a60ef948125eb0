#!/usr/bin/env bash
# Regenerate every committed figure in benchmarks/results/ (about 10 minutes on a 2-core machine).
# Run from the repository root in the dev install: bash benchmarks/reproduce.sh
set -euo pipefail
cd "$(dirname "$0")/.."

edgecut partition efficientnet-lite0 -o bundles/effl0 --calibrate builtin --force
PHOTO="$(python -c 'import os, skimage.data as d; print(os.path.join(os.path.dirname(d.__file__), "chelsea.png"))')"
edgecut profile bundles/effl0 --threads 1 --codec int8,int4,pca4,jpeg90,png,webp75 --image "$PHOTO" \
    --device-name this-machine-1t --runs 50 --out benchmarks/profiles/this-machine-1t.json
# The Pi-class device (pi4-scaled-5x.json) keeps its segment times: one core here on 2026-11-25 x 5.
# It was made once with: edgecut profile ... --scale 5 --device-name pi4-scaled-5x --source "...".
# Its codec times follow the fresh measurement, by the Pi-class/this-machine ratio of the model:
python benchmarks/pi_codecs.py benchmarks/profiles/this-machine-1t.json \
    --profile benchmarks/profiles/pi4-scaled-5x.json
edgecut partition efficientnet-lite2 -o bundles/effl2 --calibrate builtin --force
edgecut profile bundles/effl2 --threads 1 --codec int8,int4,jpeg90 --device-name this-machine-1t-loaded \
    --runs 40 --out benchmarks/profiles/effl2-this-machine-1t-loaded.json
python benchmarks/lite2_profile.py benchmarks/profiles/effl2-this-machine-1t-loaded.json \
    --out benchmarks/profiles/effl2-pi4-scaled.json
# The sweeps as committed (each results.json records its exact command): the shipped agent on
# --cut auto after 20 untimed inputs of its own per link, a planner (true link) row, order shuffled
# per round, 3 untimed requests per run.
SWEEP="--bandwidth 0.5mbit,2mbit,8mbit,32mbit,128mbit --rtt 5ms,40ms --codec int8,pca4 --cuts c03,c05,c07,c10 \
    --requests 10 --warmup 3 --auto-warmup 20 --edge-threads 1 --server-threads 1"
edgecut bench sweep bundles/effl0 $SWEEP --edge-profile benchmarks/profiles/pi4-scaled-5x.json --pace \
    --out benchmarks/results/effl0/pi4-scaled-5x
edgecut bench sweep bundles/effl0 $SWEEP --min-cut c01 --edge-profile benchmarks/profiles/pi4-scaled-5x.json --pace \
    --out benchmarks/results/effl0/pi4-scaled-5x-private
# Unpaced fast edge (live edge compute).
edgecut bench sweep bundles/effl0 $SWEEP --edge-profile benchmarks/profiles/this-machine-1t.json \
    --out benchmarks/results/effl0/this-machine-1t
python benchmarks/codec_fidelity.py
python benchmarks/int8_heads.py --bundle bundles/effl0
python benchmarks/netem_validate.py
python benchmarks/edge_loopback.py
python benchmarks/cloud_throughput.py --bundle bundles/effl0 --cuts c03 c06 c11 --seconds 3
python benchmarks/oip_load.py --bundle bundles/effl0 --seconds 3
python benchmarks/replicas.py --bundle bundles/effl0
python benchmarks/failover.py --bundle bundles/effl0
