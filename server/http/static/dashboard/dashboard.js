// The live dashboard: figures from /ws/monitor (every second), events from /stream/events,
// A/B figures and models from the JSON API, a prediction form and a streaming training run.
// No build step and no framework; uPlot draws the charts. Everything the page knows is on
// `window.dashboard`, so a browser test (or a person in the console) can read it.
(() => {
  "use strict";

  const WINDOW_SECONDS = 300;  // the charts show the last five minutes
  const RATE_SECONDS = 5;      // rows/s per model and version: averaged over this long
  const CACHE_RECENT_SECONDS = 10;
  const EXPERIMENT_POLL_MS = 3000;
  const QUALITY_POLL_MS = 10000;
  const DRIFT_POLL_MS = 5000;
  const MAX_EVENTS = 60;
  const TOKEN_KEY = "dashboard.adminToken";  // sessionStorage only: gone with the tab
  const SERVER_EVENTS = ["version_added", "version_changed", "version_removed", "model_failed",
                         "experiments_reloaded", "training_complete", "drift"];

  const $ = (id) => document.getElementById(id);

  const state = {
    connections: {
      monitor: {state: "connecting", opened: 0, messages: 0, attempt: 0, lastMessage: 0},
      events: {state: "connecting", opened: 0, messages: 0, attempt: 0, lastMessage: 0},
    },
    series: {t: [], rps: [], p50: [], p99: [], hitRatio: []},
    figures: null,          // the last /ws/monitor (or SSE metrics) payload
    history: [],            // recent payloads, for per-model rates and the recent hit ratio
    rates: {},              // "model:version" -> rows/s
    models: [],
    experiments: null,
    events: [],
    prediction: null,       // the last answer of the prediction form
    predictionError: null,
    training: {state: "idle", epochs: [], version: null, error: null, model: null},
    drift: {answers: {}, shown: null, off: false},  // "model/version" -> its /drift answer
    charts: {},             // the uPlot instances: their data is what is drawn
  };
  window.dashboard = state;

  // --- DOM helpers ------------------------------------------------------------------------
  // Text goes in through textContent only: nothing from the server is ever parsed as HTML.
  function el(tag, props, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(props || {})) {
      if (value === undefined || value === null) continue;
      if (key === "text") node.textContent = value;
      else if (key === "className") node.className = value;
      else if (key === "dataset") Object.assign(node.dataset, value);
      else node.setAttribute(key, value);
    }
    for (const child of children) {
      if (child !== null && child !== undefined) {
        node.append(child instanceof Node ? child : String(child));
      }
    }
    return node;
  }

  function replaceChildren(node, children) {
    node.replaceChildren(...children);
  }

  const fmt = {
    num(v, digits = 1) {
      return v === null || v === undefined || Number.isNaN(v) ? "–"
        : Number(v).toLocaleString(undefined, {maximumFractionDigits: digits});
    },
    pct(v) {
      return v === null || v === undefined ? "–" : (100 * v).toFixed(1) + " %";
    },
    p(v) {
      if (v === null || v === undefined) return "–";
      return v < 0.001 ? v.toExponential(1) : v.toFixed(3);
    },
    time(ts) {
      return new Date(ts * 1000).toLocaleTimeString(undefined, {hour12: false});
    },
  };

  // --- Charts -----------------------------------------------------------------------------
  const charts = [];

  function makeChart(id, height, series, yFormat, yRange) {
    const node = $(id);
    const opts = {
      width: Math.max(node.clientWidth, 200),
      height,
      cursor: {drag: {x: false, y: false}},
      scales: {x: {time: true},
               y: {range: yRange || ((u, min, max) => [0, max > 0 ? max * 1.15 : 1])}},
      axes: [{}, {size: 54, values: (u, ticks) => ticks.map(yFormat)}],
      series: [{}, ...series.map((s) => ({spanGaps: false, points: {show: false}, width: 2,
                                          ...s}))],
    };
    const plot = new uPlot(opts, [[], ...series.map(() => [])], node);
    charts.push({plot, node, height});
    return plot;
  }

  const rpsChart = makeChart("rps-chart", 200, [
    {label: "req/s", stroke: "#2563eb", fill: "rgba(37, 99, 235, 0.12)",
     value: (u, v) => fmt.num(v, 1)},
  ], (v) => fmt.num(v, 1));
  const latencyChart = makeChart("latency-chart", 200, [
    {label: "p50 ms", stroke: "#16a34a", value: (u, v) => fmt.num(v, 2)},
    {label: "p99 ms", stroke: "#dc2626", value: (u, v) => fmt.num(v, 2)},
  ], (v) => fmt.num(v, 1));
  const cacheChart = makeChart("cache-chart", 110, [
    {label: "hit ratio", stroke: "#7c3aed", fill: "rgba(124, 58, 237, 0.10)",
     value: (u, v) => fmt.pct(v)},
  ], (v) => Math.round(v * 100) + "%", () => [0, 1]);

  state.charts = {rps: rpsChart, latency: latencyChart, cache: cacheChart};

  let resizeQueued = false;
  window.addEventListener("resize", () => {
    if (resizeQueued) return;
    resizeQueued = true;
    requestAnimationFrame(() => {
      resizeQueued = false;
      for (const c of charts) c.plot.setSize({width: Math.max(c.node.clientWidth, 200),
                                              height: c.height});
    });
  });

  function drawCharts() {
    const s = state.series;
    rpsChart.setData([s.t, s.rps]);
    latencyChart.setData([s.t, s.p50, s.p99]);
    cacheChart.setData([s.t, s.hitRatio]);
  }

  // --- Figures ----------------------------------------------------------------------------
  function onFigures(figures, source) {
    const conn = state.connections;
    // /ws/monitor is the source; the SSE metrics only stand in while the socket is down.
    if (source === "events" && conn.monitor.state === "open") return;
    const last = state.series.t[state.series.t.length - 1];
    if (typeof figures.ts !== "number" || (last !== undefined && figures.ts <= last)) return;
    const previous = state.figures;
    state.figures = figures;

    const s = state.series;
    if (last !== undefined && figures.ts - last > 3) {
      // The server was away: leave a gap in every line rather than a slope across it.
      for (const key of Object.keys(s)) s[key].push(key === "t" ? last + 1 : null);
    }
    s.t.push(figures.ts);
    s.rps.push(figures.requests_per_second ?? 0);
    s.p50.push(figures.latency_p50_ms ?? null);
    s.p99.push(figures.latency_p99_ms ?? null);
    s.hitRatio.push(intervalHitRatio(previous, figures));
    while (s.t.length && s.t[0] < figures.ts - WINDOW_SECONDS) {
      for (const key of Object.keys(s)) s[key].shift();
    }
    state.history.push(figures);
    while (state.history.length > 2 &&
           state.history[0].ts < figures.ts - Math.max(RATE_SECONDS, CACHE_RECENT_SECONDS) - 1) {
      state.history.shift();
    }
    state.rates = perModelRates();
    drawCharts();
    renderFigures(figures);
  }

  function intervalHitRatio(previous, current) {
    if (!previous || !previous.cache || !current.cache) return null;
    const hits = current.cache.hits - previous.cache.hits;
    const misses = current.cache.misses - previous.cache.misses;
    return hits >= 0 && misses >= 0 && hits + misses > 0 ? hits / (hits + misses) : null;
  }

  function olderThan(seconds) {
    const now = state.figures.ts;
    let found = null;
    for (const past of state.history) {
      if (past.ts <= now - seconds + 0.5) found = past;
    }
    return found || state.history[0];
  }

  function perModelRates() {
    const now = state.figures;
    const then = olderThan(RATE_SECONDS);
    const rates = {};
    const dt = now.ts - then.ts;
    for (const [key, total] of Object.entries(now.per_model || {})) {
      const before = (then.per_model || {})[key] ?? 0;
      // A worker that restarted counts from zero again: no negative rates.
      rates[key] = dt > 0 && then !== now ? Math.max(0, (total - before) / dt) : 0;
    }
    return rates;
  }

  function renderFigures(f) {
    $("rps-now").textContent = fmt.num(f.requests_per_second, 1) + " /s";
    $("latency-now").textContent =
      `p50 ${fmt.num(f.latency_p50_ms, 2)} · p99 ${fmt.num(f.latency_p99_ms, 2)}`;
    $("summary").textContent = [
      `${f.workers} worker${f.workers === 1 ? "" : "s"}`,
      `${f.models_loaded} versions loaded`,
      `${fmt.num(f.requests_total, 0)} requests`,
      `${fmt.num(f.predictions, 0)} rows predicted`,
    ].join(" · ");

    $("cache-ratio").textContent = fmt.pct(f.cache_hit_ratio);
    const then = olderThan(CACHE_RECENT_SECONDS);
    $("cache-recent").textContent = then === f ? "–" : fmt.pct(intervalHitRatio(then, f));
    $("cache-hits").textContent = fmt.num(f.cache ? f.cache.hits : null, 0);
    $("cache-misses").textContent = fmt.num(f.cache ? f.cache.misses : null, 0);

    const rss = Object.entries(f.rss_mb || {}).sort((a, b) => Number(a[0]) - Number(b[0]));
    const maxRss = Math.max(1, ...rss.map(([, mb]) => mb || 0));
    $("rss-total").textContent = fmt.num(f.rss_mb_total, 0) + " MB";
    replaceChildren($("workers-body"), rss.map(([pid, mb]) => el("tr", {},
      el("td", {text: pid}), el("td", {className: "num", text: fmt.num(mb, 1)}),
      el("td", {className: "bar-cell"}, bar(mb / maxRss)))));
    const st = f.streams || {};
    const open = (st.started || 0) - (st.completed || 0) - (st.cancelled || 0);
    $("streams-line").textContent =
      `SSE streams: ${open} open (this page's included) · ${st.started || 0} started · ` +
      `${fmt.num(st.rows || 0, 0)} rows streamed`;

    renderTraffic(f);
  }

  function bar(fraction) {
    const node = el("div", {className: "bar"});
    node.style.width = Math.max(0, Math.min(1, fraction || 0)) * 100 + "%";
    return node;
  }

  function renderTraffic(f) {
    const rows = Object.entries(f.per_model || {}).map(([key, total]) => {
      const cut = key.lastIndexOf(":");
      return {key, model: key.slice(0, cut), version: key.slice(cut + 1), total,
              rate: state.rates[key] || 0};
    }).sort((a, b) => b.rate - a.rate || b.total - a.total);
    if (!rows.length) return;
    const top = Math.max(...rows.map((r) => r.rate), 1e-9);
    replaceChildren($("traffic-body"), rows.map((r) => el("tr", {dataset: {key: r.key}},
      el("td", {text: r.model}), el("td", {text: "v" + r.version}),
      el("td", {className: "num", text: fmt.num(r.rate, 1)}),
      el("td", {className: "num", text: fmt.num(r.total, 0)}),
      el("td", {className: "bar-cell"}, bar(r.rate / top)))));
  }

  // --- Connections ------------------------------------------------------------------------
  // Exponential backoff with jitter, 0.5 s doubling to 4 s: a restarted server is found
  // again within a few seconds, and many open dashboards do not reconnect in lockstep.
  function backoffDelay(attempt) {
    const ceiling = Math.min(4000, 500 * 2 ** attempt);
    return Math.round(ceiling / 2 + Math.random() * ceiling / 2);
  }

  function setConnection(name, value, detail) {
    const conn = state.connections[name];
    const was = conn.state;
    conn.state = value;
    document.body.dataset[name] = value;
    const badge = $(name + "-badge");
    badge.dataset.state = value;
    badge.querySelector(".badge-text").textContent = detail || value;
    if (value === "open") {
      addEvent(conn.opened > 1 ? "reconnected" : "connected",
               name === "monitor" ? "/ws/monitor: figures every second"
                                  : "/stream/events: server events", "page");
    } else if (was === "open") {
      addEvent("disconnected", `${name === "monitor" ? "/ws/monitor" : "/stream/events"} ` +
               "lost; reconnecting", "page");
    }
  }

  function scheduleReconnect(name, connect) {
    const conn = state.connections[name];
    const delay = backoffDelay(conn.attempt);
    conn.attempt += 1;
    setConnection(name, "closed",
                  `reconnecting in ${(delay / 1000).toFixed(1)} s (attempt ${conn.attempt})`);
    setTimeout(connect, delay);
  }

  async function connectMonitor() {
    const conn = state.connections.monitor;
    const scheme = location.protocol === "https:" ? "wss://" : "ws://";
    setConnection("monitor", "connecting", "connecting…");
    const ws = new WebSocket(scheme + location.host + await streamUrl("/ws/monitor"));
    let watchdog = null;
    ws.onopen = () => {
      conn.attempt = 0;
      conn.opened += 1;
      conn.lastMessage = Date.now();
      setConnection("monitor", "open", "live");
      afterConnect();
      // A figure comes every second; silence means a dead connection the OS has not noticed.
      watchdog = setInterval(() => {
        if (Date.now() - conn.lastMessage > 5000) ws.close();
      }, 1000);
    };
    ws.onmessage = (message) => {
      conn.lastMessage = Date.now();
      conn.messages += 1;
      let figures;
      try {
        figures = JSON.parse(message.data);
      } catch (err) {
        return;
      }
      onFigures(figures, "monitor");
    };
    ws.onclose = () => {
      clearInterval(watchdog);
      scheduleReconnect("monitor", connectMonitor);
    };
  }

  async function connectEvents() {
    const conn = state.connections.events;
    setConnection("events", "connecting", "connecting…");
    const source = new EventSource(await streamUrl("/stream/events"));
    let watchdog = null;
    const seen = () => {
      conn.lastMessage = Date.now();
      conn.messages += 1;
    };
    const parse = (message) => {
      seen();
      try {
        return JSON.parse(message.data);
      } catch (err) {
        return null;  // "[DONE]"
      }
    };
    source.onopen = () => {
      conn.attempt = 0;
      conn.opened += 1;
      conn.lastMessage = Date.now();
      setConnection("events", "open", "live");
      watchdog = setInterval(() => {
        if (Date.now() - conn.lastMessage > 8000) fail();
      }, 1000);
    };
    source.onmessage = (message) => {
      const data = parse(message);
      if (data && data.type === "hello") refreshModels();
    };
    source.addEventListener("metrics", (message) => {
      const data = parse(message);
      if (data) onFigures(data, "events");
    });
    for (const kind of SERVER_EVENTS) {
      source.addEventListener(kind, (message) => {
        const data = parse(message);
        if (data) onServerEvent(data);
      });
    }
    // The browser's own retry has a fixed delay and gives up on an HTTP error: take over.
    const fail = () => {
      clearInterval(watchdog);
      source.close();
      scheduleReconnect("events", connectEvents);
    };
    source.onerror = fail;
  }

  function afterConnect() {
    refreshModels();
    refreshExperiments();
  }

  // --- Events -----------------------------------------------------------------------------
  const EVENT_TEXT = {
    version_added: ["new version", "good", (e) => `${e.model} v${e.version} is serving`],
    version_changed: ["version changed", "good", (e) => `${e.model} v${e.version} reloaded`],
    version_removed: ["version removed", null, (e) => `${e.model} v${e.version}`],
    model_failed: ["load failure", "bad", (e) => `${e.model} v${e.version}` +
                   (e.error ? `: ${e.error}` : "")],
    experiments_reloaded: ["experiments", null, (e) => "reloaded: " +
                           ((e.experiments || []).join(", ") || "none")],
    training_complete: ["training done", "good", (e) => `${e.model} v${e.version}` +
                        (e.accuracy != null ? `, accuracy ${fmt.num(e.accuracy, 3)}` : "") +
                        (e.epochs ? ` after ${e.epochs} epochs` : "")],
    drift: ["drift", null, (e) => `${e.model} v${e.version}: ` +
            [...Object.entries(e.features || {}),
             ...(e.prediction ? [["prediction", e.prediction]] : [])]
              .map(([name, c]) => `${name} ${c.from} → ${c.to} (PSI ${fmt.num(c.psi, 3)})`)
              .join(", ")],
  };

  function onServerEvent(e) {
    const [kind, level, text] = EVENT_TEXT[e.type] || [e.type, null, () => JSON.stringify(e)];
    const shown = e.type === "drift" ? (e.status === "drifted" ? "bad" : "good") : level;
    addEvent(kind, text(e), shown, e.ts, e.type);
    if (e.type === "experiments_reloaded") refreshExperiments();
    else if (e.type === "drift") refreshDrift();
    else refreshModelsSoon();
  }

  function addEvent(kind, text, level, ts, type) {
    const item = {kind, text, level: level || "", ts: ts || Date.now() / 1000,
                  type: type || kind};
    state.events.unshift(item);
    state.events.length = Math.min(state.events.length, MAX_EVENTS);
    const list = $("events-list");
    list.prepend(el("li", {dataset: {level: item.level, type: item.type}},
      el("time", {text: fmt.time(item.ts)}), el("span", {className: "kind", text: kind}),
      el("span", {className: "text", text})));
    while (list.children.length > MAX_EVENTS) list.lastElementChild.remove();
  }

  // --- JSON API ---------------------------------------------------------------------------
  class ApiFailure extends Error {
    constructor(status, body) {
      super((body && body.error) || `HTTP ${status}`);
      this.status = status;
      this.body = body || {};
    }
  }

  // --- Secrets kept for this tab only (sessionStorage): the API key, the admin token ------
  const API_KEY = "model-server-api-key";

  function stored(name) {
    try {
      return sessionStorage.getItem(name) || "";
    } catch (err) {
      return "";  // storage refused (private mode)
    }
  }

  function store(name, value) {
    try {
      if (value) sessionStorage.setItem(name, value);
      else sessionStorage.removeItem(name);
      return true;
    } catch (err) {
      return false;  // storage refused (private mode): the value lives in its field only
    }
  }

  const storedKey = () => stored(API_KEY);

  function withKey(options) {
    const key = storedKey();
    if (!key) return options || {};
    const headers = {...((options || {}).headers || {}), "X-API-Key": key};
    return {...(options || {}), headers};
  }

  // EventSource and WebSocket cannot carry a key: a stream token from the key, in the URL.
  async function streamUrl(path) {
    if (!storedKey()) return path;
    try {
      const body = await api("/auth/stream-token", {method: "POST"});
      return `${path}?token=${encodeURIComponent(body.token)}`;
    } catch (err) {
      return path;  // refused: the stream's own 401 shows, and the notice asks for a key
    }
  }

  async function api(path, options) {
    let resp;
    try {
      resp = await fetch(path, {cache: "no-store", ...withKey(options)});
    } catch (err) {
      throw new ApiFailure(0, {error: "the server cannot be reached", code: "unreachable"});
    }
    return readAnswer(resp);
  }

  async function readAnswer(resp) {
    const text = await resp.text();
    let body = null;
    try {
      body = text ? JSON.parse(text) : null;
    } catch (err) {
      body = {error: text.slice(0, 300)};
    }
    if (!resp.ok) throw new ApiFailure(resp.status, body);
    return body;
  }

  function showError(node, failure, hints) {
    const body = failure.body || {};
    const code = body.code || (failure.status ? `HTTP ${failure.status}` : "error");
    const status = failure.status ? `${failure.status} ` : "";
    const children = [el("strong", {text: `${status}${code}`}), ": ",
                      body.error || failure.message];
    const hint = (hints || {})[failure.status];
    if (hint) children.push(el("span", {className: "hint", text: hint}));
    for (const d of body.details || []) {
      children.push(el("span", {className: "hint",
                                text: `${(d.loc || []).join(".")}: ${d.msg}`}));
    }
    if (body.request_id) {
      children.push(el("span", {className: "hint", text: `request id ${body.request_id}`}));
    }
    replaceChildren(node, children);
    node.dataset.status = String(failure.status);
    node.hidden = false;
  }

  // --- Models -----------------------------------------------------------------------------
  const knownFailures = new Set();
  let modelsTimer = null;

  function refreshModelsSoon() {
    clearTimeout(modelsTimer);
    modelsTimer = setTimeout(refreshModels, 300);
  }

  async function refreshModels() {
    let body;
    try {
      body = await api("/models");
    } catch (err) {
      // Under API_KEYS without a (valid) key: ask for one.
      $("notice").hidden = err.status !== 401;
      return;  // otherwise the connection badges already say the server is away
    }
    $("notice").hidden = true;
    state.models = body.models || [];
    for (const m of state.models) {
      for (const v of m.versions) {
        const key = `${m.name}/${v.version}`;
        if (v.state === "FAILED" && !knownFailures.has(key)) {
          knownFailures.add(key);
          addEvent("load failure", `${key}: ${v.error || "failed"}`, "bad", null,
                   "model_failed");
        }
      }
    }
    renderModels();
    refreshQuality();
    refreshDrift();
    fillModelSelect($("predict-model"));
    fillModelSelect($("train-model"));
    fillVersionSelect();
  }

  function renderModels() {
    replaceChildren($("models-body"), state.models.map((m) => el("tr", {},
      el("td", {text: m.name}),
      el("td", {}, ...m.versions.map((v) => el("span", {
        className: v.state === "FAILED" ? "tag failed" : "tag",
        title: v.state === "FAILED" ? v.error : `${v.estimator} · ${v.task}`,
        text: "v" + v.version + (v.state === "FAILED" ? " failed" : ""),
      }))),
      el("td", {}, ...Object.entries(m.labels || {}).map(([label, version]) =>
        el("span", {className: "tag", text: `${label} → v${version}`}))))));
  }

  function fillModelSelect(select) {
    const chosen = select.value;
    const names = state.models.map((m) => m.name);
    replaceChildren(select, names.map((n) => el("option", {value: n, text: n})));
    if (names.includes(chosen)) select.value = chosen;
  }

  function currentModel() {
    return state.models.find((m) => m.name === $("predict-model").value) || null;
  }

  function fillVersionSelect() {
    const select = $("predict-version");
    const chosen = select.value;
    const m = currentModel();
    const options = [];
    if (m) {
      options.push(el("option", {value: "latest", text: `latest (v${m.latest})`}));
      for (const [label, version] of Object.entries(m.labels || {})) {
        options.push(el("option", {value: label, text: `${label} (v${version})`}));
      }
      for (const v of m.versions) {
        const failed = v.state === "FAILED";
        options.push(el("option", {value: v.version, disabled: failed ? "" : null,
                                   text: "v" + v.version + (failed ? " (failed)" : "")}));
      }
    }
    replaceChildren(select, options);
    if ([...select.options].some((o) => o.value === chosen && !o.disabled)) {
      select.value = chosen;
    }
    renderFeatures();
  }

  function chosenVersion() {
    const m = currentModel();
    if (!m) return null;
    let wanted = $("predict-version").value;
    if (m.labels && m.labels[wanted]) wanted = m.labels[wanted];
    if (wanted === "latest") wanted = m.latest;
    return m.versions.find((v) => v.version === wanted && v.state !== "FAILED") || null;
  }

  let featuresKey = "";

  function renderFeatures() {
    const v = chosenVersion();
    const names = v ? (v.feature_names ||
                       Array.from({length: v.n_features || 0}, (_, i) => `feature ${i}`)) : [];
    const key = `${$("predict-model").value}|${names.join(",")}`;
    if (key === featuresKey) return;  // same features: keep what the user typed
    featuresKey = key;
    replaceChildren($("predict-features"), names.map((name, i) => el("label", {},
      name, el("input", {type: "number", step: "any", required: "", name,
                         id: `feature-${i}`, dataset: {index: String(i)}}))));
  }

  // --- Prediction form --------------------------------------------------------------------
  async function predict(event) {
    event.preventDefault();
    const errorNode = $("predict-error");
    const resultNode = $("predict-result");
    errorNode.hidden = true;
    const model = $("predict-model").value;
    const version = $("predict-version").value;
    const inputs = [...$("predict-features").querySelectorAll("input")];
    const features = inputs.map((input) => input.value.trim() === "" ? NaN : Number(input.value));
    const missing = inputs.filter((input, i) => !Number.isFinite(features[i]));
    if (!model || missing.length) {
      const what = model ? `fill in ${missing.map((i) => i.name).join(", ")}` : "choose a model";
      showError(errorNode, new ApiFailure(0, {error: what, code: "incomplete form"}));
      return;
    }
    $("predict-submit").disabled = true;
    try {
      const path = `/predict/${encodeURIComponent(model)}/versions/${encodeURIComponent(version)}`;
      const answer = await api(path, {method: "POST", body: JSON.stringify({features}),
                                      headers: {"Content-Type": "application/json"}});
      state.prediction = answer;
      state.predictionError = null;
      renderPrediction(answer);
    } catch (failure) {
      state.prediction = null;
      state.predictionError = failure.body;
      resultNode.hidden = true;
      showError(errorNode, failure);
    } finally {
      $("predict-submit").disabled = false;
    }
  }

  function renderPrediction(a) {
    const rows = [["model", a.model], ["version", "v" + a.version],
                  ["prediction", typeof a.prediction === "number" ?
                                 fmt.num(a.prediction, 6) : String(a.prediction)]];
    if (a.label !== undefined) rows.push(["label", a.label]);
    if (a.confidence !== undefined) rows.push(["confidence", fmt.pct(a.confidence)]);
    rows.push(["cached", a.cached ? "yes" : "no"], ["request id", a.request_id]);
    const parts = [el("dl", {id: "predict-answer"}, ...rows.flatMap(([k, v]) => [
      el("dt", {text: k}), el("dd", {dataset: {field: k}, text: v})]))];
    if (a.probabilities) {
      const entries = Object.entries(a.probabilities).sort((x, y) => y[1] - x[1]);
      parts.push(el("table", {id: "predict-probabilities"},
        el("thead", {}, el("tr", {}, el("th", {text: "class"}),
                           el("th", {className: "num", text: "probability"}),
                           el("th", {className: "bar-cell"}))),
        el("tbody", {}, ...entries.map(([cls, p]) => el("tr", {dataset: {cls}},
          el("td", {text: cls}), el("td", {className: "num", text: p.toFixed(4)}),
          el("td", {className: "bar-cell"}, bar(p)))))));
    }
    const node = $("predict-result");
    replaceChildren(node, parts);
    node.hidden = false;
  }

  // --- Training ---------------------------------------------------------------------------

  function setTraining(value, text, fraction) {
    const t = state.training;
    t.state = value;
    $("train-status").dataset.state = value;
    $("train-text").textContent = text;
    const progress = $("train-progress");
    progress.hidden = fraction === undefined;
    if (fraction !== undefined) progress.value = fraction;
  }

  const TRAIN_HINTS = {
    401: "Type the server's ADMIN_TOKEN in the field above and start again.",
    403: "This server has no ADMIN_TOKEN, so admin endpoints are off.",
    404: "The model has no training data in the repository (POST a CSV with curl instead).",
    503: "The worker holds too many streams; try again in a moment.",
  };

  async function train(event) {
    event.preventDefault();
    const errorNode = $("train-error");
    errorNode.hidden = true;
    const model = $("train-model").value;
    const epochs = Number($("train-epochs").value);
    const token = $("admin-token").value.trim();
    const headers = {"Content-Type": "application/json", "Accept": "text/event-stream"};
    if (token) headers.Authorization = "Bearer " + token;
    Object.assign(state.training, {epochs: [], version: null, error: null, model});
    replaceChildren($("train-epochs-list"), []);
    $("train-submit").disabled = true;
    setTraining("running", `starting ${model}…`, 0);
    try {
      let resp;
      try {
        resp = await fetch("/train/stream", {method: "POST", headers, cache: "no-store",
                                             body: JSON.stringify({model, epochs})});
      } catch (err) {
        throw new ApiFailure(0, {error: "the server cannot be reached", code: "unreachable"});
      }
      if (!resp.ok) await readAnswer(resp);  // throws the JSON error
      await readTrainingStream(resp, model);
    } catch (failure) {
      state.training.error = failure.body || {error: String(failure)};
      setTraining("failed", "failed");
      showError(errorNode, failure instanceof ApiFailure ? failure
        : new ApiFailure(0, {error: String(failure)}), TRAIN_HINTS);
    } finally {
      $("train-submit").disabled = false;
    }
  }

  async function readTrainingStream(resp, model) {
    const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      buffer += value.replace(/\r\n/g, "\n");
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const frame = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        if (onTrainingFrame(frame, model)) return;
      }
    }
    if (state.training.state === "running") {
      throw new ApiFailure(0, {error: "the stream ended before training finished",
                               code: "stream_cut"});
    }
  }

  // One SSE frame of the training stream; true once the run is over.
  function onTrainingFrame(frame, model) {
    let name = "message";
    const data = [];
    for (const line of frame.split("\n")) {
      if (line.startsWith("event:")) name = line.slice(6).trim();
      else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
    }
    if (!data.length) return false;  // ": ping"
    const text = data.join("\n");
    if (text === "[DONE]") return state.training.state !== "running";
    const message = JSON.parse(text);
    if (name === "error") {
      throw new ApiFailure(0, {error: message.error, code: message.code || "training_failed"});
    }
    if (message.status === "started") {
      setTraining("running", `training ${model}…`, 0);
    } else if (message.status === "complete") {
      state.training.version = String(message.version);
      setTraining("complete", `${model} v${message.version} trained and serving`, 1);
      refreshModelsSoon();
    } else if (message.epoch !== undefined) {
      state.training.epochs.push(message);
      const total = message.total_epochs || message.epoch;
      setTraining("running", `epoch ${message.epoch} of ${total}`, message.epoch / total);
      $("train-epochs-list").append(el("li", {text:
        `epoch ${message.epoch}: loss ${fmt.num(message.loss, 4)}, ` +
        `accuracy ${fmt.num(message.accuracy, 4)}`}));
    }
    return false;
  }

  // --- Experiments ------------------------------------------------------------------------
  async function refreshExperiments() {
    let body;
    try {
      body = await api("/experiments");
    } catch (err) {
      return;
    }
    state.experiments = body;
    renderExperiments(body);
  }

  function renderExperiments(body) {
    const parts = [];
    if (body.file_error) {
      parts.push(el("p", {className: "failed", text: `experiments.json: ${body.file_error}`}));
    }
    for (const exp of body.experiments || []) {
      const box = el("div", {className: "experiment", dataset: {name: exp.name}},
        el("h3", {text: `${exp.name} · ${exp.model}`}));
      if (!exp.valid) {
        box.append(el("p", {className: "failed", text: exp.error || "invalid"}));
        parts.push(box);
        continue;
      }
      const numeric = exp.outcome_type === "numeric";
      box.append(el("p", {className: "muted", text:
        `${numeric ? "numeric outcome, Welch's t-test" : "0/1 outcome, two-proportion z-test"}` +
        ` · counts: ${exp.counts_scope}`}));
      box.append(el("table", {},
        el("thead", {}, el("tr", {}, ...["arm", "version", "weight", "requests", "outcomes",
                                          numeric ? "mean" : "rate", "p-value"].map((h, i) =>
          el("th", {className: i > 1 ? "num" : null, text: h})))),
        el("tbody", {}, ...Object.entries(exp.arms || {}).map(([arm, a]) => {
          const p = a.p_value;
          const pText = a.vs ? `${fmt.p(p)} vs ${a.vs}` : "control";
          return el("tr", {dataset: {arm}},
            el("td", {text: arm}), el("td", {text: "v" + a.version}),
            el("td", {className: "num", text: a.weight}),
            el("td", {className: "num", text: fmt.num(a.requests, 0)}),
            el("td", {className: "num", text: fmt.num(a.outcomes, 0)}),
            el("td", {className: "num", text: numeric ? fmt.num(a.mean, 3) : fmt.pct(a.rate)}),
            el("td", {className: p !== null && p !== undefined && p < 0.05
              ? "num significant" : "num", text: pText}));
        }))));
      if (exp.shadow) {
        const s = exp.shadow;
        box.append(el("p", {className: "muted", text: `shadow v${s.version}: ` +
          `${s.requests ?? 0} requests, ${s.agreed ?? 0} agreed, ${s.errors ?? 0} errors`}));
      }
      parts.push(box);
    }
    if (!parts.length) {
      parts.push(el("p", {className: "muted", text: "no experiments (experiments.json)"}));
    }
    replaceChildren($("experiments-body"), parts);
  }

  // --- Quality from feedback -----------------------------------------------------------------
  async function refreshQuality() {
    const rows = [];
    for (const m of state.models || []) {
      for (const v of m.versions) {
        if (v.state === "FAILED") continue;
        let q;
        try {
          q = await api(`/models/${encodeURIComponent(m.name)}/versions/${v.version}/quality`);
        } catch (err) {
          if (err.status === 404 && err.body && err.body.code === "prediction_log_off") {
            replaceChildren($("quality-body"), [el("tr", {}, el("td", {colSpan: 6,
              className: "muted", text: "the prediction log is off (PREDICTION_LOG=off)"}))]);
            return;
          }
          continue;
        }
        rows.push(el("tr", {dataset: {model: m.name, version: v.version}},
          el("td", {text: m.name}), el("td", {text: "v" + v.version}),
          el("td", {className: "num", text: fmt.num(q.labelled, 0)}),
          el("td", {className: "num", text: q.accuracy == null ? "–" : fmt.pct(q.accuracy)}),
          el("td", {className: "num", text: q.mae == null ? "–" : fmt.num(q.mae, 3)}),
          el("td", {className: "num", text: q.rmse == null ? "–" : fmt.num(q.rmse, 3)})));
      }
    }
    replaceChildren($("quality-body"), rows.length ? rows : [el("tr", {}, el("td", {
      colSpan: 6, className: "muted", text: "no model versions"}))]);
  }

  // --- Drift against the training data -----------------------------------------------------
  const DRIFT_RANK = {drifted: 4, moderate: 3, stable: 2, not_enough_rows: 1, no_reference: 0};
  let driftPolling = false;

  async function refreshDrift() {
    if (driftPolling) return;
    driftPolling = true;
    try {
      const answers = {};
      for (const m of state.models || []) {
        for (const v of m.versions) {
          if (v.state === "FAILED") continue;
          try {
            answers[`${m.name}/${v.version}`] = await api(
              `/models/${encodeURIComponent(m.name)}/versions/${v.version}/drift`);
          } catch (err) {
            if (err.status === 404 && err.body && err.body.code === "drift_off") {
              state.drift.off = true;
              renderDrift();
              return;
            }
          }
        }
      }
      state.drift.off = false;
      state.drift.answers = answers;
      fillDriftSelect();
      renderDrift();
    } finally {
      driftPolling = false;
    }
  }

  function maxPsi(answer) {
    const values = Object.values(answer.features || {}).map((f) => f.psi ?? -1);
    return Math.max(-1, ...values);
  }

  // The version picked in the select, else the most drifted one.
  function driftShown() {
    const answers = state.drift.answers;
    const chosen = $("drift-version").value;
    if (chosen && answers[chosen]) return answers[chosen];
    const all = Object.values(answers);
    all.sort((a, b) => (DRIFT_RANK[b.status] ?? 0) - (DRIFT_RANK[a.status] ?? 0) ||
                       maxPsi(b) - maxPsi(a));
    return all[0] || null;
  }

  function fillDriftSelect() {
    const select = $("drift-version");
    const chosen = select.value;
    const keys = Object.keys(state.drift.answers);
    replaceChildren(select, [el("option", {value: "", text: "the most drifted"}),
      ...keys.map((k) => el("option", {value: k, text: k.replace("/", " v")}))]);
    if (keys.includes(chosen)) select.value = chosen;
  }

  function renderDrift() {
    const body = $("drift-body");
    const title = $("drift-bins-title");
    const bins = $("drift-bins");
    const badge = $("drift-status");
    const message = (text) => {
      replaceChildren(body, [el("tr", {}, el("td", {colSpan: 5, className: "muted", text}))]);
      title.hidden = bins.hidden = true;
    };
    if (state.drift.off) {
      state.drift.shown = null;
      badge.textContent = "off";
      badge.dataset.status = "";
      $("drift-summary").textContent = "drift monitoring is off (DRIFT=off)";
      message("drift monitoring is off (DRIFT=off)");
      return;
    }
    const a = driftShown();
    state.drift.shown = a;
    if (!a) {
      badge.textContent = "–";
      message("no model versions");
      return;
    }
    badge.textContent = `${a.model} v${a.version}: ${a.status.replaceAll("_", " ")}`;
    badge.dataset.status = a.status;
    const minutes = Math.round(a.window_seconds / 60);
    $("drift-summary").textContent = a.status === "no_reference" ? a.reason :
      `${fmt.num(a.rows, 0)} rows counted in the last ${minutes} min` +
      ` · training profile of ${fmt.num(a.reference_rows, 0)} rows` +
      (a.note ? ` · ${a.note}` : "");
    if (a.status === "no_reference" || a.status === "not_enough_rows") {
      message(a.reason || a.status);
      return;
    }
    const rows = Object.entries(a.features).sort((x, y) => (y[1].psi ?? 0) - (x[1].psi ?? 0));
    if (a.prediction) rows.push(["(prediction)", a.prediction]);
    replaceChildren(body, rows.map(([name, f]) => el("tr", {
      dataset: {feature: name, status: f.status || ""}},
      el("td", {text: name}), el("td", {className: "num", text: fmt.num(f.psi, 3)}),
      el("td", {className: "num", text: fmt.p(f.p_value)}),
      el("td", {className: "bar-cell"}, driftBar(f)),
      el("td", {className: `status-${f.status}`, text: f.status || "–"}))));
    renderBins(a.worst_feature, a.features[a.worst_feature]);
  }

  function driftBar(f) {
    const node = bar((f.psi || 0) / 0.5);
    node.classList.add(`status-${f.status}`);
    return node;
  }

  // Live against training shares, bin by bin, of one feature.
  function renderBins(name, f) {
    const title = $("drift-bins-title");
    const bins = $("drift-bins");
    if (!f) {
      title.hidden = bins.hidden = true;
      return;
    }
    title.textContent = `Most drifted feature: ${name} (PSI ${fmt.num(f.psi, 3)}), ` +
                        "share of rows per bin";
    const top = Math.max(1e-9, ...f.live_proportions, ...f.reference_proportions);
    const edges = f.edges || [];
    bins.dataset.feature = name;
    replaceChildren(bins, f.live_proportions.map((live, i) => {
      const ref = f.reference_proportions[i];
      const low = i === 0 ? "" : fmt.num(edges[i - 1], 2);
      const label = i === 0 ? `< ${fmt.num(edges[0], 2)}` : `≥ ${low}`;
      const column = el("div", {className: "bin", title: `${label}: live ${fmt.pct(live)}, ` +
                                `training ${fmt.pct(ref)}`, dataset: {bin: String(i)}},
        el("div", {className: "bin-bar live"}), el("div", {className: "bin-bar reference"}),
        el("span", {className: "bin-label", text: edges.length ? label : "all"}));
      column.children[0].style.height = (100 * live / top) + "%";
      column.children[1].style.height = (100 * ref / top) + "%";
      return column;
    }));
    title.hidden = bins.hidden = false;
  }

  // --- Start ------------------------------------------------------------------------------
  $("predict-form").addEventListener("submit", predict);
  $("predict-model").addEventListener("change", fillVersionSelect);
  $("predict-version").addEventListener("change", renderFeatures);
  $("train-form").addEventListener("submit", train);
  $("drift-version").addEventListener("change", renderDrift);
  const tokenField = $("admin-token");
  tokenField.value = stored(TOKEN_KEY);
  tokenField.addEventListener("input", () => store(TOKEN_KEY, tokenField.value.trim()));
  $("forget-token").addEventListener("click", () => {
    tokenField.value = "";
    store(TOKEN_KEY, "");
  });
  setInterval(() => {
    if (state.connections.monitor.state === "open" && !document.hidden) refreshExperiments();
  }, EXPERIMENT_POLL_MS);
  // Each figure is a query of the prediction log's database: less often.
  setInterval(() => {
    if (state.connections.monitor.state === "open" && !document.hidden) refreshQuality();
  }, QUALITY_POLL_MS);
  setInterval(() => {
    if (state.connections.monitor.state === "open" && !document.hidden) refreshDrift();
  }, DRIFT_POLL_MS);

  $("notice").addEventListener("submit", (event) => {
    event.preventDefault();
    if (store(API_KEY, $("api-key").value.trim())) {
      location.reload();  // every request and feed starts over with the key
    }
  });

  refreshModels();
  connectMonitor();
  connectEvents();
})();
