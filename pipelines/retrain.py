"""Ray job entrypoint: `ray job submit --working-dir . -- python -m pipelines.retrain --config FILE.yaml`.
One tick of scheduled retraining (tkllm_ray/orchestrate/retrain.py); the schedulers in cluster/
(RayCronJob, CronJob -> RayJob) run it once per interval, `tkllm retrain --every 1d` on one machine."""

import sys

from tkllm_ray.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["retrain", *sys.argv[1:]]))
