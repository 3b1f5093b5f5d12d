/* sluice dashboard: renders /api/state, then follows /events (server-sent events) so the
   page updates without reloading. Charts are uPlot (vendored: uPlot.iife.min.js). Text from
   the stream (class labels, reasons, errors) only ever goes in through textContent. */
"use strict";
(function () {
  const PALETTE = ["#4c78a8", "#f58518", "#54a24b", "#e45756", "#72b7b2", "#b279a2",
                   "#eeca3b", "#9d755d", "#ff9da6", "#79706e", "#17becf", "#bcbd22"];
  const HEIGHT = 220;
  const charts = {};              // chart name -> {u, key, card}
  const colors = new Map();       // series base name -> colour, stable for the page's life
  const dash = (window.sluice = { charts, state: null, updates: 0, online: false });

  // --- formatting ------------------------------------------------------------------------
  const isNum = (v) => typeof v === "number" && isFinite(v);
  function num(v, digits) {
    if (!isNum(v)) return "–";
    if (v === 0) return "0";
    const a = Math.abs(v);
    const d = digits !== undefined ? digits : a >= 100 ? 0 : a >= 10 ? 1 : a >= 1 ? 2 : 3;
    return v.toLocaleString("en-US", { minimumFractionDigits: d, maximumFractionDigits: d });
  }
  const int = (v) => (isNum(v) ? Math.round(v).toLocaleString("en-US") : "–");
  const pct = (v) => (isNum(v) ? (100 * v).toFixed(Math.abs(v) < 0.1 ? 2 : 1) + " %" : "–");
  function ago(seconds) {
    if (!isNum(seconds)) return "";
    if (seconds < 90) return Math.max(0, Math.round(seconds)) + " s ago";
    if (seconds < 5400) return Math.round(seconds / 60) + " min ago";
    return Math.round(seconds / 3600) + " h ago";
  }
  function colorOf(name) {
    if (!colors.has(name)) colors.set(name, PALETTE[colors.size % PALETTE.length]);
    return colors.get(name);
  }
  const byId = (id) => document.getElementById(id);
  const keys = (o) => Object.keys(o || {}).sort();

  // Text with `code` spans, built without innerHTML.
  function rich(el, text) {
    el.textContent = "";
    String(text || "").split("`").forEach((part, i) => {
      if (i % 2) { const c = document.createElement("code"); c.textContent = part; el.appendChild(c); }
      else el.appendChild(document.createTextNode(part));
    });
  }

  // --- status --------------------------------------------------------------------------
  const STATUS = {
    connecting: ["connecting…", "Connecting to Kafka…", "", ""],
    down: ["Kafka down", "Kafka is unreachable.", "error",
           "Start the local stack with `sluice up`, or point `kafka.bootstrap_servers` at " +
           "your cluster. Retrying every few seconds; the page updates by itself."],
    no_topic: ["no metrics topic", "No metrics topic yet.", "error",
               "`sluice up` (or `sluice topics` on your own cluster) creates it; then start " +
               "`sluice worker`."],
    waiting: ["waiting for data", "Connected — waiting for data.", "waiting",
              "Start `sluice worker` and send events with `sluice produce …`; every stage " +
              "publishes its counters every few seconds."],
    stale: ["stale", "No new metrics.", "stale",
            "Is `sluice worker` still running? The charts show the last data received."],
    live: ["live", "", "", ""],
    offline: ["dashboard offline", "Lost the dashboard server.", "",
              "Is `sluice dashboard` still running? Reconnecting…"],
  };

  function renderStatus(state) {
    const status = dash.online ? state.status : "offline";
    const [pill, title, detailKind, hint] = STATUS[status] || STATUS.connecting;
    const el = byId("status");
    el.className = "pill pill-" + status;
    el.querySelector("b").textContent = pill;
    const src = state.source || {};
    byId("source").textContent = src.bootstrap ? `Kafka ${src.bootstrap} · ${src.topic}` : "";
    const age = isNum(state.last_snapshot) ? (state.now - state.last_snapshot) / 1000 : null;
    byId("updated").textContent = age === null ? "no snapshot yet" : "last snapshot " + ago(age);

    const banner = byId("banner");
    banner.hidden = !title;
    banner.classList.toggle("bad", status === "down" || status === "offline");
    byId("banner-title").textContent = title;
    let detail = "";
    if (detailKind === "error") detail = state.error || "";
    else if (detailKind === "waiting") detail = `Nothing on ${src.topic} in the last ` +
        `${Math.round((state.lookback_s || 600) / 60)} min.`;
    else if (detailKind === "stale") detail = age === null ? "" : `Last snapshot ${ago(age)}.`;
    byId("banner-detail").textContent = detail;
    rich(byId("banner-hint"), hint);
  }

  // --- numbers -------------------------------------------------------------------------
  function renderKpis(state) {
    const stages = state.stages || [];
    const entry = stages[0];
    const balance = stages.find((s) => s.component === "balance");
    byId("kpi-in").textContent = entry ? num(entry.in_per_s) : "–";
    byId("kpi-out").textContent = balance ? num(balance.out_per_s) : "–";
    byId("kpi-dup").textContent = pct(state.duplicates && state.duplicates.rate);
    const rej = stages.map((s) => s.rejected_per_s).filter(isNum);
    byId("kpi-rej").textContent = rej.length ? num(rej.reduce((a, b) => a + b, 0)) : "–";
    const lag = state.lag ? Object.values(state.lag) : [];
    const trainer = state.trainer;
    if (trainer && isNum(trainer.lag)) lag.push(trainer.lag);
    byId("kpi-lag").textContent = lag.length ? int(lag.reduce((a, b) => a + b, 0)) : "–";
    byId("kpi-step").textContent = trainer ? "step " + int(trainer.step) : "–";
    byId("kpi-train").textContent = trainer
      ? `loss ${num(trainer.loss, 3)} · acc ${pct(trainer.accuracy)}` : "no trainer seen";
  }

  function fillTable(id, rows, cells) {
    const body = byId(id).querySelector("tbody");
    body.textContent = "";
    if (!rows.length) {
      const tr = body.insertRow();
      const td = tr.insertCell();
      td.colSpan = byId(id).querySelectorAll("th").length;
      td.className = "none";
      td.textContent = "none yet";
      return;
    }
    for (const row of rows) {
      const tr = body.insertRow();
      for (const cell of cells(row)) {
        const td = tr.insertCell();
        if (cell instanceof Node) td.appendChild(cell); else td.textContent = cell;
      }
    }
  }

  function shareCell(value, raw) {
    const span = document.createElement("span");
    span.textContent = pct(value);
    const bar = document.createElement("i");
    bar.className = raw ? "bar raw" : "bar";
    bar.style.width = (isNum(value) ? Math.round(60 * value) : 0) + "px";
    span.appendChild(bar);
    return span;
  }

  function renderTables(state) {
    fillTable("stages", state.stages || [], (s) => [
      s.component, int(s.in), int(s.out), int(s.rejected), num(s.in_per_s), num(s.out_per_s),
      num(s.latency_ms.p50, 0), num(s.latency_ms.p99, 0), `${s.fresh}/${s.instances}`]);
    fillTable("classes", state.classes || [], (c) => [
      c.label, shareCell(c.raw, true), shareCell(c.curated, false), pct(c.target), int(c.buffer)]);
    fillTable("rejections", state.rejections || [], (r) => [
      r.reason, r.component, int(r.total), num(r.per_s), pct(r.share)]);
    const pairs = (obj, show) => keys(obj || {}).map((k) => `${k} ${show(obj[k])}`).join(", ");
    fillTable("sources", state.sources || [], (r) => [
      r.source, int(r.in), int(r.kept), shareCell(r.kept_share, false), pct(r.duplicate_rate),
      pct(r.duplicate_part), pairs(r.rejected, int), pairs(r.classes, pct)]);
    fillTable("contamination", keys(state.contamination || {}).map((m) => [m,
      state.contamination[m]]), (r) => [r[0], int(r[1])]);
  }

  // --- charts --------------------------------------------------------------------------
  // Each returns {series: [{label, values, color, dash, width, scale}], scales, axes}.
  const scaled = (values, k) => values.map((v) => (isNum(v) ? v * k : null));
  const plain = (obj, filter) => keys(obj).filter(filter || (() => true)).map((k) => ({
    label: k, values: obj[k], color: colorOf(k) }));

  const SPECS = {
    classes(s) {
      const labels = [...new Set([...keys(s.share_raw), ...keys(s.share_curated)])].sort();
      const series = [];
      for (const l of labels) {
        const color = colorOf("class:" + l);
        if (s.share_curated[l]) series.push({ label: l + " curated", values: scaled(s.share_curated[l], 100), color, width: 2 });
        if (s.share_raw[l]) series.push({ label: l + " raw", values: scaled(s.share_raw[l], 100), color, dash: [6, 4] });
      }
      return { series, unit: "%", range: [0, 100] };
    },
    throughput(s) {
      // Each stage's intake, and what leaves the last stage (balance: curated samples).
      const outs = keys(s.throughput).filter((k) => k.endsWith(" out"));
      const last = outs.includes("balance out") ? "balance out" : outs.pop();
      return { series: plain(s.throughput, (k) => k.endsWith(" in") || k === last), unit: "/s" };
    },
    rejections: (s) => ({ series: plain(s.rejections), unit: "/s" }),
    duplicates(s) {
      const series = keys(s.duplicates).map((k) => ({
        label: k.replace("_duplicate", ""), values: scaled(s.duplicates[k], 100),
        color: k === "all duplicates" ? "#1d2330" : colorOf(k), width: k === "all duplicates" ? 2 : 1.5 }));
      return { series, unit: "%" };
    },
    latency: (s) => ({ series: plain(s.latency), unit: "ms" }),
    lag: (s) => ({ series: plain(s.lag), unit: "", whole: true }),
    training(s) {
      const series = [];
      if (s.training.loss) series.push({ label: "loss", values: s.training.loss, color: "#e45756", width: 2 });
      if (s.training.accuracy) series.push({ label: "accuracy %", values: scaled(s.training.accuracy, 100), color: "#4c78a8", width: 2, scale: "acc" });
      return { series, unit: "", right: { scale: "acc", range: [0, 100], unit: "%" } };
    },
  };

  function axisValues(unit) {
    return (u, vals) => vals.map((v) => (v == null ? "" : num(v, Math.abs(v) >= 10 || v === 0 ? 0 : 1) + (unit === "%" ? "%" : "")));
  }
  // Time of day on the x axis (24 h; seconds only where a tick needs them).
  function timeTicks(u, ticks) {
    const pad = (n) => String(n).padStart(2, "0");
    return ticks.map((t) => {
      const d = new Date(t * 1000);
      const hm = pad(d.getHours()) + ":" + pad(d.getMinutes());
      return d.getSeconds() ? hm + ":" + pad(d.getSeconds()) : hm;
    });
  }
  function autoRange(u, min, max) {
    const hi = isNum(max) && max > 0 ? max * 1.15 : 1;
    return [0, hi];
  }

  function options(spec, width) {
    const scales = { x: { time: true }, y: { range: spec.range ? () => spec.range : autoRange } };
    const axes = [{ stroke: "#687082", grid: { stroke: "#eef0f3" }, space: 70, values: timeTicks },
                  { scale: "y", size: 58, stroke: "#687082", grid: { stroke: "#eef0f3" }, values: axisValues(spec.unit) }];
    if (spec.right) {
      scales[spec.right.scale] = { range: () => spec.right.range };
      axes.push({ scale: spec.right.scale, side: 1, size: 50, stroke: "#687082", grid: { show: false }, values: axisValues(spec.right.unit) });
    }
    return {
      width, height: HEIGHT, scales, axes,
      cursor: { drag: { x: false, y: false } },
      legend: { live: true },
      series: [{ value: "{YYYY}-{MM}-{DD} {HH}:{mm}:{ss}" }].concat(spec.series.map((s) => ({
        label: s.label, stroke: s.color, width: s.width || 1.5, dash: s.dash, scale: s.scale || "y",
        spanGaps: false, points: { show: false },
        value: (u, v) => (v == null ? "–" : (spec.whole ? int(v) : num(v)) +
          (spec.unit === "%" || s.scale === "acc" ? " %" : spec.unit ? " " + spec.unit : "")),
      }))),
    };
  }

  // The first time index where any series has a value: charts start there, not with an
  // empty stretch when the pipeline started less than the span ago.
  function firstKnown(s) {
    let first = s.t.length;
    for (const [name, group] of Object.entries(s)) {
      if (name === "t") continue;
      for (const values of Object.values(group)) {
        const i = values.findIndex(isNum);
        if (i >= 0 && i < first) first = i;
      }
    }
    if (first === s.t.length) return 0;             // nothing known: the whole span
    return Math.max(0, Math.min(first, s.t.length - 2));
  }

  function renderChart(card, state, start) {
    const name = card.dataset.chart;
    const s = state.series;
    const spec = SPECS[name](s);
    spec.series.forEach((x) => { x.values = x.values.slice(start); });
    const data = [s.t.slice(start)].concat(spec.series.map((x) => x.values));
    const empty = !spec.series.some((x) => x.values.some(isNum));
    card.querySelector(".empty").hidden = !empty;
    const key = JSON.stringify(spec.series.map((x) => [x.label, x.scale || "y"]));
    const plot = card.querySelector(".plot");
    let chart = charts[name];
    if (chart && chart.key !== key) { chart.u.destroy(); chart = null; }
    if (!chart) {
      const u = new uPlot(options(spec, Math.max(200, plot.clientWidth)), data, plot);
      chart = charts[name] = { u, key, card, points: 0 };
    } else {
      chart.u.setData(data);
    }
    // Away from the cursor, the legend shows the latest values.
    if (!(chart.u.cursor.left >= 0)) chart.u.setLegend({ idx: data[0].length - 1 });
    chart.points = spec.series.reduce((n, x) => n + x.values.filter(isNum).length, 0);
  }

  function renderCharts(state) {
    if (!state.series) return;
    const start = firstKnown(state.series);
    document.querySelectorAll(".card[data-chart]").forEach((card) => renderChart(card, state, start));
  }

  const resize = new ResizeObserver((entries) => {
    for (const entry of entries) {
      const chart = Object.values(charts).find((c) => c.card.contains(entry.target));
      const width = Math.floor(entry.contentRect.width);
      if (chart && width > 0 && Math.abs(chart.u.width - width) > 2) chart.u.setSize({ width, height: HEIGHT });
    }
  });
  document.querySelectorAll(".card .plot").forEach((el) => resize.observe(el));

  // --- the stream ----------------------------------------------------------------------
  function render(state) {
    dash.state = state;
    dash.updates += 1;
    renderStatus(state);
    renderKpis(state);
    renderTables(state);
    renderCharts(state);
  }

  function offline() {
    dash.online = false;
    renderStatus(dash.state || { status: "offline" });
  }

  fetch("/api/state")
    .then((r) => r.json())
    .then((state) => { if (!dash.updates) { dash.online = true; render(state); } })
    .catch(offline);
  const events = new EventSource("/events");
  events.onmessage = (ev) => { dash.online = true; render(JSON.parse(ev.data)); };
  events.onerror = offline;
})();
