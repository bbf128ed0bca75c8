// Diffcast fleet dashboard: asks for an API token once (sessionStorage), then draws the
// fleet from the JSON API. Text goes in with textContent only: device-supplied strings
// (ids, tags, failure reasons) never become markup.
"use strict";

(() => {
  const TOKEN_KEY = "diffcast.token";
  const REFRESH_MS = 15000;
  const ROOT = document.body.dataset.apiRoot || "";
  const SVG = "http://www.w3.org/2000/svg";
  // Versions: the latest is blue, older ones take the next colours (never green or red,
  // which mean success and failure). Failure reasons: warm colours only.
  const VERSION_COLORS = ["#2563eb", "#7c3aed", "#0891b2", "#f59e0b", "#db2777", "#64748b"];
  const REASON_COLORS = ["#dc2626", "#f59e0b", "#9333ea", "#db2777", "#ea580c", "#64748b"];
  const OUTCOME_COLORS = { updated: "#16a34a", current: "#94a3b8", failed: "#dc2626", rolled_back: "#f59e0b" };
  const CLOCK = { hour: "2-digit", minute: "2-digit", hourCycle: "h23" };
  const ACTIONS = { pause: ["active"], resume: ["paused"], halt: ["draft", "active", "paused"] };

  const state = { token: sessionStorage.getItem(TOKEN_KEY), me: null, releases: [], timer: null };
  const $ = (id) => document.getElementById(id);

  // ---- small DOM helpers -------------------------------------------------------------
  function el(tag, attrs = {}, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs)) {
      if (value === undefined || value === null || value === false) continue;
      if (key === "class") node.className = value;
      else if (key === "text") node.textContent = value;
      else if (key.startsWith("data-")) node.setAttribute(key, value);
      else if (key === "style") Object.assign(node.style, value);
      else node.setAttribute(key, value);
    }
    for (const child of children) if (child !== null && child !== undefined) node.append(child);
    return node;
  }
  function svg(tag, attrs = {}, text) {
    const node = document.createElementNS(SVG, tag);
    for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, value);
    if (text !== undefined) node.textContent = text;
    return node;
  }
  function bytes(n) {
    const units = ["B", "KB", "MB", "GB", "TB"];
    let value = n, unit = 0;
    while (Math.abs(value) >= 1000 && unit < units.length - 1) { value /= 1000; unit += 1; }
    return `${value.toFixed(unit && Math.abs(value) < 10 ? 1 : 0)} ${units[unit]}`;
  }
  function pct(part, whole) { return whole ? `${((100 * part) / whole).toFixed(part === whole || !part ? 0 : 1)}%` : "–"; }
  // Timestamps without an offset (SQLite drops it) are UTC.
  function parseTime(iso) { return new Date(/[zZ]|[+-]\d\d:?\d\d$/.test(iso) ? iso : `${iso}Z`); }
  function when(iso) {
    if (!iso) return "never";
    const seconds = (Date.now() - parseTime(iso).getTime()) / 1000;
    if (seconds < 60) return "just now";
    if (seconds < 3600) return `${Math.round(seconds / 60)} min ago`;
    if (seconds < 86400) return `${Math.round(seconds / 3600)} h ago`;
    return parseTime(iso).toLocaleDateString();
  }
  function colorFor(field, name, index) {
    return field === "outcomes" && OUTCOME_COLORS[name] ? OUTCOME_COLORS[name] : REASON_COLORS[index % REASON_COLORS.length];
  }

  // ---- API --------------------------------------------------------------------------
  class ApiError extends Error {}
  async function api(path, options = {}) {
    const headers = { Accept: "application/json", Authorization: `Bearer ${state.token}` };
    if (options.body !== undefined) headers["Content-Type"] = "application/json";
    const response = await fetch(ROOT + path, {
      method: options.method || "GET",
      headers,
      body: options.body === undefined ? undefined : JSON.stringify(options.body),
      cache: "no-store",
    });
    const body = await response.json().catch(() => null);
    if (response.status === 401) {
      signOut("That token was not accepted (unknown or revoked).");
      throw new ApiError("unauthenticated");
    }
    if (!response.ok) throw new ApiError((body && body.error && body.error.message) || response.statusText);
    return body;
  }

  // ---- session ----------------------------------------------------------------------
  function signOut(message) {
    sessionStorage.removeItem(TOKEN_KEY);
    state.token = null;
    state.me = null;
    clearInterval(state.timer);
    // Nothing seen with the old token stays on the page.
    for (const id of ["versions", "chart-outcomes", "chart-reasons", "whoami"]) $(id).replaceChildren();
    for (const id of ["releases", "devices"]) $(id).tBodies[0].replaceChildren();
    $("device-search").value = "";
    $("board").hidden = true;
    $("session").hidden = true;
    $("login").hidden = false;
    $("login-error").textContent = message || "";
    $("token-input").value = "";
    $("token-input").focus();
  }

  async function signIn(token) {
    state.token = token;
    try {
      state.me = await api("/v1/whoami");
    } catch (error) {
      if (!(error instanceof ApiError) || error.message !== "unauthenticated") signOut(`Could not reach the server: ${error.message}`);
      return;
    }
    sessionStorage.setItem(TOKEN_KEY, token);
    const scopes = state.me.effective_scopes;
    const role = scopes.includes("admin") ? "admin" : scopes.includes("publish") ? "publish" : "read-only";
    $("whoami").replaceChildren("Signed in as ", el("strong", { text: state.me.name }), " ", el("span", { class: `pill role-${role}`, text: role }));
    $("login").hidden = true;
    $("session").hidden = false;
    $("board").hidden = false;
    document.body.dataset.canPublish = String(canPublish());
    await refresh();
    clearInterval(state.timer);
    state.timer = setInterval(() => { if (!document.hidden) refresh(); }, REFRESH_MS);
  }

  function canPublish() { return Boolean(state.me && state.me.effective_scopes.includes("publish")); }

  function notify(message, kind = "ok") {
    const notice = $("notice");
    notice.textContent = message;
    notice.className = `notice ${kind}`;
    notice.hidden = false;
    clearTimeout(notify.timer);
    notify.timer = setTimeout(() => { notice.hidden = true; }, 6000);
  }

  // ---- refresh ----------------------------------------------------------------------
  async function refresh() {
    try {
      const [summary, releases] = await Promise.all([api("/v1/fleet/summary"), api("/v1/releases")]);
      state.releases = releases;
      drawSummary(summary, releases);
      drawVersions(summary);
      drawReleases(releases);
      drawScopeOptions(releases);
      await Promise.all([refreshTimeline(), searchDevices()]);
      $("updated-at").textContent = `updated ${new Date().toLocaleTimeString([], { ...CLOCK, second: "2-digit" })}`;
    } catch (error) {
      if (error.message !== "unauthenticated") notify(`Refresh failed: ${error.message}`, "error");
    }
  }

  function drawSummary(summary, releases) {
    $("stat-devices").textContent = summary.devices.toLocaleString();
    $("stat-devices-sub").textContent = summary.unreported ? `${summary.unreported} not yet reported` : `${summary.models.length} model(s)`;
    const active = releases.filter((r) => r.state === "active").length;
    const paused = releases.filter((r) => r.state === "paused").length;
    const halted = releases.filter((r) => r.state === "halted").length;
    $("stat-active").textContent = String(active);
    $("stat-active-sub").textContent = `${paused} paused · ${halted} halted · ${releases.length} in all`;
    const saved = summary.bytes_full_equivalent - summary.bytes_downloaded;
    $("stat-saved").textContent = summary.bytes_full_equivalent ? bytes(saved) : "–";
    $("stat-saved-sub").textContent = summary.bytes_full_equivalent
      ? `${pct(saved, summary.bytes_full_equivalent)} less than full snapshots (${bytes(summary.bytes_downloaded)} sent)`
      : "no applied updates yet";
  }

  function drawVersions(summary) {
    const box = $("versions");
    box.replaceChildren();
    if (!summary.models.length) {
      box.append(el("p", { class: "muted", text: "No device has reported a model yet." }));
      return;
    }
    for (const fleet of summary.models) {
      const bar = el("div", { class: "stack" });
      const legend = el("ul", { class: "legend" });
      fleet.versions.forEach((entry, i) => {
        const label = entry.version === null ? "unknown" : `v${entry.version}`;
        const color = entry.version === null ? "#cbd5e1" : VERSION_COLORS[Math.max(0, (fleet.latest ?? entry.version) - entry.version) % VERSION_COLORS.length];
        const share = pct(entry.devices, fleet.devices);
        bar.append(el("span", { class: "segment", title: `${label}: ${entry.devices} devices (${share})`, style: { width: `${(100 * entry.devices) / fleet.devices}%`, background: color } }));
        const latest = entry.version !== null && entry.version === fleet.latest ? el("span", { class: "pill", text: "latest" }) : null;
        legend.append(el("li", { "data-version": label },
          el("span", { class: "swatch", style: { background: color } }),
          el("strong", { text: label }), latest,
          el("span", { class: "muted", text: ` ${entry.devices} device${entry.devices === 1 ? "" : "s"} · ${share}` })));
      });
      const onLatest = fleet.versions.filter((v) => v.version === fleet.latest).reduce((n, v) => n + v.devices, 0);
      box.append(el("div", { class: "model-fleet", "data-model": fleet.model },
        el("div", { class: "model-head" },
          el("strong", { text: fleet.model }),
          el("span", { class: "muted", text: ` ${fleet.devices} devices · latest v${fleet.latest ?? "–"} · ${pct(onLatest, fleet.devices)} on latest` })),
        bar, legend));
    }
  }

  function progressBar(progress) {
    const total = progress ? progress.started : 0;
    const bar = el("div", { class: "progress", title: progress ? `${progress.applied} applied, ${progress.failed} failed, ${progress.pending} pending` : "" });
    if (total) {
      for (const [key, cls] of [["applied", "ok"], ["failed", "bad"], ["pending", "wait"]]) {
        if (progress[key]) bar.append(el("span", { class: cls, style: { width: `${(100 * progress[key]) / total}%` } }));
      }
    }
    const text = total ? `${progress.applied} applied · ${progress.failed} failed · ${progress.pending} pending` : "no device has started";
    return el("div", {}, bar, el("div", { class: "small muted", text }));
  }

  function drawReleases(releases) {
    const body = $("releases").tBodies[0];
    body.replaceChildren();
    $("releases-note").textContent = canPublish() ? "" : "read-only token: actions hidden";
    if (!releases.length) {
      body.append(el("tr", {}, el("td", { colspan: "8", class: "muted", text: "No releases yet." })));
      return;
    }
    for (const release of releases) {
      const p = release.progress;
      const failures = el("div", { class: "reasons" });
      const reasons = p ? Object.entries(p.failures_by_reason).sort((a, b) => b[1] - a[1]) : [];
      for (const [reason, count] of reasons) failures.append(el("span", { class: "pill bad", text: `${reason} ×${count}` }));
      if (!reasons.length) failures.append(el("span", { class: "muted", text: "none" }));
      if (release.halt_reason) failures.append(el("div", { class: "small", text: release.halt_reason }));
      const saved = p && p.bytes_full_equivalent ? `${bytes(p.bytes_full_equivalent - p.bytes_downloaded)} (${pct(p.bytes_full_equivalent - p.bytes_downloaded, p.bytes_full_equivalent)})` : "–";
      const actions = el("div", { class: "actions" });
      if (canPublish()) {
        for (const [action, from] of Object.entries(ACTIONS)) {
          if (!from.includes(release.state)) continue;
          const button = el("button", { type: "button", class: `act ${action}`, "data-action": action, "data-release": String(release.id), text: action[0].toUpperCase() + action.slice(1) });
          button.addEventListener("click", () => act(release, action, button));
          actions.append(button);
        }
      }
      const selector = Object.entries(release.selector.tags).map(([k, v]) => `${k}=${v.join("|")}`);
      if (release.selector.devices.length) selector.push(`${release.selector.devices.length} listed devices`);
      body.append(el("tr", { "data-release-id": String(release.id), "data-state": release.state },
        el("td", {}, el("strong", { text: release.name }), el("div", { class: "small muted", text: `#${release.id} · by ${release.created_by}` })),
        el("td", {}, el("span", { text: `${release.model} v${release.version}` }), release.rollback ? el("span", { class: "pill warn", text: "rollback" }) : null),
        el("td", {}, el("span", { class: `state state-${release.state}`, text: release.state })),
        el("td", {}, el("span", { text: `${release.percent}%` }), el("div", { class: "small muted", text: selector.length ? selector.join(", ") : "all devices" })),
        el("td", { class: "wide" }, progressBar(p)),
        el("td", {}, failures),
        el("td", { text: saved }),
        el("td", {}, actions)));
    }
  }

  async function act(release, action, button) {
    let body = {};
    if (action === "halt") {
      const reason = window.prompt(`Halt "${release.name}"? Devices stop receiving it. Reason:`, "halted from the dashboard");
      if (reason === null) return;
      body = { reason };
    }
    button.disabled = true;
    try {
      const updated = await api(`/v1/releases/${release.id}/${action}`, { method: "POST", body });
      notify(`Release "${updated.name}" is now ${updated.state}.`);
    } catch (error) {
      if (error.message !== "unauthenticated") notify(`Could not ${action} "${release.name}": ${error.message}`, "error");
    }
    await refresh();
  }

  // ---- time series ------------------------------------------------------------------
  function drawScopeOptions(releases) {
    const select = $("timeline-scope");
    const current = select.value;
    const options = [el("option", { value: "", text: "all reports" })];
    for (const r of releases) options.push(el("option", { value: `${r.model}:${r.version}`, text: `${r.name} (${r.model} v${r.version})` }));
    select.replaceChildren(...options);
    select.value = [...select.options].some((o) => o.value === current) ? current : "";
  }

  async function refreshTimeline() {
    const scope = $("timeline-scope").value;
    let query = "?hours=24&buckets=24";
    if (scope) {
      const [model, version] = scope.split(":");
      query += `&model=${encodeURIComponent(model)}&version=${encodeURIComponent(version)}`;
    }
    const timeline = await api(`/v1/fleet/timeline${query}`);
    const total = timeline.buckets.reduce((n, b) => n + Object.values(b.outcomes).reduce((a, c) => a + c, 0), 0);
    const failed = timeline.buckets.reduce((n, b) => n + Object.values(b.reasons).reduce((a, c) => a + c, 0), 0);
    if (!scope) {
      $("stat-reports").textContent = total.toLocaleString();
      $("stat-reports-sub").textContent = total ? `${failed} failed (${pct(failed, total)})` : "no reports yet";
    }
    stackedChart($("chart-outcomes"), timeline, "outcomes", "No reports in this window.");
    stackedChart($("chart-reasons"), timeline, "reasons", "No failures in this window.");
  }

  function stackedChart(box, timeline, field, emptyText) {
    const buckets = timeline.buckets;
    const names = [...new Set(buckets.flatMap((b) => Object.keys(b[field])))].sort();
    box.replaceChildren();
    if (!names.length) {
      box.append(el("p", { class: "muted empty", text: emptyText }));
      return;
    }
    const width = 560, height = 180, left = 34, bottom = 22, top = 8;
    const max = Math.max(1, ...buckets.map((b) => Object.values(b[field]).reduce((a, c) => a + c, 0)));
    const step = (width - left) / buckets.length;
    const scale = (height - bottom - top) / max;
    const chart = svg("svg", { viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": field });
    for (const fraction of [0, 0.5, 1]) {
      const y = height - bottom - fraction * max * scale;
      chart.append(svg("line", { x1: left, x2: width, y1: y, y2: y, class: "grid" }));
      chart.append(svg("text", { x: left - 6, y: y + 4, class: "axis", "text-anchor": "end" }, String(Math.round(fraction * max))));
    }
    buckets.forEach((bucket, i) => {
      let y = height - bottom;
      const start = parseTime(bucket.start);
      names.forEach((name, n) => {
        const count = bucket[field][name] || 0;
        if (!count) return;
        const h = count * scale;
        y -= h;
        const rect = svg("rect", { x: left + i * step + 1, y, width: Math.max(step - 2, 1), height: h, fill: colorFor(field, name, n) });
        rect.append(svg("title", {}, `${start.toLocaleTimeString([], CLOCK)}: ${name} ${count}`));
        chart.append(rect);
      });
      if (i % 6 === 0) chart.append(svg("text", { x: left + i * step, y: height - 6, class: "axis" }, start.toLocaleTimeString([], CLOCK)));
    });
    const legend = el("ul", { class: "legend" });
    names.forEach((name, n) => {
      const count = buckets.reduce((a, b) => a + (b[field][name] || 0), 0);
      legend.append(el("li", {}, el("span", { class: "swatch", style: { background: colorFor(field, name, n) } }), el("span", { text: `${name} ${count}` })));
    });
    box.append(chart, legend);
  }

  // ---- devices ----------------------------------------------------------------------
  async function searchDevices() {
    const q = $("device-search").value.trim();
    const body = $("devices").tBodies[0];
    let devices;
    try {
      devices = await api(`/v1/fleet/devices?limit=50&q=${encodeURIComponent(q)}`);
    } catch (error) {
      if (error.message !== "unauthenticated") $("devices-note").textContent = error.message;
      return;
    }
    body.replaceChildren();
    for (const device of devices) {
      const tags = el("div", { class: "tags" });
      for (const [k, v] of Object.entries(device.tags)) tags.append(el("span", { class: "pill", text: `${k}=${v}` }));
      const outcome = device.last_outcome;
      body.append(el("tr", { "data-device": device.id },
        el("td", { class: "mono", text: device.id }),
        el("td", {}, tags),
        el("td", { text: device.model || "–" }),
        el("td", { text: device.version === null ? "–" : `v${device.version}` }),
        el("td", {}, outcome ? el("span", { class: `state outcome-${outcome}`, text: outcome }) : el("span", { class: "muted", text: "–" })),
        el("td", { class: "muted", text: when(device.last_seen) })));
    }
    $("devices-note").textContent = devices.length ? (devices.length === 50 ? "showing the first 50 matches" : `${devices.length} device(s)`) : "No device matches.";
  }

  // ---- wiring -----------------------------------------------------------------------
  document.addEventListener("DOMContentLoaded", () => {
    $("token-form").addEventListener("submit", (event) => {
      event.preventDefault();
      const token = $("token-input").value.trim();
      if (token) signIn(token);
    });
    $("sign-out").addEventListener("click", () => signOut(""));
    $("refresh").addEventListener("click", () => refresh());
    $("timeline-scope").addEventListener("change", () => refreshTimeline().catch((e) => notify(e.message, "error")));
    let pending = null;
    $("device-search").addEventListener("input", () => {
      clearTimeout(pending);
      pending = setTimeout(searchDevices, 250);
    });
    if (state.token) signIn(state.token);
    else $("token-input").focus();
  });
})();
