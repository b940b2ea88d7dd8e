"""The server lists the pack's nodes, each with a description and a tooltip on every input, and
serves each node's help page."""
import os
import urllib.request

from host.comfy_host import PACK_NAME, REPO

PACK_NODES = ["LoadEmbeddingSet", "BuildEmbeddingSet", "SaveEmbeddingSet", "LoadGuardIndex", "MemorizationFilter",
              "LatentNudge", "NudgeRegenerate", "ConditionalRegenerate", "MemorizationGuardModel",
              "MemorizationGuardGuider"]


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


def test_every_pack_node_has_a_help_page_served(host, object_info):
    """The frontend's node-library help panel fetches /extensions/<pack folder>/docs/<NodeID>.md for
    custom nodes (the pack folder taken from python_module "custom_nodes.<folder>")."""
    ours = sorted(node_id for node_id, info in object_info.items()
                  if info.get("python_module", "").split(".")[:2] == ["custom_nodes", PACK_NAME])
    assert sorted(PACK_NODES) == ours, "PACK_NODES and the server's list of the pack's nodes differ"
    for node_id in ours:
        path = os.path.join(REPO, "js", "docs", f"{node_id}.md")
        assert os.path.isfile(path), f"js/docs/{node_id}.md missing"
        with open(path, encoding="utf-8") as f:
            local = f.read()
        with urllib.request.urlopen(f"{host.url}/extensions/{PACK_NAME}/docs/{node_id}.md", timeout=30) as resp:
            assert resp.status == 200
            assert "html" not in resp.headers.get("Content-Type", ""), resp.headers.get("Content-Type")
            assert resp.read().decode("utf-8") == local
        # Every input the server lists is explained on the page.
        info = object_info[node_id]
        for group in ("required", "optional"):
            for name in info["input"].get(group, {}):
                assert f"`{name}`" in local, f"js/docs/{node_id}.md does not mention input '{name}'"
        for name in info["output_name"]:
            assert f"`{name}`" in local, f"js/docs/{node_id}.md does not mention output '{name}'"
