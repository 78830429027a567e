#!/usr/bin/env bash
# Render a scene as a plain Ray job on a running cluster (see docs/deploy.md).
#
#   RAY_ADDRESS=http://127.0.0.1:8265 examples/ray_job_submit.sh shot.blend 1-250 s3://renders/rayfarm
#
# The job packs the scene with its textures (run it from the folder that holds the
# scene and its files: --working-dir uploads that folder to the cluster), queues it
# through the farm's dispatcher when the farm's service runs on the cluster (or a
# dispatcher of its own otherwise), prints its events, and exits non-zero when the
# render fails, so `ray job submit` (and a pipeline around it) sees the failure.
set -euo pipefail
scene=${1:?usage: $0 SCENE.blend FRAMES [OUTPUT_URL]}
frames=${2:?usage: $0 SCENE.blend FRAMES [OUTPUT_URL]}
output=${3:-}
exec ray job submit --working-dir "$(dirname "$scene")" -- \
    python -m rayfarm.cluster.render_job "$(basename "$scene")" --frames "$frames" --tiles auto \
    ${output:+--output "$output"}
