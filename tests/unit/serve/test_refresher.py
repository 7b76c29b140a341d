"""The replica's version check ends quietly when its event loop shuts down (before, it printed a
failed refresh on every stop)."""

import asyncio
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest

from tkllm_ray.serve.app import DeltaModel
from tkllm_ray.serve.delta_cache import DeltaCache


@pytest.mark.parametrize("stop", ["loop", "pool"])
def test_the_version_check_ends_when_the_loop_shuts_down(tmp_path, stop, capsys):
    cache = DeltaCache(str(tmp_path / "deltas"))
    replica = SimpleNamespace(refresh_s=0, cache=cache)  # the two fields the check reads before it ends

    async def main():
        loop = asyncio.get_running_loop()
        if stop == "loop":  # what asyncio.run does on its way out
            await loop.shutdown_default_executor()
        else:  # the loop's own pool, shut under it
            pool = ThreadPoolExecutor(1)
            loop.set_default_executor(pool)
            pool.shutdown()
        await asyncio.wait_for(DeltaModel.func_or_class._refresher(replica), 5)  # returns, does not loop on

    asyncio.run(main())
    cache.close()
    assert "refresh failed" not in capsys.readouterr().out
