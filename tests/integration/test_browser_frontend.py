"""The pack's canvas UI on what today's frontend adds (issue #13): the Vue node renderer ("Nodes 2.0"),
the toast service's current methods with the older ones as fallbacks, one registration when the
script is served twice, and the node docs in the node library's help panel.

The classic canvas is covered by test_browser.py; these tests reuse its browser session and helpers
and skip where the running frontend lacks the feature (the 0.3.75 host's frontend has no Vue nodes).
"""
from __future__ import annotations

import os

import pytest
from memorizer import data as memorizer_data
from test_browser import (GUARD_NODES, STYLE_NODES, browser, check_guard_views, ids_of, node_views,  # noqa: F401
                          open_page, page, run_workflow_in_browser, screenshot, start_and_cancel,
                          wait_for_toast)

from host.comfy_host import PACK_NAME

pytestmark = pytest.mark.browser

VUE_SETTING = "Comfy.VueNodes.Enabled"
EXTENSION = "EmbeddingNudging.Canvas"
DOCS_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "js", "docs")


@pytest.fixture
def vue_page(browser, host):  # noqa: F811 (the imported fixture)
    """A page with Nodes 2.0 on (the user setting, stored on the server, read when the page loads)."""
    host.request("POST", "/settings", {VUE_SETTING: True})
    try:
        with open_page(browser, host) as pg:
            if not pg.evaluate("() => !!window.LiteGraph?.vueNodesMode"):
                pytest.skip("this frontend has no Vue node renderer (Nodes 2.0)")
            yield pg
    finally:
        host.request("POST", "/settings", {VUE_SETTING: False})


def widget_canvas(page, node_id: str, widget: str) -> dict | None:
    """What the Vue renderer shows of one of the pack's widgets: {drawn, hash, height} or None."""
    return page.evaluate("""([id, name]) => { const n = app.graph.getNodeById(Number(id));
                                              const w = n?.widgets?.find(w => w.name === name);
                                              return w ? widgetCanvas(n, w) : null; }""", [node_id, widget])


def test_guard_ui_with_nodes_2_0(vue_page, host, object_info, fresh_seed):
    """With the Vue renderer on, every pack node's panel is drawn in its node's element and shows the
    server's verdicts (check_guard_views reads the panels' canvases there), and ConditionalRegenerate's
    before/after labels get a row of their own (the images are not on the graph canvas)."""
    page = vue_page
    _name, caption, _ = memorizer_data.training_items()[1]
    empty = {nid: widget_canvas(page, nid, "nudging_panel") for nid in
             page.evaluate("() => app.graph.nodes.filter(n => n.widgets?.some(w => w.name === 'nudging_panel')).map(n => String(n.id))")}
    prompt, entry = run_workflow_in_browser(page, host, object_info, "nudge_toward_style", caption, fresh_seed,
                                            {"MemorizationFilter": {"threshold": 1.0}})
    result = check_guard_views(page, prompt, entry)
    assert result["status"]["statuses"] == ["still flagged"]
    for nid in ids_of(prompt, "MemorizationFilter") + ids_of(prompt, "ConditionalRegenerate") + ids_of(prompt, "LatentNudge"):
        shown = widget_canvas(page, nid, "nudging_panel")
        assert shown and shown["drawn"], (nid, shown)
        assert empty.get(nid) is None or empty[nid]["hash"] != shown["hash"], f"panel of node {nid} never redrawn"
    regen, = ids_of(prompt, "ConditionalRegenerate")
    assert result["views"][regen]["labels"] == ["before #0", "after #0: still flagged"]
    labels = widget_canvas(page, regen, "nudging_image_labels")
    assert labels and labels["drawn"], labels
    wait_for_toast(page, "still flagged after regeneration")
    screenshot(page, "nodes_2_0_guard_still_flagged", STYLE_NODES)


def test_progress_and_cancel_with_nodes_2_0(vue_page, host, object_info, fresh_seed):
    """NudgeRegenerate's progress is redrawn live in the Vue node (the panel's pixels change as the
    steps advance), and a cancel shows 'cancelled at ...' there too."""
    def panel_advances(page, nid):
        first = widget_canvas(page, nid, "nudging_panel")
        assert first and first["drawn"], first
        step = page.evaluate("(id) => app.graph.getNodeById(Number(id)).nudgingProgress.value", nid)
        page.wait_for_function("([id, step]) => app.graph.getNodeById(Number(id)).nudgingProgress?.value > step",
                               arg=[nid, step], timeout=120_000)
        page.wait_for_timeout(100)
        later = widget_canvas(page, nid, "nudging_panel")
        assert later["hash"] != first["hash"], "the progress panel was not redrawn as the steps advanced"

    # One attempt of 2,000 steps: ComfyUI (0.30) sends a progress update only every 0.5 % of the
    # node's total (attempts x steps), here every 10 steps.
    start_and_cancel(vue_page, host, object_info, "memorization_guard", "NudgeRegenerate",
                     {"NudgeRegenerate": {"steps": 2000, "max_attempts": 1}}, fresh_seed,
                     lambda h: h.startswith("regenerating: attempt "), "nodes_2_0_nudge_regenerate", GUARD_NODES,
                     while_running=panel_advances)
    nid, = [n for n, v in node_views(vue_page).items() if v["type"] == "NudgeRegenerate"]
    assert node_views(vue_page)[nid]["header"].startswith("cancelled at ")
    assert widget_canvas(vue_page, nid, "nudging_panel")["drawn"]


TOAST_SPY = """() => {
    // Record the toast service's calls without hiding them (the real methods still run).
    const t = app.extensionManager.toast;
    window.__toastCalls = [];
    for (const m of ["add", "warning", "error", "info"]) {
        const real = t[m];
        if (typeof real !== "function" || real.__spied) continue;
        const spy = function (...args) { window.__toastCalls.push([m, JSON.stringify(args[0])]); return real.apply(this, args); };
        spy.__spied = true;
        t[m] = spy;
    }
}"""


def replay_executed(page, node_id: str, output: dict) -> None:
    """Hand a node the server's 'executed' output again, as the frontend does when the message arrives."""
    page.evaluate("([id, out]) => app.graph.getNodeById(Number(id)).onExecuted(out)", [node_id, output])


def test_toasts_use_the_current_service_and_fall_back(page, host, object_info, fresh_seed):
    """The toast goes through the service's per-severity method where the frontend has it (1.5x),
    else through toast.add (older frontends), else the legacy dialog. The first path on a real run;
    the fallbacks by handing the node that run's own output again with the newer methods removed."""
    page.evaluate(TOAST_SPY)
    _name, caption, _ = memorizer_data.training_items()[2]
    prompt, entry = run_workflow_in_browser(page, host, object_info, "memorization_guard", caption, fresh_seed,
                                            {"MemorizationFilter": {"threshold": 1.0}, "NudgeRegenerate": {"max_attempts": 1}})
    assert check_guard_views(page, prompt, entry)["status"]["statuses"] == ["still flagged"]
    wait_for_toast(page, "still flagged after regeneration")
    calls = page.evaluate("() => window.__toastCalls")
    has_methods = page.evaluate("() => typeof app.extensionManager.toast.warning === 'function'")
    ours = [c for c in calls if "flagged" in c[1]]
    assert ours, calls
    if has_methods:
        assert {m for m, _ in ours} == {"warning", "error"}, ours    # never the deprecated add
    else:
        assert {m for m, _ in ours} == {"add"}, ours

    regen, = ids_of(prompt, "ConditionalRegenerate")
    output = entry["outputs"][regen]
    # An older frontend's service: add only.
    page.evaluate("""() => { const t = app.extensionManager.toast; window.__savedToast = {...t};
                             window.__toastCalls = []; for (const m of ["warning", "error", "info"]) t[m] = undefined; }""")
    try:
        replay_executed(page, regen, output)
        calls = page.evaluate("() => window.__toastCalls")
        assert [m for m, text in calls if "still flagged" in text] == ["add"], calls
        # No toast service at all: the legacy dialog, with the message as text.
        page.evaluate("() => { app.extensionManager.toast.add = undefined; }")
        replay_executed(page, regen, output)
        page.wait_for_function("() => [...document.querySelectorAll('.comfy-modal, [role=dialog], .p-dialog')]"
                               ".some(d => d.innerText.includes('still flagged after regeneration'))", timeout=10_000)
    finally:
        page.evaluate("() => Object.assign(app.extensionManager.toast, window.__savedToast)")


def test_the_extension_registers_once_when_served_twice(page, host):
    """The pack's script fetched again under another URL (the pack installed under a second folder
    name): the second copy warns and registers nothing; the page keeps one extension and no error."""
    result = page.evaluate(
        """async ([pack, name]) => {
            const warnings = [], warn = console.warn;
            console.warn = (...args) => { warnings.push(args.join(" ")); warn(...args); };
            try { await import(`/extensions/${pack}/embedding_nudging.js?served=twice`); }
            finally { console.warn = warn; }
            return {count: app.extensions.filter(e => e.name === name).length, warnings};
        }""", [PACK_NAME, EXTENSION])
    assert result["count"] == 1, result
    assert any("already registered" in w for w in result["warnings"]), result
    assert not page.nudging_errors, page.nudging_errors


def first_words(node_id: str, count: int = 6) -> str:
    """The first words of a node doc's prose, as the help panel renders them (no markdown markers)."""
    with open(os.path.join(DOCS_DIR, f"{node_id}.md"), encoding="utf-8") as fh:
        first = next(line for line in fh if line.strip() and not line.startswith("#"))
    return " ".join(first.replace("*", "").replace("`", "").split()[:count])


HELP_TEXT = "(words) => [...document.querySelectorAll('.node-help-content')].some(e => e.innerText.includes(words))"


def test_node_docs_show_in_the_help_panel(page, host, object_info):
    """Each pack node's help renders its js/docs/<NodeID>.md (the frontend fetches it from the pack's
    web folder), opened as a user does: on frontends with the properties panel (1.5x) its Info tab
    for the selected node, on older ones the node library's Learn more button."""
    node_ids = sorted(f[:-3] for f in os.listdir(DOCS_DIR) if f.endswith(".md"))
    pack_nodes = {n for n, info in object_info.items()
                  if info.get("python_module", "").split(".")[:2] == ["custom_nodes", PACK_NAME]}
    assert set(node_ids) == pack_nodes, (node_ids, pack_nodes)
    panel = page.get_by_role("button", name="Toggle properties panel")
    info = page.get_by_role("tab", name="Info")
    for node_id in node_ids:
        page.evaluate("""(type) => { app.graph.clear(); const n = LiteGraph.createNode(type); n.pos = [200, 200];
                                     app.graph.add(n); app.canvas.deselectAll?.(); app.canvas.select(n); }""", node_id)
        if not info.count() and panel.count():
            panel.first.click()
            page.wait_for_timeout(500)
        if not info.count():
            break               # no Info tab in this frontend's properties panel (1.47): the library's help
        info.first.click(timeout=10_000)
        page.wait_for_function(HELP_TEXT, arg=first_words(node_id), timeout=30_000)
        if node_id == "MemorizationFilter":
            screenshot(page, "help_panel_memorization_filter")
    else:
        return
    page.evaluate("async () => { await app.extensionManager.command.execute('Workspace.ToggleSidebarTab.node-library'); }")
    search = page.locator("input[placeholder^='Search']").first
    search.fill("Memorization Filter", timeout=30_000)
    page.get_by_text("Memorization Filter (Nudging)").first.hover(timeout=30_000)
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    learn_more = page.get_by_role("button", name="Learn more").first
    try:
        learn_more.wait_for(timeout=5_000)
    except PlaywrightTimeout:
        pytest.skip("this frontend shows node docs neither in a properties-panel Info tab nor behind a Learn more "
                    "button in its node library")
    learn_more.click(timeout=30_000)
    page.wait_for_function(HELP_TEXT, arg=first_words("MemorizationFilter"), timeout=30_000)
