"""UI-format workflows (the files users share) <-> API-format prompts (what /prompt runs).

The conversion follows the frontend's own rules: widget values sit in `widgets_values` in the
order of the node definition's inputs (required, then optional); a seed widget with
`control_after_generate` is followed by its control value ("randomize", "fixed"...), an image
upload combo by its upload widget; a linked widget input keeps its slot in `widgets_values`.
The browser test checks the same files with the frontend's own `app.graphToPrompt()`.
"""
from __future__ import annotations

import copy

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
MUTED, BYPASSED = 2, 4


def _spec(info: dict, name: str):
    for group in ("required", "optional"):
        spec = info["input"].get(group, {}).get(name)
        if spec is not None:
            return spec
    return None


def input_order(info: dict) -> list[str]:
    order = info.get("input_order")
    if order:
        return list(order.get("required", [])) + list(order.get("optional", []))
    return list(info["input"].get("required", {})) + list(info["input"].get("optional", {}))


def is_widget(spec) -> bool:
    kind = spec[0]
    options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if options.get("forceInput"):
        return False
    return isinstance(kind, list) or kind in WIDGET_TYPES


def extra_widget_values(name: str, spec) -> int:
    """How many frontend-only values follow this widget's value in widgets_values."""
    options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if options.get("control_after_generate") or (spec[0] == "INT" and name in ("seed", "noise_seed")):
        return 1
    if options.get("image_upload"):
        return 1
    return 0


def ui_to_api(workflow: dict, object_info: dict) -> dict:
    """Convert a UI-format workflow into the API-format prompt POST /prompt takes."""
    links = {link[0]: link for link in workflow.get("links", [])}
    nodes = {node["id"]: node for node in workflow["nodes"]}
    prompt = {}
    for node in workflow["nodes"]:
        if node.get("mode", 0) in (MUTED, BYPASSED) or node["type"] in ("Note", "MarkdownNote", "Reroute"):
            continue
        info = object_info.get(node["type"])
        if info is None:
            raise KeyError(f"node type '{node['type']}' (node {node['id']}) is not installed on this server")
        linked = {inp["name"]: inp.get("link") for inp in node.get("inputs", []) if inp.get("link") is not None}
        values = list(node.get("widgets_values") or [])
        inputs = {}
        for name in input_order(info):
            spec = _spec(info, name)
            if is_widget(spec):
                value = values.pop(0) if values else None
                del values[:extra_widget_values(name, spec)]
                if name not in linked:
                    if value is not None:
                        inputs[name] = value
                    continue
            if name in linked:
                link = links[linked[name]]
                origin = nodes[link[1]]
                if origin["type"] == "Reroute":
                    raise ValueError("Reroute nodes are not supported by this converter")
                inputs[name] = [str(link[1]), link[2]]
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs,
                                   "_meta": {"title": node.get("title", node["type"])}}
    return prompt


def find_nodes(prompt: dict, class_type: str) -> list[str]:
    return [nid for nid, node in prompt.items() if node["class_type"] == class_type]


def set_inputs(prompt: dict, class_type: str, **values) -> dict:
    """Return a copy of the prompt with widget values replaced on every node of class_type."""
    out = copy.deepcopy(prompt)
    for nid in find_nodes(out, class_type):
        out[nid]["inputs"].update(values)
    return out


class WorkflowBuilder:
    """Writes UI-format workflows from node definitions, so the shipped files match the server's."""

    def __init__(self, object_info: dict):
        self.info = object_info
        self.nodes: list[dict] = []
        self.links: list[list] = []

    def add(self, class_type: str, pos, title: str | None = None, size=(320, 160), **given) -> int:
        """Add a node; `given` holds widget values by name and links as (node_id, output_slot)."""
        info = self.info[class_type]
        node_id = len(self.nodes) + 1
        node = {"id": node_id, "type": class_type, "pos": list(pos), "size": list(size), "flags": {},
                "order": len(self.nodes), "mode": 0, "inputs": [], "outputs": [],
                "properties": {"Node name for S&R": class_type}, "widgets_values": []}
        if title:
            node["title"] = title
        for name in input_order(info):
            spec = _spec(info, name)
            value = given.get(name)
            if is_widget(spec):
                if isinstance(value, tuple):
                    raise ValueError("linking widget inputs is not needed by the shipped workflows")
                if value is None:
                    options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
                    value = options.get("default")
                    if value is None and isinstance(spec[0], list):
                        value = spec[0][0] if spec[0] else ""
                    if value is None and spec[0] == "COMBO":
                        value = (options.get("options") or [""])[0]
                node["widgets_values"].append(value)
                if extra_widget_values(name, spec):
                    node["widgets_values"].append("image" if (len(spec) > 1 and spec[1].get("image_upload")) else "fixed")
                continue
            entry = {"name": name, "type": spec[0] if isinstance(spec[0], str) else "COMBO", "link": None}
            if isinstance(value, tuple):
                origin, slot = value
                link_id = len(self.links) + 1
                self.links.append([link_id, origin, slot, node_id, len(node["inputs"]), entry["type"]])
                entry["link"] = link_id
                self.nodes[origin - 1]["outputs"][slot]["links"].append(link_id)
            node["inputs"].append(entry)
        names = info.get("output_name") or info["output"]
        for slot, (kind, name) in enumerate(zip(info["output"], names)):
            node["outputs"].append({"name": name, "type": kind if isinstance(kind, str) else "COMBO",
                                    "links": [], "slot_index": slot})
        self.nodes.append(node)
        return node_id

    def note(self, text: str, pos, size=(420, 180), title: str = "Note") -> None:
        self.nodes.append({"id": len(self.nodes) + 1, "type": "Note", "title": title, "pos": list(pos),
                           "size": list(size), "flags": {}, "order": len(self.nodes), "mode": 0, "inputs": [],
                           "outputs": [], "properties": {}, "widgets_values": [text]})

    def workflow(self) -> dict:
        return {"last_node_id": len(self.nodes), "last_link_id": len(self.links), "nodes": self.nodes,
                "links": self.links, "groups": [], "config": {}, "extra": {}, "version": 0.4}


DESIRED_TITLE = "Desired prompt"


def configure_txt2img(prompt: dict, checkpoint_name: str | None = None, resolution: int | None = None,
                      sampler: dict | None = None, caption: str | None = None, seed: int | None = None,
                      set_names: dict | None = None, desired: str | None = None) -> dict:
    """Point a shipped workflow's API prompt at a model: checkpoint, size, sampler, caption, seed.

    The prompt text goes to the CLIPTextEncode titled "Prompt", `desired` to the one titled
    "Desired prompt"; the regenerating sampler (a KSampler with denoise < 1, or NudgeRegenerate)
    gets the same sampler settings and seed + 1. set_names maps a shipped set name to the one to load.
    """
    out = copy.deepcopy(prompt)
    for node in out.values():
        inputs, kind = node["inputs"], node["class_type"]
        if kind == "CheckpointLoaderSimple" and checkpoint_name:
            inputs["ckpt_name"] = checkpoint_name
        elif kind == "EmptyLatentImage" and resolution:
            inputs["width"] = inputs["height"] = resolution
        elif kind in ("KSampler", "NudgeRegenerate"):
            if sampler:
                inputs.update({k: v for k, v in sampler.items() if k in ("steps", "cfg", "sampler_name", "scheduler")})
            if seed is not None:
                inputs["seed"] = seed if kind == "KSampler" and float(inputs.get("denoise", 1.0)) >= 1.0 else seed + 1
        elif kind == "CLIPTextEncode" and caption is not None and node.get("_meta", {}).get("title") == "Prompt":
            inputs["text"] = caption
        elif kind == "CLIPTextEncode" and desired is not None and node.get("_meta", {}).get("title") == DESIRED_TITLE:
            inputs["text"] = desired
        elif kind == "LoadEmbeddingSet" and set_names and inputs.get("set_name") in set_names:
            inputs["set_name"] = set_names[inputs["set_name"]]
    return out


def generation_only(prompt: dict) -> dict:
    """The plain-generation part of a guard workflow: everything upstream of the first VAEDecode,
    saved directly (the loop off: what a graph without the pack would run)."""
    out = copy.deepcopy(prompt)
    decode = next(nid for nid, n in out.items() if n["class_type"] == "VAEDecode"
                  and float(out[n["inputs"]["samples"][0]]["inputs"].get("denoise", 1.0)) >= 1.0)
    needed, stack = set(), [decode]
    while stack:
        nid = stack.pop()
        if nid in needed:
            continue
        needed.add(nid)
        stack += [v[0] for v in out[nid]["inputs"].values() if isinstance(v, list) and len(v) == 2 and v[0] in out]
    save = next(nid for nid, n in out.items() if n["class_type"] == "SaveImage")
    plain = {nid: out[nid] for nid in needed}
    plain[save] = out[save]
    plain[save]["inputs"]["images"] = [decode, 0]
    return plain
