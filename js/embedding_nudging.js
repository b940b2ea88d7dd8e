// Embedding Nudging: shows the memorization loop on the canvas.
//
// - MemorizationFilter: one row per image with passed / FLAGGED, distance vs threshold (with a
//   gauge), and the nearest guarded item.
// - ConditionalRegenerate: one row per image with passed / regenerated / still flagged, and
//   before/after labels over its image previews (replaced originals, then their replacements).
// - LatentNudge: a status line with the optimiser's step while it runs, the result after, and
//   "cancelled" when the run is interrupted.
// - NudgeRegenerate: a status line with the attempt and sampler step while it runs; after, one
//   row per flagged image: "escaped" after N attempt(s) or "STILL A COPY", distance before → after.
// - A toast when something was flagged or is still flagged (setting: EmbeddingNudging.Toasts),
//   through the toast service's current methods, its older toast.add, or the legacy dialog.
// - All of it also for nodes inside subgraphs (the server names them "<subgraph node>:<node>"),
//   and with the Vue node renderer ("Nodes 2.0"), where each widget draws on its own canvas.
//
// Only documented extension points are used: registerExtension hooks, api events, onExecuted /
// onDrawForeground chained in beforeRegisterNodeDef, custom canvas widgets with serialize off
// (they never enter the saved workflow or the prompt).
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import {
  COLORS, PACK_NODE_COLOR, drawImageLabels, drawPanel, messageView, nodeByExecutionId, nodesWithExecutionIds, nudgeView,
  panelHeight, progressView, regenerateProgressView, regenerateView, statusView, verdictView,
} from "./nudging_view.js";

const EXTENSION = "EmbeddingNudging.Canvas";
const TOAST_SETTING = "EmbeddingNudging.Toasts";
const PACK_NODES = new Set([
  "LoadEmbeddingSet", "BuildEmbeddingSet", "SaveEmbeddingSet", "MemorizationFilter", "LatentNudge",
  "NudgeRegenerate", "ConditionalRegenerate",
]);
const PACK_CATEGORY = "embedding nudging";
const VIEW_NODES = new Set(["MemorizationFilter", "LatentNudge", "NudgeRegenerate", "ConditionalRegenerate"]);
// Nodes on ConditionalRegenerate's lazy branch: they say whether they ran and show their progress.
const LAZY_NODES = new Set(["LatentNudge", "NudgeRegenerate"]);
const PANEL_WIDGET = "nudging_panel";
const LABEL_WIDGET = "nudging_image_labels";
const MIN_WIDTH = 0; // keep the workflow's layout: only grow in height

function toastsEnabled() {
  const store = app.extensionManager?.setting;
  const value = store?.get ? store.get(TOAST_SETTING) : app.ui?.settings?.getSettingValue?.(TOAST_SETTING);
  return value !== false;
}

// The toast service's own methods per severity (frontends from 1.5x: toast.warning(message, options));
// older ones have only toast.add({severity, summary, detail, life}), deprecated since.
const TOAST_METHODS = { warn: "warning", error: "error", info: "info" };

function toast(severity, summary, detail, life = 8000) {
  if (!toastsEnabled()) return;
  // The toast service exists only on newer frontends; older ones have just the legacy dialog
  // (used for warnings and errors only: a modal for "run cancelled" would be a nuisance), and a
  // page without either still gets the message in the console.
  const manager = app.extensionManager?.toast;
  const method = TOAST_METHODS[severity];
  if (typeof manager?.[method] === "function") {
    manager[method](summary, { description: detail, duration: life });
  } else if (typeof manager?.add === "function") {
    manager.add({ severity, summary, detail, life });
  } else if (severity !== "info" && typeof app.ui?.dialog?.show === "function") {
    // A text node, not an HTML string: item names in the message come from shared set files.
    app.ui.dialog.show(document.createTextNode(`${summary}: ${detail}`));
  } else {
    console.info(`[embedding nudging] ${summary}: ${detail}`);
  }
}

function classOf(node) {
  return node?.comfyClass ?? node?.type;
}

/** The root graph: the one server node ids refer to (app.graph is it, on frontends with or without subgraphs). */
function rootGraph() {
  const graph = app.graph;
  return graph?.rootGraph ?? graph;
}

function redraw() {
  // The canvas itself, so that a node inside the subgraph on screen is redrawn too.
  if (typeof app.canvas?.setDirty === "function") app.canvas.setDirty(true, true);
  else app.graph?.setDirtyCanvas(true, true);
}

/** With the Vue renderer ("Nodes 2.0") each custom widget draws on its own small canvas, redrawn only
 * on resize, palette change or the widget's triggerDraw (set by the renderer): call it on every change. */
function vueNodesMode() {
  return !!globalThis.LiteGraph?.vueNodesMode;
}

/** Under Nodes 2.0 the widget's own canvas: named after the widget, so tests and styles can find it. */
function tagVueCanvas(ctx, widgetName) {
  if (vueNodesMode() && ctx.canvas && ctx.canvas !== app.canvas?.canvas) ctx.canvas.dataset.nudgingWidget = widgetName;
}

function redrawPackWidgets(node) {
  const vue = vueNodesMode();
  for (const w of node.widgets ?? []) {
    if (w.name !== PANEL_WIDGET && w.name !== LABEL_WIDGET) continue;
    // The renderer sizes the widget's canvas by computedHeight first: keep it in step with the view.
    if (vue) w.computedHeight = w.computeSize(node.size[0])[1];
    w.triggerDraw?.();
  }
}

/** Show a view on a node: remember it, make the node tall enough, redraw. */
function setView(node, view) {
  node.nudging = view;
  const min = node.computeSize();
  const width = Math.max(node.size[0], min[0], view ? MIN_WIDTH : 0);
  const height = Math.max(node.size[1], min[1]);
  if (width !== node.size[0] || height !== node.size[1]) node.setSize([width, height]);
  redrawPackWidgets(node);
  redraw();
}

function panelWidget(node) {
  return {
    name: PANEL_WIDGET,
    type: PANEL_WIDGET,
    value: "",
    serialize: false, // not in widgets_values
    options: { serialize: false }, // not in the prompt
    computeSize(width) {
      return [width ?? node.size[0], panelHeight(node.nudging)];
    },
    draw(ctx, drawnNode, width, y) {
      tagVueCanvas(ctx, PANEL_WIDGET);
      if (drawnNode.nudging) drawPanel(ctx, drawnNode.nudging, 10, y + 2, width - 20);
    },
  };
}

function labelWidget(node) {
  return {
    name: LABEL_WIDGET,
    type: LABEL_WIDGET,
    value: "",
    serialize: false,
    options: { serialize: false },
    // On the classic canvas the labels sit on top of the image previews and take no room; the Vue
    // renderer shows images outside the canvas, so there the labels get a row of their own.
    computeSize(width) {
      return [width ?? node.size[0], vueNodesMode() && node.nudging?.labels?.length ? LABEL_ROW_HEIGHT : 0];
    },
    // Drawn after the image preview widget (kept last), so the labels sit on top of the images.
    draw(ctx, drawnNode, width, y) {
      const labels = drawnNode.nudging?.labels;
      tagVueCanvas(ctx, LABEL_WIDGET);
      if (vueNodesMode()) {
        if (labels?.length) drawImageLabels(ctx, labels, labelRow(labels.length, width, y));
        return;
      }
      const imgs = drawnNode.imgs;
      if (!labels?.length || !imgs?.length || imgs.length !== labels.length) return;
      if (imgs.length > 1 && drawnNode.imageIndex == null && drawnNode.imageRects?.length === imgs.length) {
        drawImageLabels(ctx, labels, drawnNode.imageRects);
      } else {
        const preview = drawnNode.widgets?.find((w) => w.name?.includes("image-preview"));
        const index = drawnNode.imageIndex ?? 0;
        if (preview) drawImageLabels(ctx, [labels[index]], [[6, preview.y + 6, drawnNode.size[0] - 12, 20]]);
      }
    },
  };
}

const LABEL_ROW_HEIGHT = 26;

/** n label cells side by side across a widget row: the order of the images below them. */
function labelRow(n, width, y) {
  const cell = (width - 12) / n;
  return Array.from({ length: n }, (_, i) => [6 + i * cell, y, cell, LABEL_ROW_HEIGHT - 4]);
}

function keepLast(node, widget) {
  const widgets = node.widgets;
  if (!widgets) return;
  const i = widgets.indexOf(widget);
  if (i >= 0 && i !== widgets.length - 1) {
    widgets.splice(i, 1);
    widgets.push(widget);
  }
}

function onVerdicts(node, output) {
  const view = verdictView(output);
  if (!view) return;
  setView(node, view);
  if (view.flaggedCount) {
    const flagged = view.data.images.filter((im) => im.flagged);
    const detail = flagged.slice(0, 3)
      .map((im) => `image ${im.index}: distance ${im.distance.toFixed(4)} to '${im.nearest}'`).join("; ");
    toast("warn", `Memorization filter: ${view.flaggedCount} of ${view.total} flagged`,
      `${detail}${flagged.length > 3 ? "; …" : ""} (threshold ${view.data.threshold}). Regenerating.`);
  }
}

function onStatus(node, output) {
  const view = statusView(output);
  if (!view) return;
  setView(node, view);
  if (view.stillFlagged) {
    toast("error", `${view.stillFlagged} image(s) still flagged after regeneration`,
      "Still close to a guarded image: raise NudgeRegenerate's max_attempts or growth (or LatentNudge's beta " +
      "or steps), or set still_flagged_action to 'blank'.", 12000);
  }
}

function onNudge(node, output) {
  const view = nudgeView(output);
  if (view) setView(node, view);
}

function onRegenerate(node, output) {
  const view = regenerateView(output);
  if (view) setView(node, view);
}

const HANDLERS = {
  MemorizationFilter: onVerdicts, ConditionalRegenerate: onStatus, LatentNudge: onNudge, NudgeRegenerate: onRegenerate,
};

function widgetValue(node, name) {
  return node.widgets?.find((w) => w.name === name)?.value;
}

function progressFor(node, value, max) {
  if (classOf(node) === "NudgeRegenerate") {
    return regenerateProgressView(value, max, Number(widgetValue(node, "steps")),
      Number(widgetValue(node, "max_attempts")));
  }
  return progressView(value, max);
}

/** The pack's nodes of the given types, in the root graph and inside subgraphs: node -> its execution ids. */
function nodesOfTypes(types) {
  const found = new Map();
  for (const [node, id] of nodesWithExecutionIds(rootGraph())) {
    if (!types.has(classOf(node))) continue;
    if (!found.has(node)) found.set(node, []);
    found.get(node).push(id);
  }
  return found;
}

function lazyNodes() {
  return nodesOfTypes(LAZY_NODES);
}

// Per run: which execution ids executed, so a LatentNudge that the lazy branch skipped says so.
const run = { promptId: null, ran: new Set() };

function viewNodes() {
  return [...nodesOfTypes(VIEW_NODES).keys()];
}

function ranInThisRun(ids) {
  return ids.some((id) => run.ran.has(id));
}

/** Server events name nodes by execution id: "5" in the root graph, "12:5" inside a subgraph. */
function nodeById(id) {
  return nodeByExecutionId(rootGraph(), id);
}

function bindRunEvents() {
  api.addEventListener("execution_start", ({ detail }) => {
    run.promptId = detail?.prompt_id ?? null;
    run.ran = new Set();
    for (const node of viewNodes()) {
      node.nudgingProgress = null;
      if (LAZY_NODES.has(classOf(node))) setView(node, messageView("waiting: runs only if an image is flagged"));
      else if (node.nudging) node.nudging = { ...node.nudging, stale: true };
    }
    redraw();
  });
  api.addEventListener("executing", ({ detail }) => {
    if (detail == null) return;
    run.ran.add(String(detail));
    const node = nodeById(detail);
    if (classOf(node) === "NudgeRegenerate") {
      setView(node, { ...messageView("nudging the flagged latent(s)…", COLORS.running), running: true });
    }
  });
  api.addEventListener("executed", ({ detail }) => {
    run.ran.add(String(detail?.display_node ?? detail?.node));
  });
  api.addEventListener("progress", ({ detail }) => {
    const node = nodeById(detail?.node);
    if (!LAZY_NODES.has(classOf(node))) return;
    node.nudgingProgress = { value: detail.value, max: detail.max };
    setView(node, progressFor(node, detail.value, detail.max));
  });
  api.addEventListener("execution_interrupted", ({ detail }) => {
    for (const [node, ids] of lazyNodes()) {
      if (node.nudging?.running) {
        const p = node.nudgingProgress ?? { value: 0, max: 0 };
        const at = classOf(node) === "NudgeRegenerate" && p.max
          ? progressFor(node, p.value, p.max).header.replace("regenerating: ", "")
          : `step ${p.value} / ${p.max}`;
        setView(node, messageView(`cancelled at ${at}: nothing passed on`, COLORS.idle));
      } else if (!ranInThisRun(ids)) {
        setView(node, messageView("cancelled before it ran", COLORS.idle));
      }
    }
    toast("info", "Run cancelled", `Stopped at ${detail?.node_type ?? "a node"}.`, 4000);
  });
  api.addEventListener("execution_error", ({ detail }) => {
    const node = nodeById(detail?.node_id);
    if (node && VIEW_NODES.has(classOf(node))) {
      setView(node, messageView(`failed: ${detail.exception_message ?? "error"}`, COLORS.flagged));
    }
  });
  api.addEventListener("execution_success", () => {
    for (const [node, ids] of lazyNodes()) {
      if (!ranInThisRun(ids)) {
        setView(node, messageView("not run: nothing was flagged (lazy branch skipped)", COLORS.passed));
      }
    }
  });
}

// The frontend imports every .js under each pack's web folder. If this module is served twice (the
// pack installed under two folder names, or fetched under another URL), a second registration would
// throw on newer frontends and double every handler and widget on older ones: register once per page.
// Symbol.for gives both module copies the same key.
const REGISTERED = Symbol.for(`${EXTENSION}.registered`);

function firstRegistration() {
  if (window[REGISTERED] || app.extensions?.some?.((e) => e.name === EXTENSION)) {
    console.warn(`[embedding nudging] ${EXTENSION} is already registered; this copy of the script does nothing`);
    return false;
  }
  window[REGISTERED] = true;
  return true;
}

if (firstRegistration()) app.registerExtension({
  name: EXTENSION,
  settings: [
    {
      id: TOAST_SETTING,
      category: ["Embedding Nudging", "Notifications", "Toasts"],
      name: "Show a toast when an image is flagged or still flagged after regeneration",
      type: "boolean",
      defaultValue: true,
    },
  ],

  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (String(nodeData.category ?? "").startsWith(PACK_CATEGORY)) PACK_NODES.add(nodeData.name);
    const handler = HANDLERS[nodeData.name];
    if (!handler) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (output) {
      const r = onExecuted?.apply(this, arguments);
      handler(this, output);
      return r;
    };
    if (nodeData.name === "ConditionalRegenerate") {
      const onDrawForeground = nodeType.prototype.onDrawForeground;
      nodeType.prototype.onDrawForeground = function () {
        const r = onDrawForeground?.apply(this, arguments);
        // The image preview widget appears after a run; keep the label overlay drawn after it.
        if (this.nudgingLabels) keepLast(this, this.nudgingLabels);
        return r;
      };
    }
  },

  nodeCreated(node) {
    const type = classOf(node);
    if (!PACK_NODES.has(type)) return;
    if (!node.color && !node.bgcolor) {
      node.color = PACK_NODE_COLOR.color;
      node.bgcolor = PACK_NODE_COLOR.bgcolor;
    }
    if (!VIEW_NODES.has(type)) return;
    node.addCustomWidget(panelWidget(node));
    if (type === "ConditionalRegenerate") node.nudgingLabels = node.addCustomWidget(labelWidget(node));
  },

  setup() {
    bindRunEvents();
  },
});
