// Turns the pack's node payloads (the `ui` dict of each execution) into what the canvas shows,
// and draws it. Pure functions plus canvas drawing; no ComfyUI imports, so it stays testable and
// independent of frontend internals.

export const COLORS = {
  passed: "#2e9d57",
  flagged: "#d64545",
  regenerated: "#2f7fd1",
  stillFlagged: "#d64545",
  running: "#c98a1b",
  idle: "#6b7280",
  text: "#e5e7eb",
  muted: "#9ca3af",
  panel: "rgba(0, 0, 0, 0.28)",
};

export const PACK_NODE_COLOR = { color: "#2d4a45", bgcolor: "#1f2f2c" };

// --- Graph look-ups (pure: the graph is passed in) -------------------------------------------
// Frontends with subgraphs (1.24+) flatten them when queuing: a node inside a subgraph runs under
// the execution id "a:b" (the subgraph node's id in the root graph, then the node's own id inside
// the subgraph; deeper nesting adds more parts), and every server event uses that id. The root
// graph's getNodeById does not know such ids, so they are resolved one level at a time.

function localId(part) {
  return /^-?\d+$/.test(part) ? Number(part) : part;
}

/** The node an execution id names, in the root graph or inside its subgraphs; null if none. */
export function nodeByExecutionId(rootGraph, id) {
  if (id == null || typeof rootGraph?.getNodeById !== "function") return null;
  const parts = String(id).split(":");
  let graph = rootGraph;
  for (const part of parts.slice(0, -1)) {
    graph = graph.getNodeById(localId(part))?.subgraph;
    if (typeof graph?.getNodeById !== "function") {
      // Not a subgraph path this graph knows (e.g. a frontend without subgraphs): try the id as is.
      return rootGraph.getNodeById(id) ?? null;
    }
  }
  return graph.getNodeById(localId(parts[parts.length - 1])) ?? null;
}

/** Every node of the root graph and of the subgraphs inside it, as [node, execution id] pairs.
 *  One subgraph used twice gives the same node object under two execution ids. */
export function nodesWithExecutionIds(rootGraph, maxDepth = 16) {
  const found = [];
  const visit = (graph, prefix, depth) => {
    for (const node of graph?.nodes ?? graph?._nodes ?? []) {
      const id = `${prefix}${node.id}`;
      found.push([node, id]);
      // A bound on nesting: a malformed workflow must not send the walk round in circles.
      if (node.subgraph && depth < maxDepth) visit(node.subgraph, `${id}:`, depth + 1);
    }
  };
  visit(rootGraph, "", 0);
  return found;
}

const ROW_HEIGHT = 22;
const HEADER_HEIGHT = 20;
const MAX_ROWS = 8;

function parseFirst(output, key) {
  const raw = output?.[key]?.[0];
  if (raw == null) return null;
  try {
    return typeof raw === "string" ? JSON.parse(raw) : raw;
  } catch (err) {
    console.warn(`[embedding nudging] could not parse ${key}:`, err);
    return null;
  }
}

function fmt(x, digits = 4) {
  return typeof x === "number" && Number.isFinite(x) ? x.toFixed(digits) : "–";
}

/** MemorizationFilter: one row per image, distance against the threshold and the nearest item. */
export function verdictView(output) {
  const data = parseFirst(output, "nudging_verdicts");
  if (!data) return null;
  const images = data.images ?? [];
  const flaggedCount = images.filter((im) => im.flagged).length;
  const threshold = data.threshold;
  const rows = images.map((im) => ({
    badge: im.flagged ? "FLAGGED" : "passed",
    color: im.flagged ? COLORS.flagged : COLORS.passed,
    text: `#${im.index}  ${fmt(im.distance)} ${im.flagged ? "<" : "≥"} ${fmt(threshold, 3)}  ~ '${im.nearest}'` +
      (im.clip_cosine != null ? `  clip ${fmt(im.clip_cosine, 3)}` : ""),
    gauge: { value: im.distance, threshold },
  }));
  return {
    kind: "verdicts",
    header: `${flaggedCount} of ${images.length} flagged · threshold ${fmt(threshold, 3)} (tiled L2)`,
    headerColor: flaggedCount ? COLORS.flagged : COLORS.passed,
    rows,
    flaggedCount,
    total: images.length,
    data,
  };
}

const STATUS_COLOR = { passed: COLORS.passed, regenerated: COLORS.regenerated, "still flagged": COLORS.stillFlagged };

/** ConditionalRegenerate: one row per image, its status and the distance before -> after. */
export function statusView(output) {
  const data = parseFirst(output, "nudging_status");
  if (!data) return null;
  const statuses = data.statuses ?? [];
  const rows = statuses.map((status, b) => {
    const before = data.distances_before?.[b];
    const after = data.distances_after?.[b];
    const text = after == null ? `#${b}  ${fmt(before)} to the guarded set`
      : `#${b}  ${fmt(before)} → ${fmt(after)}  (threshold ${fmt(data.threshold, 3)})`;
    return { badge: status, color: STATUS_COLOR[status] ?? COLORS.idle, text };
  });
  const still = statuses.filter((s) => s === "still flagged").length;
  const regenerated = statuses.filter((s) => s === "regenerated").length;
  let header = "all passed: nothing regenerated";
  if (still) header = `${still} still flagged after regeneration`;
  else if (regenerated) header = `${regenerated} regenerated, all clear`;
  // The node's image previews are the replaced originals followed by their replacements.
  const replaced = data.replaced ?? [];
  const labels = [
    ...replaced.map((b) => ({ text: `before #${b}`, short: "before", color: COLORS.flagged })),
    ...replaced.map((b) => ({ text: `after #${b}: ${statuses[b]}`, short: "after",
      color: STATUS_COLOR[statuses[b]] ?? COLORS.idle })),
  ];
  return {
    kind: "status",
    header,
    headerColor: still ? COLORS.stillFlagged : regenerated ? COLORS.regenerated : COLORS.passed,
    rows,
    stillFlagged: still,
    regenerated,
    labels,
    data,
  };
}

/** LatentNudge's result after it ran. */
export function nudgeView(output) {
  const data = parseFirst(output, "nudging_nudge");
  const text = output?.text?.[0];
  if (!data && text == null) return null;
  const rows = [];
  if (data) {
    (data.nudged ?? []).forEach((hit, b) => {
      if (!hit) return;
      rows.push({
        badge: "nudged",
        color: COLORS.regenerated,
        text: `#${b}  cos to undesired ${fmt(data.cos_undesired_before?.[b], 3)} → ${fmt(data.cos_undesired_after?.[b], 3)}`,
      });
    });
  }
  return {
    kind: "nudge",
    header: rows.length ? `done: ${rows.length} latent(s) nudged` : (text ?? "done"),
    headerColor: COLORS.passed,
    rows,
    data,
  };
}

const REGEN_LINE = /^image (\d+): (escaped|STILL A COPY) after (\d+) attempt\(s\), distance (\S+) -> (\S+)/;

/** NudgeRegenerate: one row per flagged image, parsed from its report (ui text). */
export function regenerateView(output) {
  const text = output?.text?.[0];
  if (text == null) return null;
  const rows = [];
  let escaped = 0;
  let still = 0;
  for (const line of String(text).split("\n")) {
    const m = REGEN_LINE.exec(line.trim());
    if (!m) continue;
    const copy = m[2] === "STILL A COPY";
    if (copy) still += 1;
    else escaped += 1;
    rows.push({
      badge: copy ? "STILL A COPY" : "escaped",
      color: copy ? COLORS.stillFlagged : COLORS.regenerated,
      text: `#${m[1]}  after ${m[3]} attempt(s)  ${m[4]} → ${m[5]}`,
    });
  }
  let header = rows.length ? `${escaped} escaped` : String(text).split("\n")[0] || "done";
  if (still) header = `${still} still a copy, ${escaped} escaped`;
  else if (rows.length) header = `all ${escaped} escaped`;
  return {
    kind: "regenerate",
    header,
    headerColor: still ? COLORS.stillFlagged : COLORS.regenerated,
    rows,
    escaped,
    stillCopy: still,
  };
}

/** NudgeRegenerate while it runs: progress runs over max_attempts x steps sampler steps. */
export function regenerateProgressView(value, max, steps, maxAttempts) {
  let header = `regenerating: ${value} / ${max}`;
  if (steps > 0 && maxAttempts > 0 && steps * maxAttempts === max) {
    const attempt = Math.min(maxAttempts, Math.floor(Math.max(0, value - 1) / steps) + 1);
    const step = value - (attempt - 1) * steps;
    header = `regenerating: attempt ${attempt} of up to ${maxAttempts}, step ${step} / ${steps}`;
  }
  return {
    kind: "regenerate",
    header,
    headerColor: COLORS.running,
    rows: [],
    progress: max > 0 ? value / max : 0,
    running: true,
  };
}

export function progressView(value, max) {
  return {
    kind: "nudge",
    header: `optimising latent: step ${value} / ${max}`,
    headerColor: COLORS.running,
    rows: [],
    progress: max > 0 ? value / max : 0,
    running: true,
  };
}

export function messageView(header, color = COLORS.idle) {
  return { kind: "message", header, headerColor: color, rows: [] };
}

/** Height the panel needs inside the node, in canvas units. */
export function panelHeight(view) {
  if (!view) return 0;
  const rows = Math.min(view.rows.length, MAX_ROWS) + (view.rows.length > MAX_ROWS ? 1 : 0);
  return HEADER_HEIGHT + (view.progress != null ? 8 : 0) + rows * ROW_HEIGHT + 6;
}

function pill(ctx, x, y, text, color) {
  ctx.font = "bold 11px sans-serif";
  const w = Math.ceil(ctx.measureText(text).width) + 12;
  ctx.fillStyle = color;
  ctx.beginPath();
  ctx.roundRect(x, y, w, 16, 8);
  ctx.fill();
  ctx.fillStyle = "#ffffff";
  ctx.textBaseline = "middle";
  ctx.textAlign = "left";
  ctx.fillText(text, x + 6, y + 8.5);
  return w;
}

function ellipsize(ctx, text, maxWidth) {
  if (ctx.measureText(text).width <= maxWidth) return text;
  let t = text;
  while (t.length > 1 && ctx.measureText(t + "…").width > maxWidth) t = t.slice(0, -1);
  return t + "…";
}

/** Draw the panel at node-local (x, y) with the given width. */
export function drawPanel(ctx, view, x, y, width) {
  if (!view) return;
  const height = panelHeight(view);
  ctx.save();
  ctx.globalAlpha *= view.stale ? 0.45 : 1;
  ctx.fillStyle = COLORS.panel;
  ctx.beginPath();
  ctx.roundRect(x, y, width, height, 6);
  ctx.fill();
  // Coloured strip on the left: the verdict at a glance.
  ctx.fillStyle = view.headerColor;
  ctx.fillRect(x, y, 4, height);

  ctx.font = "bold 12px sans-serif";
  ctx.textBaseline = "middle";
  ctx.textAlign = "left";
  ctx.fillStyle = view.headerColor;
  ctx.fillText(ellipsize(ctx, view.header, width - 16), x + 10, y + HEADER_HEIGHT / 2 + 1);
  let cy = y + HEADER_HEIGHT;

  if (view.progress != null) {
    ctx.fillStyle = "rgba(255,255,255,0.12)";
    ctx.fillRect(x + 10, cy, width - 20, 5);
    ctx.fillStyle = view.headerColor;
    ctx.fillRect(x + 10, cy, (width - 20) * Math.max(0, Math.min(1, view.progress)), 5);
    cy += 8;
  }

  for (const row of view.rows.slice(0, MAX_ROWS)) {
    const pw = pill(ctx, x + 10, cy + 3, row.badge, row.color);
    let textRight = x + width - 8;
    if (row.gauge) {
      // Distance gauge: the bar fills up to the distance; the white tick marks the threshold.
      const gw = Math.min(70, Math.max(40, width * 0.18));
      const gx = x + width - gw - 8;
      const scale = Math.max(row.gauge.threshold * 3, 1e-6);
      ctx.fillStyle = "rgba(255,255,255,0.12)";
      ctx.fillRect(gx, cy + 8, gw, 6);
      ctx.fillStyle = row.color;
      ctx.fillRect(gx, cy + 8, gw * Math.min(1, Math.max(0, row.gauge.value / scale)), 6);
      ctx.fillStyle = "#ffffff";
      ctx.fillRect(gx + gw / 3 - 1, cy + 5, 2, 12);
      textRight = gx - 6;
    }
    ctx.font = "12px monospace";
    ctx.fillStyle = COLORS.text;
    ctx.textBaseline = "middle";
    ctx.fillText(ellipsize(ctx, row.text, textRight - (x + 16 + pw)), x + 16 + pw, cy + 11.5);
    cy += ROW_HEIGHT;
  }
  if (view.rows.length > MAX_ROWS) {
    ctx.font = "11px sans-serif";
    ctx.fillStyle = COLORS.muted;
    ctx.fillText(`+ ${view.rows.length - MAX_ROWS} more (see the node's report output)`, x + 10, cy + 10);
  }
  ctx.restore();
}

/** Labels over the node's image previews (before/after pairs). rects are node-local [x, y, w, h]. */
export function drawImageLabels(ctx, labels, rects) {
  ctx.save();
  rects.forEach((rect, i) => {
    const label = labels[i];
    if (!label || !rect) return;
    ctx.font = "bold 11px sans-serif";
    const room = rect[2] - 6;
    let text = label.text;
    if (ctx.measureText(text).width + 10 > room && label.short) text = label.short;
    const w = Math.min(room, Math.ceil(ctx.measureText(text).width) + 10);
    if (w < 20) return;
    ctx.globalAlpha = 0.9;
    ctx.fillStyle = label.color;
    ctx.beginPath();
    ctx.roundRect(rect[0] + 4, rect[1] + 4, w, 16, 4);
    ctx.fill();
    ctx.globalAlpha = 1;
    ctx.fillStyle = "#ffffff";
    ctx.textBaseline = "middle";
    ctx.textAlign = "left";
    ctx.fillText(ellipsize(ctx, text, w - 8), rect[0] + 9, rect[1] + 12.5);
  });
  ctx.restore();
}
