// bus_guard console: the page's whole logic, no dependencies, no build step.
//
// Every value from the bus (principals, actions, resources, reasons, messages, payloads)
// reaches the DOM as text: el() appends strings as Text nodes and sets attributes with
// setAttribute; nothing here assigns innerHTML or builds markup from strings.
"use strict";
(() => {
  const meta = (name) => document.querySelector(`meta[name="${name}"]`).getAttribute("content");
  const CSRF = meta("csrf-token");
  const APPROVER = meta("approver");
  const KID = meta("approver-kid");
  const SVG = "http://www.w3.org/2000/svg";
  const FEED_KEEP = 1000;
  const FEED_SHOW = 200;
  const EFFECT_COLORS = {
    allow: "#1a7f37", deny: "#b42318", hold: "#b08800", "would-deny": "#8250df",
    approve: "#0969da", reject: "#cf222e",
  };
  const PALETTE = ["#0969da", "#b42318", "#1a7f37", "#b08800", "#8250df", "#bf3989",
    "#1b7c83", "#953800", "#57606a", "#4d2d00", "#0550ae", "#6e7781"];

  const $ = (id) => document.getElementById(id);

  function el(tag, props, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(props || {})) {
      if (value === undefined || value === null || value === false) continue;
      if (key === "class") node.className = value;
      else if (key === "text") node.textContent = String(value);
      else if (key === "onclick") node.addEventListener("click", value);
      else node.setAttribute(key, String(value));
    }
    for (const child of children) {
      if (child === undefined || child === null) continue;
      node.append(typeof child === "string" ? document.createTextNode(child) : child);
    }
    return node;
  }

  function svg(tag, attrs, text) {
    const node = document.createElementNS(SVG, tag);
    for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, String(value));
    if (text !== undefined) node.textContent = String(text);
    return node;
  }

  const pad = (n, w = 2) => String(n).padStart(w, "0");
  function utc(ts) {
    if (!(ts > 0)) return "?";
    const d = new Date(ts * 1000);
    return `${pad(d.getUTCHours())}:${pad(d.getUTCMinutes())}:${pad(d.getUTCSeconds())}.${pad(d.getUTCMilliseconds(), 3)}`;
  }
  function iso(ts) { return ts > 0 ? new Date(ts * 1000).toISOString() : "?"; }
  function span(seconds) {
    let left = Math.max(0, Math.floor(seconds));
    const units = [["d", 86400], ["h", 3600], ["m", 60], ["s", 1]];
    const parts = [];
    for (const [unit, size] of units) {
      if (left >= size || (unit === "s" && parts.length === 0)) {
        parts.push(`${Math.floor(left / size)}${unit}`);
        left %= size;
      }
      if (parts.length === 2 || (parts.length && unit === "m")) break;
    }
    return parts.join("");
  }

  // --- the connection ----------------------------------------------------------------------
  const connection = $("connection");
  function connectionState(state, text) {
    connection.dataset.state = state;
    connection.textContent = text;
  }

  // --- the feed ----------------------------------------------------------------------------
  let feed = [];  // oldest first
  const filters = { principal: $("f-principal"), action: $("f-action"), reason: $("f-reason") };

  function subjectMatches(pattern, value) {
    const want = pattern.split("."), got = value.split(".");
    for (let i = 0; i < want.length; i++) {
      if (want[i] === ">" && i === want.length - 1) return got.length > i;
      if (i >= got.length || (want[i] !== "*" && want[i] !== got[i])) return false;
    }
    return got.length === want.length;
  }

  function passes(item) {
    const principal = filters.principal.value.trim();
    const action = filters.action.value.trim();
    const reason = filters.reason.value.trim();
    if (principal && !item.principal.includes(principal)) return false;
    if (action) {
      const wild = action.includes("*") || action.endsWith(">");
      if (wild ? !subjectMatches(action, item.action) : !item.action.includes(action)) return false;
    }
    if (reason && !item.reason.includes(reason)) return false;
    return true;
  }

  function decisionButton(id) {
    return el("button", {
      type: "button", class: "linkish", "data-decision": id, text: id,
      "aria-label": `lineage of decision ${id}`, onclick: () => showLineage(id),
    });
  }

  function feedRow(item) {
    const why = el("td", { class: "payload" });
    if (item.message) why.append(el("span", { class: "message", text: item.message }));
    if (item.payload) {
      why.append(el("span", { class: "payload-text", text: item.payload + (item.payload_cut ? " …(cut)" : "") }));
    }
    return el("tr", { "data-decision": item.decision_id, "data-effect": item.effect },
      el("td", { class: "mono", title: iso(item.ts), text: utc(item.ts) }),
      el("td", {}, el("span", { class: `effect effect-${item.effect}`, text: item.effect })),
      el("td", { class: "principal", text: item.principal || "?" }),
      el("td", { class: "action", text: item.action }),
      el("td", { class: "resource", text: item.resource }),
      el("td", { class: "reason", text: item.reason }),
      el("td", { class: "rules", text: item.rules.join(", ") || "-" }),
      el("td", {}, decisionButton(item.decision_id)),
      why);
  }

  // Paused: rows keep arriving and are counted, the table stays still (to read, to tab).
  let paused = false;
  const pause = $("feed-pause");
  pause.addEventListener("click", () => {
    paused = !paused;
    pause.setAttribute("aria-pressed", String(paused));
    pause.textContent = paused ? "Resume" : "Pause";
    renderFeed(true);
  });

  let feedQueued = false;
  function renderFeed(force) {
    if (paused && !force) {
      $("feed-count").textContent = `paused: ${feed.length} rows, newest not shown`;
      return;
    }
    if (feedQueued) return;
    feedQueued = true;
    requestAnimationFrame(() => {
      feedQueued = false;
      if (paused && !force) return;
      const body = $("feed-table").tBodies[0];
      const rows = [];
      let matching = 0;
      for (let i = feed.length - 1; i >= 0; i--) {
        if (!passes(feed[i])) continue;
        matching++;
        if (rows.length < FEED_SHOW) rows.push(feedRow(feed[i]));
      }
      body.replaceChildren(...rows);
      $("feed-count").textContent = (paused ? "paused: " : "") + `${matching} of ${feed.length} shown` +
        (matching > FEED_SHOW ? ` (newest ${FEED_SHOW})` : "");
    });
  }
  for (const input of Object.values(filters)) input.addEventListener("input", () => renderFeed(true));
  $("filters").addEventListener("submit", (e) => e.preventDefault());

  // --- open holds --------------------------------------------------------------------------
  const holdRows = new Map();  // decision id -> {tr, age, approvals, expires, hold}
  const reasons = new Map();   // decision id -> what the operator typed
  const pending = new Set();

  function approvalsText(hold) {
    if (!hold.in_ledger) return "not in the ledger (cannot be voted on)";
    if (!hold.quorum) return "-/- (no approvers recorded)";
    let text = `${hold.approved_by.length}/${hold.quorum}`;
    if (hold.approved_by.length) text += ` (${hold.approved_by.join(", ")})`;
    if (hold.rejected_by.length) text += `; rejected by ${hold.rejected_by.join(", ")}`;
    if (hold.approvers.length) text += `; approvers: ${hold.approvers.join(", ")}`;
    return text;
  }
  function expiresText(hold, now) {
    if (!hold.expires) return "no expiry";
    return hold.expires > now ? `in ${span(hold.expires - now)}` : `expired ${span(now - hold.expires)} ago`;
  }

  function voteCell(hold) {
    const cell = el("td", { class: "vote" });
    if (!APPROVER) {
      cell.append(el("span", { class: "note", text: "no --approver-key" }));
      return cell;
    }
    const id = hold.decision_id;
    const input = el("input", { type: "text", maxlength: 512, placeholder: "reason", "aria-label": `reason for hold ${id}` });
    input.value = reasons.get(id) || "";
    input.addEventListener("input", () => reasons.set(id, input.value));
    const approve = el("button", { type: "button", class: "approve", text: "Approve", "aria-label": `approve hold ${id}` });
    const reject = el("button", { type: "button", class: "reject", text: "Reject", "aria-label": `reject hold ${id}` });
    approve.addEventListener("click", () => vote(id, "approve", input, [approve, reject]));
    reject.addEventListener("click", () => vote(id, "reject", input, [approve, reject]));
    cell.append(input, approve, reject);
    return cell;
  }

  function renderHolds(data) {
    const body = $("holds-table").tBodies[0];
    const now = Date.now() / 1000;
    const seen = new Set();
    for (const hold of data.holds) {
      seen.add(hold.decision_id);
      let row = holdRows.get(hold.decision_id);
      if (!row) {
        row = {
          age: el("td", { class: "num age" }),
          approvals: el("td", { class: "approvals" }),
          expires: el("td", { class: "expires" }),
        };
        row.tr = el("tr", { "data-decision": hold.decision_id },
          el("td", {}, decisionButton(hold.decision_id)),
          row.age,
          el("td", { class: "principal", text: hold.principal || "?" }),
          el("td", { class: "action", text: hold.action }),
          el("td", { class: "resource", text: hold.resource }),
          el("td", { class: "rules", text: hold.rules.join(", ") || "-" }),
          row.approvals, row.expires, voteCell(hold));
        holdRows.set(hold.decision_id, row);
        body.append(row.tr);
      }
      row.hold = hold;
      row.approvals.textContent = approvalsText(hold);
      row.expires.textContent = expiresText(hold, now);
      row.age.textContent = span(now - hold.ts);
    }
    for (const [id, row] of holdRows) {
      if (!seen.has(id)) { row.tr.remove(); holdRows.delete(id); reasons.delete(id); }
    }
    $("holds-count").textContent = `(${data.holds.length}${data.more ? "+" : ""})`;
    $("holds-empty").hidden = data.holds.length > 0 || Boolean(data.error);
    const error = $("holds-error");
    error.hidden = !data.error;
    error.textContent = data.error || "";
  }

  function tickHolds() {
    const now = Date.now() / 1000;
    for (const row of holdRows.values()) {
      row.age.textContent = span(now - row.hold.ts);
      row.expires.textContent = expiresText(row.hold, now);
    }
  }
  setInterval(tickHolds, 1000);

  async function vote(id, verdict, input, buttons) {
    if (pending.has(id)) return;
    pending.add(id);
    for (const b of buttons) b.disabled = true;
    const result = $("vote-result");
    result.dataset.ok = "";
    result.textContent = `${verdict} hold ${id}: signing and waiting for the gateway…`;
    let answer;
    try {
      const response = await fetch(`/api/holds/${encodeURIComponent(id)}/${verdict}`, {
        method: "POST",
        credentials: "same-origin",
        headers: { "Content-Type": "application/json", "X-CSRF-Token": CSRF },
        body: JSON.stringify({ reason: input.value }),
      });
      answer = await response.json().catch(() => ({ ok: false, message: `HTTP ${response.status}` }));
    } catch (err) {
      answer = { ok: false, message: `the console did not answer: ${err}` };
    } finally {
      pending.delete(id);
      for (const b of buttons) b.disabled = false;
    }
    result.dataset.ok = String(Boolean(answer.ok));
    result.textContent = `${verdict} hold ${id}: ${answer.message || ""}`;
  }

  // --- gateways ----------------------------------------------------------------------------
  const ms = (s) => (typeof s === "number" ? (s * 1000).toFixed(1) : "-");
  function renderGateways(rows) {
    const body = $("gateways-table").tBodies[0];
    body.replaceChildren(...rows.map((g) => el("tr", { "data-gateway": g.gateway, "data-service": g.service_id },
      el("td", { class: "mono", title: `service ${g.service_id}`, text: g.gateway }),
      el("td", {}, el("span", { class: `health-${g.health.replace(/ /g, "-")}`, text: g.health })),
      el("td", { text: `${g.mode}/${g.artifacts}` + (g.policy_mode ? ` (${g.policy_mode})` : "") }),
      el("td", { class: "policy-version", text: g.policy_version }),
      el("td", { class: "policy-revision", text: g.policy_revision || "-" }),
      el("td", { class: "mono policy-digest", title: g.policy_digest, text: g.policy_digest.slice(0, 23) }),
      el("td", { class: "mono kid", text: g.kid }),
      el("td", { class: "num decided", text: g.decided }),
      el("td", { class: "num errors", text: g.errors }),
      el("td", { class: "num", text: g.queued ?? "-" }),
      el("td", { class: "num", text: `${ms(g.p50_s)} / ${ms(g.p99_s)}` }),
      el("td", { class: "num", text: typeof g.uptime_s === "number" ? span(g.uptime_s) : "-" }))));
    $("gateways-count").textContent = `(${rows.length})`;
    $("gateways-empty").hidden = rows.length > 0;
  }

  // --- the chart ---------------------------------------------------------------------------
  const colors = new Map();
  function colorOf(group, by) {
    if (by === "effect" && EFFECT_COLORS[group]) return EFFECT_COLORS[group];
    if (!colors.has(group)) colors.set(group, PALETTE[colors.size % PALETTE.length]);
    return colors.get(group);
  }
  let rates = null;
  const groupBy = $("group-by");
  groupBy.addEventListener("change", () => rates && renderRates(rates));

  function renderRates(data) {
    rates = data;
    const by = groupBy.value;
    const chart = $("chart");
    for (const node of [...chart.childNodes]) {
      if (node.nodeName !== "title" && node.nodeName !== "desc") node.remove();
    }
    const W = 900, H = 220, left = 44, right = 8, top = 10, bottom = 22;
    const plotW = W - left - right, plotH = H - top - bottom;
    const points = data.points;
    const end = points.length ? points[points.length - 1][0] : Date.now() / 1000;
    const start = end - data.window_s;
    // Bars no thinner than ~6px: polls are added up into bins of binS seconds.
    const binS = Math.max(data.interval_s, data.window_s / 150);
    const bins = new Map();
    for (const [t, counts] of points) {
      const bin = Math.ceil(t / binS) * binS;
      const out = bins.get(bin) || {};
      for (const [key, n] of Object.entries(counts)) {
        const slash = key.indexOf("/");
        const group = by === "effect" ? key.slice(0, slash) : key.slice(slash + 1);
        out[group] = (out[group] || 0) + n;
      }
      bins.set(bin, out);
    }
    const grouped = [...bins.entries()];
    let peak = 0;
    for (const [, counts] of grouped) {
      const sum = Object.values(counts).reduce((a, b) => a + b, 0);
      peak = Math.max(peak, sum / binS);
    }
    const yMax = peak > 0 ? niceCeil(peak) : 1;
    const x = (t) => left + ((t - start) / data.window_s) * plotW;
    const y = (rate) => top + plotH - (rate / yMax) * plotH;
    for (const frac of [0, 0.5, 1]) {
      const value = yMax * frac;
      chart.append(svg("line", { x1: left, x2: W - right, y1: y(value), y2: y(value), stroke: "#d0d7de", "stroke-width": 1 }));
      chart.append(svg("text", { x: left - 4, y: y(value) + 4, "text-anchor": "end", "font-size": 11, fill: "#333" }, fmtRate(value)));
    }
    const minutes = data.window_s / 60;
    for (const frac of [0, 0.5, 1]) {
      const label = frac === 1 ? "now" : `-${fmtRate(minutes * (1 - frac))}m`;
      chart.append(svg("text", { x: left + frac * plotW, y: H - 6, "text-anchor": frac === 0 ? "start" : frac === 1 ? "end" : "middle", "font-size": 11, fill: "#333" }, label));
    }
    const barW = Math.max(1, (binS / data.window_s) * plotW - 1);
    const groups = new Set();
    for (const [t, counts] of grouped) {
      let base = 0;
      for (const group of Object.keys(counts).sort()) {
        const n = counts[group];
        if (!n) continue;
        groups.add(group);
        const rate = n / binS;
        const rect = svg("rect", {
          x: Math.min(x(t), W - right) - barW, y: y(base + rate), width: barW, height: Math.max(0.5, y(base) - y(base + rate)),
          fill: colorOf(group, by), "data-group": group, "data-count": n, class: "bar",
        });
        rect.append(svg("title", {}, `${utc(t)} ${group}: ${n} (${fmtRate(rate)}/s)`));
        chart.append(rect);
        base += rate;
      }
    }
    const legend = $("legend");
    legend.replaceChildren(...[...groups].sort().map((group) => {
      const item = el("li", { text: group });
      item.style.setProperty("--swatch", colorOf(group, by));
      return item;
    }));
    renderRateTable(data);
  }

  function niceCeil(v) {
    const p = Math.pow(10, Math.floor(Math.log10(v)));
    for (const m of [1, 2, 5, 10]) if (v <= m * p) return m * p;
    return 10 * p;
  }
  function fmtRate(v) { return v >= 10 || Number.isInteger(v) ? String(Math.round(v)) : v.toFixed(1); }

  function renderRateTable(data) {
    const points = data.points;
    const end = points.length ? points[points.length - 1][0] : 0;
    const lastMinute = {};
    let first = end;
    for (const [t, counts] of points) {
      if (t <= end - 60) continue;
      first = Math.min(first, t - data.interval_s);
      for (const [key, n] of Object.entries(counts)) lastMinute[key] = (lastMinute[key] || 0) + n;
    }
    const seconds = Math.max(data.interval_s, end - first);
    $("window-head").textContent = `in the last ${span(data.window_s)}`;
    $("rates-table").tBodies[0].replaceChildren(...data.rows.map((row) => {
      const key = `${row.effect}/${row.reason}`;
      return el("tr", { "data-effect": row.effect, "data-reason": row.reason },
        el("td", {}, el("span", { class: `effect effect-${row.effect}`, text: row.effect })),
        el("td", { class: "reason", text: row.reason }),
        el("td", { class: "num window", text: row.window }),
        el("td", { class: "num rate", text: ((lastMinute[key] || 0) / seconds).toFixed(2) }),
        el("td", { class: "num total", text: row.total }));
    }));
  }

  // --- lineage -----------------------------------------------------------------------------
  async function showLineage(id) {
    const section = $("lineage");
    section.hidden = false;
    $("lineage-id").textContent = id;
    $("lineage-ancestors").textContent = "";
    $("lineage-descendants").textContent = "";
    $("lineage-status").textContent = "reading the ledger…";
    section.scrollIntoView({ block: "nearest" });
    $("lineage-title").setAttribute("tabindex", "-1");
    $("lineage-title").focus();
    let answer;
    try {
      const response = await fetch(`/api/lineage/${encodeURIComponent(id)}`, { credentials: "same-origin" });
      answer = await response.json();
    } catch (err) {
      answer = { found: false, message: `the console did not answer: ${err}` };
    }
    if ($("lineage-id").textContent !== id) return;  // another one was clicked meanwhile
    if (!answer.found) {
      $("lineage-status").textContent = answer.message || "not found";
      return;
    }
    $("lineage-status").textContent = answer.cut ? "the ledger was read in part (too large)" : "";
    $("lineage-ancestors").textContent = answer.ancestors.join("\n");
    $("lineage-descendants").textContent = answer.descendants.join("\n");
  }
  $("lineage-close").addEventListener("click", () => { $("lineage").hidden = true; });

  // --- the voter and the event stream ------------------------------------------------------
  $("voter").textContent = APPROVER
    ? `Votes are signed in the console process as ${APPROVER}` + (APPROVER !== KID ? ` (key ${KID})` : "") + "."
    : "Read-only: start the console with --approver-key FILE to approve and reject.";

  const events = new EventSource("/events");
  events.addEventListener("open", () => connectionState("connecting", "connected, reading…"));
  events.addEventListener("error", () => connectionState("lost", "connection lost: reconnecting…"));
  events.addEventListener("ready", () => connectionState("live", "live"));
  // A row can come twice (in the snapshot and in the batch sent right after): once shown.
  let feedIds = new Set();
  events.addEventListener("feed-snapshot", (e) => {
    feed = JSON.parse(e.data);
    feedIds = new Set(feed.map((item) => item.decision_id));
    renderFeed();
  });
  events.addEventListener("feed", (e) => {
    for (const item of JSON.parse(e.data)) {
      if (feedIds.has(item.decision_id)) continue;
      feedIds.add(item.decision_id);
      feed.push(item);
    }
    if (feed.length > FEED_KEEP) {
      for (const gone of feed.splice(0, feed.length - FEED_KEEP)) feedIds.delete(gone.decision_id);
    }
    renderFeed();
  });
  events.addEventListener("holds", (e) => renderHolds(JSON.parse(e.data)));
  events.addEventListener("gateways", (e) => renderGateways(JSON.parse(e.data)));
  events.addEventListener("rates", (e) => renderRates(JSON.parse(e.data)));
})();
