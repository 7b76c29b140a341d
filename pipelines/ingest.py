"""Ray job entrypoint: `ray job submit --working-dir . -- python -m pipelines.ingest --config FILE.yaml`.
Same options as `tkllm ingest`; the job joins the cluster it was submitted to."""

import sys

from tkllm_ray.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["ingest", *sys.argv[1:]]))
