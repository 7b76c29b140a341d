"""Ray job entrypoint: `ray job submit --working-dir . -- python -m pipelines.finetune --config FILE.yaml`.
Same options as `tkllm finetune` (`accounts: all` packs every account onto Ray Train workers); the
job joins the cluster it was submitted to."""

import sys

from tkllm_ray.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["finetune", *sys.argv[1:]]))
