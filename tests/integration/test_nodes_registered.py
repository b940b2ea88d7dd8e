"""The server lists the pack's nodes, each with a description and a tooltip on every input."""
PACK_NODES = ["LoadEmbeddingSet", "BuildEmbeddingSet", "SaveEmbeddingSet", "MemorizationFilter", "LatentNudge",
              "NudgeRegenerate", "ConditionalRegenerate", "MemorizationGuardModel", "MemorizationGuardGuider"]


def test_object_info_lists_every_node_with_description_and_tooltips(object_info):
    for node_id in PACK_NODES:
        assert node_id in object_info, f"{node_id} missing from /object_info"
        info = object_info[node_id]
        assert len(info["description"]) > 40, node_id
        for group in ("required", "optional"):
            for name, spec in info["input"].get(group, {}).items():
                assert len(spec) > 1 and spec[1].get("tooltip"), f"{node_id}.{name} has no tooltip"
        assert all(info["output_tooltips"]), node_id


def test_lazy_regenerated_input_is_declared_lazy(object_info):
    spec = object_info["ConditionalRegenerate"]["input"]["required"]["regenerated"]
    assert spec[1].get("lazy") is True
