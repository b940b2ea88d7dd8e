"""The real frontend in headless Chromium: the shipped workflows load, convert and run, and the
pack's canvas UI shows each verdict and status.

Needs /usr/bin/chromium (Debian's package; CI installs it) and the playwright Python package;
skips with the reason when either is missing. Nothing is downloaded.

With NUDGING_SCREENSHOTS=<dir> the tests also save screenshots there (`make screenshots`), and
with NUDGING_THUMBNAILS=<dir> the template-browser thumbnails (<workflow>.jpg).
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import re
import time
import urllib.request

import pytest
from conftest import CHECKPOINT_NAME, configure, load_workflow
from memorizer import data as memorizer_data

from host.comfy_host import PACK_NAME
from host.workflow import ui_to_api

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
VIEWPORT = {"width": 1400, "height": 860}
SHOTS = os.environ.get("NUDGING_SCREENSHOTS")
THUMBS = os.environ.get("NUDGING_THUMBNAILS")
MAX_PNG_BYTES = 300_000
WORKFLOWS_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "workflows")
WORKFLOWS = sorted(f[:-5] for f in os.listdir(WORKFLOWS_DIR) if f.endswith(".json"))
RUN_TIMEOUT = 600
REGEN_LINE = re.compile(r"^image (\d+): (escaped|STILL A COPY) after (\d+) attempt\(s\), distance (\S+) -> (\S+)$")
GUARD_NODES = ["MemorizationFilter", "ConditionalRegenerate", "NudgeRegenerate"]   # memorization_guard.json
STYLE_NODES = ["MemorizationFilter", "ConditionalRegenerate", "LatentNudge"]       # nudge_toward_style.json
# A toast on screen: PrimeVue's .p-toast-message (frontend 1.32), a [data-testid=toast] item (1.58).
TOASTS = ".p-toast-message, [data-testid=toast]"


# --- browser session ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def browser(host):
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} is missing: apt-get install chromium chromium-driver (CI does)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("the playwright Python package is missing: pip install -r requirements-dev.txt")
    # The first-run template dialog would cover the canvas.
    host.request("POST", "/settings", {"Comfy.TutorialCompleted": True, "Comfy.Minimap.Visible": False})
    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, host):
    with open_page(browser, host) as pg:
        yield pg


@contextlib.contextmanager
def open_page(browser, host):
    """A fresh browser context on the server's frontend, once the pack's extension has registered;
    fails the test if the pack's code raised in the page."""
    context = browser.new_context(viewport=VIEWPORT)
    context.add_init_script("localStorage.setItem('vueNodesBannerDismissed', 'true')")  # the Nodes 2.0 banner
    # Every toast shown, even one that expired while a long run went on (window.__toastsSeen).
    context.add_init_script("""
        window.__toastsSeen = [];
        new MutationObserver(() => {
            for (const t of document.querySelectorAll('%s')) {
                const text = t.innerText;
                if (text && !window.__toastsSeen.includes(text)) window.__toastsSeen.push(text);
            }
        }).observe(document, {childList: true, subtree: true, characterData: true});""" % TOASTS)
    # Nodes 2.0 draws each custom widget on its own canvas inside the node's element: what is on it.
    context.add_init_script("""
        window.widgetCanvas = (node, widget) => {
            const el = document.querySelector(
                `[data-node-id="${node.id}"] canvas[data-nudging-widget="${widget.name}"]`);
            if (!el || !el.width || !el.height) return null;
            const pixels = el.getContext("2d").getImageData(0, 0, el.width, el.height).data;
            let drawn = false, hash = 0;
            for (let i = 0; i < pixels.length; i += 4) {
                if (pixels[i + 3]) drawn = true;
                hash = (Math.imul(hash, 31) + pixels[i] + 7 * pixels[i + 1] + 13 * pixels[i + 2]) | 0;
            }
            return {drawn, hash, height: el.height};
        };""")
    pg = context.new_page()
    errors = []
    pg.on("pageerror", lambda exc: errors.append(str(exc)))
    pg.goto(host.url + "/", wait_until="domcontentloaded")
    pg.wait_for_function(
        """() => window.app?.graph && window.LiteGraph?.registered_node_types?.MemorizationFilter
               && app.extensions?.some(e => e.name === "EmbeddingNudging.Canvas")""",
        timeout=120_000)
    pg.nudging_errors = errors
    yield pg
    ours = [e for e in errors if "nudging" in e.lower()]
    context.close()
    assert not ours, f"errors from the pack's frontend code: {ours}"


# --- helpers --------------------------------------------------------------------------------
# Dialogs: PrimeVue's .p-dialog (frontend 1.32), role="dialog" elements (1.58's template browser).
DIALOGS = "[role=dialog], .p-dialog"


def combo_options(object_info, class_type: str, name: str) -> list:
    """A combo input's choices from /object_info: [[...], {...}] or the newer ["COMBO", {"options": [...]}]."""
    info = object_info[class_type]["input"]
    spec = info.get("required", {}).get(name) or info.get("optional", {}).get(name)
    if isinstance(spec[0], list):
        return spec[0]
    return (spec[1] if len(spec) > 1 else {}).get("options", [])


def shipped_workflow(name: str, object_info) -> dict:
    """workflows/<name>.json pointed at the test home's files, as a user would pick them from the combos
    before loading: the checkpoint is the memorizer (the shipped sd-v1-4.ckpt is not in the test home).
    The shipped embedding-set names are the test home's own (conftest builds them), so they stay; a
    shipped name the server does not list fails here, not as a vague load error. Newer frontends
    (1.58) flag a node whose combo value is not in the server's list (node.has_errors), which
    load_in_frontend checks, so this must happen before app.loadGraphData."""
    workflow = copy.deepcopy(load_workflow(f"{name}.json"))
    checkpoints = combo_options(object_info, "CheckpointLoaderSimple", "ckpt_name")
    sets = combo_options(object_info, "LoadEmbeddingSet", "set_name")
    assert CHECKPOINT_NAME in checkpoints, checkpoints
    for node in workflow["nodes"]:
        if node["type"] == "CheckpointLoaderSimple":
            node["widgets_values"][0] = CHECKPOINT_NAME
        elif node["type"] == "LoadEmbeddingSet":
            assert node["widgets_values"][0] in sets, (name, node["widgets_values"][0], sets)
    return workflow


def load_in_frontend(page, workflow: dict) -> None:
    """app.loadGraphData; every node type must be registered, no node flagged with errors (a missing
    type, a combo value the server does not list...) and no missing-nodes dialog shown."""
    result = page.evaluate(
        """async ([wf, dialogSelector]) => {
            await app.loadGraphData(wf);
            const registered = LiteGraph.registered_node_types;
            const virtual = new Set(["Note", "MarkdownNote", "Reroute", "PrimitiveNode"]);
            const unknown = wf.nodes.map(n => n.type).filter(t => !(t in registered) && !virtual.has(t));
            const broken = app.graph.nodes.filter(n => n.has_errors).map(n => n.type);
            const dialogs = [...document.querySelectorAll(dialogSelector)]
                .filter(d => !d.parentElement?.closest(dialogSelector)).map(d => d.innerText);
            return {unknown, broken, dialogs, count: app.graph.nodes.length};
        }""", [workflow, DIALOGS])
    assert not result["unknown"], f"node types not registered in the frontend: {result['unknown']}"
    assert not result["broken"], f"nodes loaded with errors: {result['broken']}"
    missing = [d for d in result["dialogs"] if "missing" in d.lower()]
    assert not missing, f"the frontend reported missing nodes: {missing}"
    assert result["count"] == len(workflow["nodes"])


def graph_to_prompt(page) -> dict:
    return page.evaluate("async () => { const p = await app.graphToPrompt(); return {output: p.output, workflow: p.workflow}; }")


def strip(prompt: dict) -> dict:
    return {nid: (node["class_type"], node["inputs"]) for nid, node in prompt.items()}


def set_widgets(page, values: dict) -> None:
    """values: {node_id: {widget_name: value}}, set through the node widgets like a user would."""
    missing = page.evaluate(
        """(values) => {
            const missing = [];
            for (const [id, widgets] of Object.entries(values)) {
                const node = app.graph.getNodeById(Number(id));
                for (const [name, value] of Object.entries(widgets)) {
                    const w = node?.widgets?.find(w => w.name === name);
                    if (!w) { missing.push(`${id}.${name}`); continue; }
                    w.value = value;
                    w.callback?.(value, app.canvas, node);
                }
            }
            app.graph.setDirtyCanvas(true, true);
            return missing;
        }""", {str(k): v for k, v in values.items()})
    assert not missing, f"widgets not found: {missing}"


def widget_changes(before: dict, after: dict) -> dict:
    """The widget inputs that differ between two API prompts of the same graph."""
    changes = {}
    for nid, node in after.items():
        for name, value in node["inputs"].items():
            if not isinstance(value, list) and before[nid]["inputs"].get(name) != value:
                changes.setdefault(int(nid), {})[name] = value
    return changes


def configured_prompt(object_info, workflow: dict, caption: str | None, seed: int | None,
                      overrides: dict | None = None) -> dict:
    """What the test asks the browser to set: the memorizer's settings plus per-class overrides."""
    prompt = configure(ui_to_api(workflow, object_info), CHECKPOINT_NAME, caption, seed)
    for node in prompt.values():
        node["inputs"].update((overrides or {}).get(node["class_type"], {}))
    return prompt


def history_ids(host) -> set[str]:
    return set(host.get("/history?max_items=10000"))


def queue_from_frontend(page, host, expect_error: bool = False) -> tuple[str, dict]:
    """app.queuePrompt(0) (the Run button's path); returns the new history entry once finished."""
    before = history_ids(host)
    page.evaluate("async () => { await app.queuePrompt(0); }")
    deadline = time.time() + RUN_TIMEOUT
    while time.time() < deadline:
        new = history_ids(host) - before
        if new:
            prompt_id = new.pop()
            return prompt_id, host.wait(prompt_id, timeout=max(1, deadline - time.time()))
        time.sleep(0.3)
    raise AssertionError(f"the queued prompt never reached the history:\n{host.log_tail()}")


def node_views(page) -> dict:
    """What the pack's extension shows on each node (node.nudging), by node id."""
    return page.evaluate(
        """() => Object.fromEntries(app.graph.nodes.filter(n => n.nudging).map(n => [String(n.id), {
                type: n.comfyClass, header: n.nudging.header, stale: !!n.nudging.stale,
                running: !!n.nudging.running, kind: n.nudging.kind,
                rows: n.nudging.rows.map(r => ({badge: r.badge, text: r.text})),
                labels: (n.nudging.labels || []).map(l => l.text),
                imgs: (n.imgs || []).length,
                panelVisible: (() => { const w = n.widgets.find(w => w.name === "nudging_panel");
                                       if (!w) return false;
                                       if (!LiteGraph.vueNodesMode) return w.last_y != null && n.size[1] >= w.last_y + 10;
                                       // Nodes 2.0: the widget draws on its own canvas in the node's element.
                                       return widgetCanvas(n, w)?.drawn ?? false; })(),
            }]))""")


def wait_for_views(page, node_ids: list[str], timeout: float = 30) -> dict:
    deadline = time.time() + timeout
    while True:
        views = node_views(page)
        if all(nid in views and not views[nid]["stale"] and not views[nid]["running"] for nid in node_ids):
            return views
        if time.time() > deadline:
            raise AssertionError(f"the canvas never showed fresh results on {node_ids}: {views}")
        time.sleep(0.25)


def toasts(page) -> list[str]:
    """The toasts on screen now and those shown earlier on this page (they expire after a few seconds)."""
    return page.evaluate("""(sel) => [...new Set([...(window.__toastsSeen || []),
                                     ...[...document.querySelectorAll(sel)].map(t => t.innerText)])]""", TOASTS)


def ids_of(prompt: dict, class_type: str) -> list[str]:
    return [nid for nid, node in prompt.items() if node["class_type"] == class_type]


def payload(entry: dict, nid: str, key: str):
    out = entry["outputs"].get(nid)
    return None if out is None else json.loads(out[key][0])


def fit_view(page, node_types: list[str] | None = None) -> None:
    page.evaluate(
        """async (types) => {
            app.canvas.deselectAll?.();
            if (types) for (const n of app.graph.nodes) if (types.includes(n.comfyClass)) app.canvas.select(n);
            app.canvas.fitViewToSelectionAnimated?.({duration: 1});
            if (!app.canvas.fitViewToSelectionAnimated) await app.extensionManager.command.execute("Comfy.Canvas.FitView");
            app.canvas.deselectAll?.();
            app.graph.setDirtyCanvas(true, true);
        }""", node_types)
    page.wait_for_timeout(600)


def screenshot(page, name: str, node_types: list[str] | None = None, thumbnail: str | None = None) -> None:
    if not SHOTS and not (THUMBS and thumbnail):
        return
    from PIL import Image
    fit_view(page, node_types)
    raw = page.screenshot(type="png")
    image = Image.open(io.BytesIO(raw)).convert("RGB")
    if SHOTS:
        os.makedirs(SHOTS, exist_ok=True)
        path = os.path.join(SHOTS, f"{name}.png")
        scaled = image.resize((image.width * 5 // 7, image.height * 5 // 7), Image.LANCZOS)
        scaled.save(path, optimize=True)
        if os.path.getsize(path) > MAX_PNG_BYTES:
            scaled.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)
        assert os.path.getsize(path) <= MAX_PNG_BYTES, path
    if THUMBS and thumbnail:
        # Crop to the nodes on screen (plus a margin), so the card shows the graph, not the chrome.
        box = page.evaluate(
            """() => { const ds = app.canvas.ds, r = app.canvas.canvas.getBoundingClientRect();
                       const th = LiteGraph.NODE_TITLE_HEIGHT, xs = [], ys = [];
                       for (const n of app.graph.nodes) {
                           xs.push((n.pos[0] + ds.offset[0]) * ds.scale + r.left,
                                   (n.pos[0] + n.size[0] + ds.offset[0]) * ds.scale + r.left);
                           ys.push((n.pos[1] - th + ds.offset[1]) * ds.scale + r.top,
                                   (n.pos[1] + n.size[1] + ds.offset[1]) * ds.scale + r.top);
                       }
                       return [Math.min(...xs) - 12, Math.min(...ys) - 12, Math.max(...xs) + 12, Math.max(...ys) + 12]; }""")
        box = [max(0, int(box[0])), max(0, int(box[1])), min(image.width, int(box[2])), min(image.height, int(box[3]))]
        thumb = image.crop(box)
        thumb.thumbnail((640, 400), Image.LANCZOS)
        thumb.save(os.path.join(THUMBS, f"{thumbnail}.jpg"), quality=85, optimize=True)


# --- tests ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", WORKFLOWS)
def test_frontend_conversion_matches_the_project_converter(page, object_info, name):
    """app.graphToPrompt() on the shipped file equals host.workflow.ui_to_api: same classes, same inputs."""
    workflow = shipped_workflow(name, object_info)
    load_in_frontend(page, workflow)
    converted = graph_to_prompt(page)
    assert strip(converted["output"]) == strip(ui_to_api(workflow, object_info))
    # And the workflow the frontend would save converts to the same prompt with our converter.
    assert strip(ui_to_api(converted["workflow"], object_info)) == strip(converted["output"])
    # The pack's canvas widgets never enter the saved widgets_values.
    for node in converted["workflow"]["nodes"]:
        original = next(n for n in workflow["nodes"] if n["id"] == node["id"])
        assert node.get("widgets_values", []) == original.get("widgets_values", []), node["type"]


def run_workflow_in_browser(page, host, object_info, name, caption=None, seed=None, overrides=None):
    """Load, set the memorizer's widgets through the UI, check the frontend's conversion, run."""
    workflow = shipped_workflow(name, object_info)
    load_in_frontend(page, workflow)
    plain = ui_to_api(workflow, object_info)
    wanted = configured_prompt(object_info, workflow, caption, seed, overrides)
    set_widgets(page, widget_changes(plain, wanted))
    converted = graph_to_prompt(page)
    assert strip(converted["output"]) == strip(wanted), "frontend conversion differs from ui_to_api + configure"
    _prompt_id, entry = queue_from_frontend(page, host)
    return wanted, entry


def check_guard_views(page, prompt: dict, entry: dict) -> dict:
    """The canvas shows exactly what the server decided, for every image, on every pack node."""
    assert entry["status"].get("status_str") == "success", entry["status"]
    filters, regens, nudges, retries = (ids_of(prompt, t) for t in
                                        ("MemorizationFilter", "ConditionalRegenerate", "LatentNudge", "NudgeRegenerate"))
    views = wait_for_views(page, filters + regens + nudges + retries)
    result = {"views": views, "verdicts": None, "status": None, "report": None}
    flagged = 0
    for filt in filters:
        verdicts = result["verdicts"] = payload(entry, filt, "nudging_verdicts")
        shown = views[filt]
        assert shown["panelVisible"], "the verdict panel is outside the node"
        assert [r["badge"] for r in shown["rows"]] == ["FLAGGED" if im["flagged"] else "passed"
                                                       for im in verdicts["images"]]
        for row, im in zip(shown["rows"], verdicts["images"]):
            assert f"{im['distance']:.4f}" in row["text"] and f"'{im['nearest']}'" in row["text"], row
        flagged = sum(im["flagged"] for im in verdicts["images"])
        assert shown["header"].startswith(f"{flagged} of {len(verdicts['images'])} flagged")
    for regen in regens:
        status = result["status"] = payload(entry, regen, "nudging_status")
        shown = views[regen]
        assert shown["panelVisible"]
        assert [r["badge"] for r in shown["rows"]] == status["statuses"]
        if status["replaced"]:
            k = len(status["replaced"])
            assert shown["labels"][:k] == [f"before #{b}" for b in status["replaced"]]
            assert all(label.startswith("after #") for label in shown["labels"][k:])
            assert len(shown["labels"]) == 2 * k
            assert len(entry["outputs"][regen]["images"]) == 2 * k
    for nudge in nudges:
        shown = views[nudge]
        if flagged:
            assert shown["header"].startswith("done"), shown
            assert entry["outputs"].get(nudge) is not None
        else:
            assert shown["header"].startswith("not run"), shown
            assert entry["outputs"].get(nudge) is None
    for retry in retries:
        shown = views[retry]
        if not flagged:
            assert shown["header"].startswith("not run"), shown
            assert entry["outputs"].get(retry) is None
            continue
        assert shown["panelVisible"], "the NudgeRegenerate panel is outside the node"
        report = entry["outputs"][retry]["text"][0]
        lines = [REGEN_LINE.match(line) for line in report.splitlines()]
        assert lines and all(lines), report
        result["report"] = [(int(m[1]), m[2], int(m[3]), m[4], m[5]) for m in lines]
        # One row per flagged image, in the report's order, with its attempts and distances.
        assert [m[0] for m in result["report"]] == [im["index"] for im in result["verdicts"]["images"] if im["flagged"]]
        assert [r["badge"] for r in shown["rows"]] == ["STILL A COPY" if m[1] == "STILL A COPY" else "escaped"
                                                       for m in result["report"]]
        for row, (b, _, attempts, before, after) in zip(shown["rows"], result["report"]):
            assert row["text"] == f"#{b}  after {attempts} attempt(s)  {before} → {after}", row
        still = sum(m[1] == "STILL A COPY" for m in result["report"])
        assert shown["header"] == (f"{still} still a copy, {len(lines) - still} escaped" if still
                                   else f"all {len(lines)} escaped"), shown
        # ConditionalRegenerate's re-test agrees with NudgeRegenerate's own.
        if result["status"] is not None:
            assert [result["status"]["statuses"][m[0]] for m in result["report"]] == [
                "still flagged" if m[1] == "STILL A COPY" else "regenerated" for m in result["report"]]
    return result


def wait_for_toast(page, text: str, timeout: float = 10) -> list[str]:
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = toasts(page)
        if any(text in t for t in found):
            return found
        time.sleep(0.2)
    raise AssertionError(f"no toast containing {text!r}: {toasts(page)}")


def test_guard_ui_shows_flagged_regenerated_and_still_flagged(page, host, object_info, fresh_seed):
    """Plumbing, independent of how well the memorizer memorizes, on the single-attempt LatentNudge
    chain (nudge_toward_style.json): threshold 1.0 flags every image, so the UI's flagged /
    still-flagged paths, the toasts and the before/after labels all show; a second run with the
    threshold between the two distances shows 'regenerated'."""
    _name, caption, _ = memorizer_data.training_items()[1]
    prompt, entry = run_workflow_in_browser(page, host, object_info, "nudge_toward_style", caption, fresh_seed,
                                            {"MemorizationFilter": {"threshold": 1.0}})
    result = check_guard_views(page, prompt, entry)
    assert result["verdicts"]["any_flagged"] and result["status"]["statuses"] == ["still flagged"]
    wait_for_toast(page, "flagged")
    wait_for_toast(page, "still flagged after regeneration")
    nudge, = ids_of(prompt, "LatentNudge")
    assert result["views"][nudge]["header"].startswith("done"), result["views"][nudge]   # the lazy branch ran
    screenshot(page, "guard_forced_still_flagged", STYLE_NODES)

    before = result["status"]["distances_before"][0]
    after = result["status"]["distances_after"][0]
    if after <= before + 0.002:
        pytest.skip(f"this seed's nudge did not move the image away ({before:.4f} -> {after:.4f})")
    threshold = round((before + after) / 2, 3)
    prompt, entry = run_workflow_in_browser(page, host, object_info, "nudge_toward_style", caption, fresh_seed,
                                            {"MemorizationFilter": {"threshold": threshold}})
    result = check_guard_views(page, prompt, entry)
    assert result["status"]["statuses"] == ["regenerated"], result["status"]
    screenshot(page, "guard_forced_regenerated", STYLE_NODES)


def test_nudge_regenerate_reports_still_a_copy_when_forced(page, host, object_info, fresh_seed):
    """memorization_guard.json's NudgeRegenerate at threshold 1.0: no attempt can escape, so it uses
    every attempt and its panel says STILL A COPY, matching ConditionalRegenerate's 'still flagged'."""
    _name, caption, _ = memorizer_data.training_items()[1]
    prompt, entry = run_workflow_in_browser(page, host, object_info, "memorization_guard", caption, fresh_seed,
                                            {"MemorizationFilter": {"threshold": 1.0},
                                             "NudgeRegenerate": {"max_attempts": 2}})
    result = check_guard_views(page, prompt, entry)
    assert result["status"]["statuses"] == ["still flagged"]
    assert [(m[1], m[2]) for m in result["report"]] == [("STILL A COPY", 2)], result["report"]
    retry, = ids_of(prompt, "NudgeRegenerate")
    assert result["views"][retry]["rows"][0]["badge"] == "STILL A COPY"
    wait_for_toast(page, "still flagged after regeneration")
    screenshot(page, "nudge_regenerate_forced_still_a_copy", GUARD_NODES)


def widget_inputs(prompt: dict) -> list:
    """Each node's class and widget values, whatever its id (ids change when nodes move into a subgraph)."""
    def value(v):   # the page's JSON gives 5 where Python has 5.0
        return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v
    return sorted((node["class_type"], json.dumps({k: value(v) for k, v in node["inputs"].items()
                                                   if not isinstance(v, list)}, sort_keys=True))
                  for node in prompt.values())


def subgraph_views(page) -> dict:
    """node_views for the nodes inside the root graph's subgraph nodes, keyed by class."""
    return page.evaluate(
        """() => Object.fromEntries(app.graph.nodes.filter(n => n.isSubgraphNode?.() && n.subgraph)
               .flatMap(sg => sg.subgraph.nodes).filter(n => n.nudging).map(n => [n.comfyClass, {
                   header: n.nudging.header, stale: !!n.nudging.stale, running: !!n.nudging.running,
                   rows: n.nudging.rows.map(r => r.badge), progressMax: n.nudgingProgress?.max ?? 0}]))""")


def test_guard_ui_works_inside_a_subgraph(page, host, object_info, fresh_seed):
    """The guard's nodes converted into a subgraph with the frontend's own command path
    (LGraph.convertToSubgraph): the server then names them by execution ids "<subgraph node>:<node>",
    and the pack's status, progress and lazy-branch bookkeeping must still find them."""
    _name, caption, _ = memorizer_data.training_items()[2]
    workflow = shipped_workflow("memorization_guard", object_info)
    load_in_frontend(page, workflow)
    wanted = configured_prompt(object_info, workflow, caption, fresh_seed,
                               {"MemorizationFilter": {"threshold": 1.0}, "NudgeRegenerate": {"max_attempts": 1}})
    set_widgets(page, widget_changes(ui_to_api(workflow, object_info), wanted))
    converted = page.evaluate(
        """(types) => {
            if (typeof app.graph.convertToSubgraph !== "function") return null;
            const chosen = app.graph.nodes.filter(n => types.includes(n.comfyClass));
            const {node} = app.graph.convertToSubgraph(new Set(chosen));
            return {id: String(node.id), inner: node.subgraph.nodes.map(n => n.comfyClass).sort()};
        }""", GUARD_NODES)
    if converted is None:
        pytest.skip("this frontend has no subgraphs (LGraph.convertToSubgraph)")
    assert converted["inner"] == sorted(GUARD_NODES), converted
    prompt = graph_to_prompt(page)["output"]
    # Same graph, same settings; the guard's nodes now run under "<subgraph node>:<node>" ids.
    assert widget_inputs(prompt) == widget_inputs(wanted)
    for class_type in GUARD_NODES:
        nid, = ids_of(prompt, class_type)
        assert nid.startswith(converted["id"] + ":"), (class_type, nid)
    _prompt_id, entry = queue_from_frontend(page, host)
    assert entry["status"].get("status_str") == "success", entry["status"]
    regen, = ids_of(prompt, "ConditionalRegenerate")
    assert json.loads(entry["outputs"][regen]["nudging_status"][0])["statuses"] == ["still flagged"]
    deadline = time.time() + 30
    while True:
        views = subgraph_views(page)
        if all(t in views and not views[t]["stale"] and not views[t]["running"] for t in GUARD_NODES):
            break
        if time.time() > deadline:
            raise AssertionError(f"the canvas never showed fresh results inside the subgraph: {views}")
        time.sleep(0.25)
    assert views["MemorizationFilter"]["rows"] == ["FLAGGED"], views
    assert views["ConditionalRegenerate"]["header"] == "1 still flagged after regeneration", views
    # The lazy branch ran: its node is found by its "a:b" id (progress events, the executed list),
    # so it shows its report, not "not run".
    assert views["NudgeRegenerate"]["rows"] == ["STILL A COPY"], views
    assert views["NudgeRegenerate"]["progressMax"] > 0, views
    wait_for_toast(page, "still flagged after regeneration")
    screenshot(page, "guard_inside_subgraph")


def test_toasts_can_be_turned_off(page, host, object_info, fresh_seed):
    page.evaluate("async () => { await app.extensionManager.setting.set('EmbeddingNudging.Toasts', false); }")
    try:
        _name, caption, _ = memorizer_data.training_items()[2]
        prompt, entry = run_workflow_in_browser(page, host, object_info, "memorization_guard", caption, fresh_seed,
                                                {"MemorizationFilter": {"threshold": 1.0},
                                                 "NudgeRegenerate": {"max_attempts": 1}})
        result = check_guard_views(page, prompt, entry)
        assert result["status"]["statuses"] == ["still flagged"]   # a toast would have been shown
        page.wait_for_timeout(500)
        assert not [t for t in toasts(page) if "flagged" in t], toasts(page)
        # The check above sees toasts on this frontend at all (its toast DOM differs between versions).
        page.evaluate("""() => app.extensionManager.toast.add({severity: "info", summary: "toast probe",
                                                              detail: "seen", life: 3000})""")
        wait_for_toast(page, "toast probe")
    finally:
        page.evaluate("async () => { await app.extensionManager.setting.set('EmbeddingNudging.Toasts', true); }")


def start_and_cancel(page, host, object_info, workflow_name: str, node_type: str, overrides: dict, seed: int,
                     progress_header, shot: str, shot_nodes: list[str], while_running=None) -> None:
    """Queue a run forced into the lazy branch, wait for node_type's progress, cancel, check it stopped.
    while_running(page, node_id), if given, checks more while the progress is showing."""
    _name, caption, _ = memorizer_data.training_items()[3]
    workflow = shipped_workflow(workflow_name, object_info)
    load_in_frontend(page, workflow)
    wanted = configured_prompt(object_info, workflow, caption, seed, {"MemorizationFilter": {"threshold": 1.0}, **overrides})
    set_widgets(page, widget_changes(ui_to_api(workflow, object_info), wanted))
    nudge, = ids_of(wanted, node_type)
    before = history_ids(host)
    page.evaluate("async () => { await app.queuePrompt(0); }")
    page.wait_for_function(
        "(id) => { const n = app.graph.getNodeById(Number(id)); return n?.nudging?.running && n.nudgingProgress?.value > 0; }",
        arg=nudge, timeout=RUN_TIMEOUT * 1000)
    shown = node_views(page)[nudge]
    assert progress_header(shown["header"]), shown
    try:
        if while_running:
            while_running(page, nudge)
        screenshot(page, f"{shot}_progress", shot_nodes)
    except BaseException:
        host.interrupt()        # leave the server free for the next test
        raise
    page.evaluate("async () => { await app.extensionManager.command.execute('Comfy.Interrupt'); }")
    page.wait_for_function(
        "(id) => app.graph.getNodeById(Number(id))?.nudging?.header?.startsWith('cancelled at ')",
        arg=nudge, timeout=60_000)
    deadline = time.time() + 60
    while not (history_ids(host) - before) and time.time() < deadline:
        time.sleep(0.3)
    prompt_id, = history_ids(host) - before
    entry = host.wait(prompt_id, timeout=60)
    kinds = [kind for kind, _ in entry["status"].get("messages", [])]
    assert "execution_interrupted" in kinds, kinds
    assert entry["outputs"].get(nudge) is None                      # nothing passed on
    assert host.get("/queue")["queue_running"] == []                # the server is free again
    screenshot(page, f"{shot}_cancelled", shot_nodes)


def test_latent_nudge_shows_progress_and_stops_on_cancel(page, host, object_info, fresh_seed):
    start_and_cancel(page, host, object_info, "nudge_toward_style", "LatentNudge", {"LatentNudge": {"steps": 100000}},
                     fresh_seed, lambda h: h.startswith("optimising latent: step ") and h.endswith("/ 100000"),
                     "latent_nudge", STYLE_NODES)


def test_nudge_regenerate_shows_progress_and_stops_on_cancel(page, host, object_info, fresh_seed):
    pattern = re.compile(r"^regenerating: attempt ([1-9]\d*) of up to 20, step ([1-9]\d*) / 10000$")
    start_and_cancel(page, host, object_info, "memorization_guard", "NudgeRegenerate",
                     {"NudgeRegenerate": {"steps": 10000, "max_attempts": 20}}, fresh_seed,
                     lambda h: bool(pattern.match(h)), "nudge_regenerate", GUARD_NODES)


def test_memorization_guard_in_browser(page, host, object_info, fresh_seed):
    """The shipped guard at the paper's threshold on a training caption, as an artist runs it.
    Shows whatever the memorizer produces; the memorizer-dependent claim is the next test's."""
    _name, caption, _ = memorizer_data.training_items()[0]
    prompt, entry = run_workflow_in_browser(page, host, object_info, "memorization_guard", caption, fresh_seed)
    result = check_guard_views(page, prompt, entry)
    if result["verdicts"]["any_flagged"]:
        wait_for_toast(page, "Memorization filter")
    screenshot(page, "memorization_guard", thumbnail="memorization_guard")
    screenshot(page, "memorization_guard_verdicts", GUARD_NODES)


def test_memorized_caption_is_flagged_and_regenerated_in_browser(page, host, object_info, fresh_seed):
    """Needs a memorizer that reproduces its training images (as test_workflows does)."""
    name, caption, _ = memorizer_data.training_items()[0]
    for seed in range(fresh_seed, fresh_seed + 5):
        prompt, entry = run_workflow_in_browser(page, host, object_info, "memorization_guard", caption, seed)
        result = check_guard_views(page, prompt, entry)
        if result["verdicts"]["any_flagged"]:
            break
    else:
        pytest.fail(f"the memorizer never reproduced '{caption}' in 5 seeds: {result['views']}")
    filt, = ids_of(prompt, "MemorizationFilter")
    assert result["views"][filt]["rows"][0]["badge"] == "FLAGGED" and f"'{name}'" in result["views"][filt]["rows"][0]["text"]
    # The shipped loop escapes every memorized output of the trained memorizer (make bench: 80 of 80).
    assert result["status"]["statuses"][0] == "regenerated", result["status"]
    assert result["report"] and result["report"][0][0] == 0                # NudgeRegenerate ran and reported
    wait_for_toast(page, "Memorization filter: 1 of 1 flagged")
    screenshot(page, "memorized_caption_regenerated", GUARD_NODES)


def test_unseen_caption_passes_in_browser(page, host, object_info, fresh_seed):
    caption = memorizer_data.unseen_captions()[0]
    prompt, entry = run_workflow_in_browser(page, host, object_info, "memorization_guard", caption, fresh_seed)
    result = check_guard_views(page, prompt, entry)
    if not result["verdicts"]["any_flagged"]:
        regen, = ids_of(prompt, "ConditionalRegenerate")
        assert result["views"][regen]["header"] == "all passed: nothing regenerated"
        retry, = ids_of(prompt, "NudgeRegenerate")
        assert result["views"][retry]["header"].startswith("not run")   # the lazy branch never ran
        screenshot(page, "unseen_caption_passed", GUARD_NODES)


def test_nudge_toward_style_in_browser(page, host, object_info, fresh_seed):
    _name, caption, _ = memorizer_data.training_items()[0]
    prompt, entry = run_workflow_in_browser(page, host, object_info, "nudge_toward_style", caption, fresh_seed)
    check_guard_views(page, prompt, entry)
    screenshot(page, "nudge_toward_style", thumbnail="nudge_toward_style")


def test_build_embedding_set_in_browser(page, host, object_info, fresh_seed):
    overrides = {"SaveEmbeddingSet": {"set_name": "from_browser"},
                 "BuildEmbeddingSet": {"item_names": f"guarded image {fresh_seed}"}}
    prompt, entry = run_workflow_in_browser(page, host, object_info, "build_embedding_set", overrides=overrides)
    assert entry["status"].get("status_str") == "success", entry["status"]
    save, = ids_of(prompt, "SaveEmbeddingSet")
    assert "from_browser" in entry["outputs"][save]["text"][0]
    screenshot(page, "build_embedding_set", thumbnail="build_embedding_set")


DEDICATED = {"memorization_guard", "nudge_toward_style", "build_embedding_set"}


@pytest.mark.parametrize("name", sorted(set(WORKFLOWS) - DEDICATED))
def test_other_shipped_workflows_run_in_browser(page, host, object_info, fresh_seed, name):
    """Every shipped workflow without a dedicated test above: runs from the frontend, and the pack's
    nodes in it show the server's verdicts."""
    _name, caption, _ = memorizer_data.training_items()[0]
    prompt, entry = run_workflow_in_browser(page, host, object_info, name, caption, fresh_seed)
    check_guard_views(page, prompt, entry)
    screenshot(page, name, thumbnail=name)


def test_templates_are_listed_with_thumbnails(page, host):
    """The template browser lists the pack's workflows (custom_nodes/<pack>/workflows/*.json) and
    loads their thumbnails from /api/workflow_templates/<pack>/<name>.jpg (the frontend asks for .jpg)."""
    listed = host.get("/workflow_templates")
    assert sorted(listed.get(PACK_NAME, [])) == WORKFLOWS, listed
    for name in WORKFLOWS:
        assert os.path.isfile(os.path.join(WORKFLOWS_DIR, f"{name}.jpg")), f"workflows/{name}.jpg missing: make screenshots"
        with urllib.request.urlopen(f"{host.url}/api/workflow_templates/{PACK_NAME}/{name}.jpg") as resp:
            assert resp.status == 200 and resp.headers["Content-Type"] == "image/jpeg"
    # In the real dialog: the pack is a category, and its cards show the workflows and thumbnails.
    page.evaluate("async () => { await app.extensionManager.command.execute('Comfy.BrowseTemplates'); }")
    page.get_by_text(PACK_NAME).first.click(timeout=30_000)
    deadline = time.time() + 30
    while True:
        dialog = page.evaluate(
            """(sel) => { const outer = [...document.querySelectorAll(sel)].filter(d => !d.parentElement?.closest(sel));
                       return {text: outer.map(d => d.innerText).join('\\n'),
                       imgs: outer.flatMap(d => [...d.querySelectorAll('img')])
                           .map(i => ({src: i.currentSrc || i.src, ok: i.complete && i.naturalWidth > 0}))}; }""", DIALOGS)
        # The frontend fetches thumbnails into blob: URLs; with the pack's category selected only its
        # cards are shown ("Showing N of N templates"), so every loaded card image is ours.
        loaded = [i for i in dialog["imgs"] if i["ok"]]
        if (all(name in dialog["text"] for name in WORKFLOWS) and len(loaded) >= len(WORKFLOWS)
                and f"Showing {len(WORKFLOWS)} of {len(WORKFLOWS)}" in dialog["text"]):
            break
        if time.time() > deadline:
            raise AssertionError(f"template dialog: {dialog['text'][:2000]!r} {dialog['imgs'][:20]}")
        time.sleep(0.5)
    screenshot(page, "template_browser")
