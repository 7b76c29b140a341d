import io

import torch
from PIL import Image

from tkllm_ray.sparse.placement import heatmap_png, placement_table


def test_placement_counts_and_shares_per_layer_and_type():
    shapes = {"model.layers.0.self_attn.q_proj": torch.Size([4, 4]), "model.layers.1.self_attn.q_proj": torch.Size([4, 4]),
              "model.layers.1.mlp.down_proj": torch.Size([4, 8]), "lm_head": torch.Size([10, 4])}
    idx = {"model.layers.1.self_attn.q_proj": torch.tensor([0, 3]), "lm_head": torch.tensor([1, 2, 3, 4])}
    t = placement_table(idx, shapes)
    assert t["layers"] == ["0", "1", "lm_head"] and t["types"] == ["down_proj", "lm_head", "q_proj"]
    assert t["count"] == [[0, 0, 0], [0, 0, 2], [0, 4, 0]]
    assert t["share"][1] == [0.0, None, 2 / 16] and t["share"][2][1] == 0.1
    img = Image.open(io.BytesIO(heatmap_png(t, "test")))
    assert img.size[0] > 100 and img.size[1] > 100


def test_pooled_tables_and_concentration():
    from tkllm_ray.sparse.placement import concentration, pooled

    shapes = {f"model.layers.{i}.{m}": torch.Size([4, 25] if m.endswith("down_proj") else [10, 10])
              for i in range(4) for m in ("mlp.down_proj", "self_attn.o_proj")}
    a = placement_table({"model.layers.3.mlp.down_proj": torch.arange(6)}, shapes)
    b = placement_table({"model.layers.3.mlp.down_proj": torch.arange(2), "model.layers.0.self_attn.o_proj": torch.arange(2)},
                        shapes)
    p = pooled([a, b])
    assert sum(map(sum, p["count"])) == 10 and p["size"] == a["size"]
    assert p["share"][3][0] == (6 / 100 + 2 / 100) / 2  # down_proj of block 3, mean over the two tables
    c = concentration(p)
    # 4 blocks: the final quarter is block 3 (a quarter of the weights), holding 8 of the 10 entries.
    assert c["final_quarter_blocks"] == {"entries_share": 0.8, "weights_share": 0.25}
    assert c["by_type"]["down_proj"] == {"entries_share": 0.8, "weights_share": 0.5}
