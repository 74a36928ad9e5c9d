// meshgate dashboard: the built-in pages, registered like any other page.
"use strict";

(function (ui) {
  const { el, svg, api, fmt } = ui;
  const OBS = "/v1/observability";

  function table(headers, rows, attrs) {
    return el(
      "table",
      attrs || {},
      el("thead", {}, el("tr", {}, headers.map((h) => el("th", { text: h })))),
      el("tbody", {}, rows)
    );
  }

  function empty(text) {
    return el("p", { class: "muted empty", text });
  }

  function badge(text, kind) {
    return el("span", { class: `badge ${kind || ""}`, text });
  }

  function dot(service) {
    return el("span", { class: "dot", style: `background:${ui.colour(service)}` });
  }

  async function registryInstances() {
    try {
      const body = await api("/v1/registry/services");
      return body.services || {};
    } catch (error) {
      if (error.status === 404) return null; // the gateway runs without a registry
      throw error;
    }
  }

  // -- the system map

  function layout(nodes, edges) {
    const incoming = new Map(nodes.map((n) => [n.service, []]));
    for (const e of edges) if (incoming.has(e.callee)) incoming.get(e.callee).push(e.caller);
    const depth = new Map();
    const visiting = new Set();
    function depthOf(name) {
      if (depth.has(name)) return depth.get(name);
      if (visiting.has(name)) return 0; // a cycle: cut it here
      visiting.add(name);
      const callers = incoming.get(name) || [];
      const d = callers.length ? Math.max(...callers.map((c) => depthOf(c) + 1)) : 0;
      visiting.delete(name);
      depth.set(name, d);
      return d;
    }
    const columns = [];
    for (const n of nodes) {
      const d = depthOf(n.service);
      (columns[d] = columns[d] || []).push(n);
    }
    const place = new Map();
    columns.forEach((column, x) => {
      (column || []).forEach((n, y) => place.set(n.service, { x: 40 + x * 340, y: 40 + y * 120 }));
    });
    const width = Math.max(columns.length, 1) * 340 - 110;
    const height = 60 + Math.max(1, ...columns.map((c) => (c || []).length)) * 120;
    return { place, width, height };
  }

  function mapSvg(data, instances) {
    const { nodes, edges } = data;
    const { place, width, height } = layout(nodes, edges);
    const W = 190;
    const H = 64;
    const root = svg("svg", {
      class: "map",
      viewBox: `0 0 ${width} ${height}`,
      width,
      height,
      role: "img",
      "aria-label": "system map",
    });
    root.append(
      svg(
        "defs",
        {},
        svg(
          "marker",
          { id: "arrow", viewBox: "0 0 10 10", refX: 10, refY: 5, markerWidth: 8, markerHeight: 8, orient: "auto" },
          svg("path", { d: "M0,0 L10,5 L0,10 z", class: "arrowhead" })
        )
      )
    );
    for (const e of edges) {
      const a = place.get(e.caller);
      const b = place.get(e.callee);
      if (!a || !b) continue;
      const x1 = a.x + W;
      const y1 = a.y + H / 2;
      const x2 = b.x;
      const y2 = b.y + H / 2;
      const back = x2 <= x1;
      const path = back
        ? `M${a.x + W / 2},${a.y + H} C${a.x + W / 2},${a.y + H + 60} ${b.x + W / 2},${b.y + H + 60} ${b.x + W / 2},${b.y + H}`
        : `M${x1},${y1} C${x1 + 60},${y1} ${x2 - 60},${y2} ${x2},${y2}`;
      const bad = e.error_ratio >= 0.05;
      const mx = back ? (a.x + b.x) / 2 + W / 2 : (x1 + x2) / 2;
      const my = back ? Math.max(a.y, b.y) + H + 50 : (y1 + y2) / 2 - 8;
      root.append(
        svg(
          "g",
          { class: `edge${bad ? " bad" : ""}`, "data-edge": `${e.caller}->${e.callee}` },
          svg("title", { text: `${e.caller} → ${e.callee}: ${e.requests} calls` }),
          svg("path", { d: path, "marker-end": "url(#arrow)" }),
          svg("text", { x: mx, y: my - 12, "text-anchor": "middle", class: "edge-label" },
            svg("tspan", { x: mx, dy: 0 }, `${fmt.rate(e.rate)} · ${fmt.pct(e.error_ratio)}`),
            svg("tspan", { x: mx, dy: 13 }, `p99 ${fmt.ms(e.p99_ms)}`))
        )
      );
    }
    for (const n of nodes) {
      const p = place.get(n.service);
      const registered = instances && instances[n.service] ? instances[n.service].length : null;
      const count = registered !== null ? registered : (n.instances || []).length;
      const group = svg(
        "g",
        {
          class: `node${n.instrumented ? "" : " external"}${n.error_ratio >= 0.05 ? " bad" : ""}`,
          "data-node": n.service,
          transform: `translate(${p.x},${p.y})`,
          tabindex: 0,
          role: "link",
        },
        svg("rect", { width: W, height: H, rx: 8 }),
        svg("rect", { width: 6, height: H, rx: 3, style: `fill:${ui.colour(n.service)}` }),
        svg("text", { x: 16, y: 22, class: "node-name" }, n.service),
        svg(
          "text",
          { x: 16, y: 42, class: "node-detail" },
          n.instrumented
            ? `${count} instance${count === 1 ? "" : "s"} · ${fmt.rate(n.rate)}`
            : "no spans (a dependency)"
        ),
        n.instrumented
          ? svg("text", { x: 16, y: 57, class: "node-detail" }, `err ${fmt.pct(n.error_ratio)} · p99 ${fmt.ms(n.p99_ms)}`)
          : null
      );
      if (n.instrumented) {
        const open = () => ui.go("service", n.service);
        group.addEventListener("click", open);
        group.addEventListener("keydown", (event) => event.key === "Enter" && open());
      }
      root.append(group);
    }
    return root;
  }

  ui.registerPage({
    name: "map",
    title: "Map",
    async render(root) {
      const holder = el("div", { class: "map-holder" });
      root.append(el("h2", { text: "System map" }), holder);
      async function refresh() {
        const [data, instances] = await Promise.all([
          api(`${OBS}/map?window=${ui.window()}`),
          registryInstances(),
        ]);
        if (!data.nodes.length) {
          holder.replaceChildren(
            empty("No spans in this window yet. Send requests through the gateway; services export to this control plane's OTLP receiver.")
          );
          return;
        }
        holder.replaceChildren(
          mapSvg(data, instances),
          el("p", { class: "muted", text: "Each edge: calls per second · error ratio · p99 latency, from spans in the window." })
        );
      }
      await refresh();
      return refresh;
    },
  });

  // -- services and their RED charts

  function chart(points, key, title, format) {
    const W = 340;
    const H = 120;
    const P = 28;
    const values = points.map((p) => p[key] || 0);
    const max = Math.max(...values, 0) || 1;
    const step = points.length > 1 ? (W - 2 * P) / (points.length - 1) : 0;
    const coords = values.map((v, i) => `${P + i * step},${H - P - ((H - 2 * P) * v) / max}`);
    return el(
      "figure",
      { class: "chart", "data-chart": key },
      el("figcaption", { text: title }),
      svg(
        "svg",
        { viewBox: `0 0 ${W} ${H}`, width: W, height: H, role: "img", "aria-label": title },
        svg("line", { x1: P, y1: H - P, x2: W - P, y2: H - P, class: "axis" }),
        svg("line", { x1: P, y1: P, x2: P, y2: H - P, class: "axis" }),
        svg("text", { x: P - 4, y: P + 4, "text-anchor": "end", class: "tick" }, format(max)),
        svg("text", { x: P - 4, y: H - P, "text-anchor": "end", class: "tick" }, format(0)),
        points.length
          ? svg("text", { x: W - P, y: H - 8, "text-anchor": "end", class: "tick" }, new Date(points[points.length - 1].time * 1000).toLocaleTimeString([], { hour12: false }))
          : null,
        svg("polyline", { points: coords.join(" "), class: "line" })
      )
    );
  }

  ui.registerPage({
    name: "services",
    title: "Services",
    async render(root) {
      const holder = el("div");
      root.append(el("h2", { text: "Services" }), holder);
      async function refresh() {
        const data = await api(`${OBS}/services?window=${ui.window()}`);
        if (!data.services.length) {
          holder.replaceChildren(empty("No requests served in this window."));
          return;
        }
        holder.replaceChildren(
          table(
            ["service", "rate", "errors", "p50", "p99", "instances"],
            data.services.map((s) =>
              el(
                "tr",
                { "data-service": s.service },
                el("td", {}, dot(s.service), el("a", { href: `#/service/${encodeURIComponent(s.service)}`, text: s.service })),
                el("td", { text: fmt.rate(s.rate) }),
                el("td", { class: s.error_ratio >= 0.05 ? "bad" : "" , text: `${s.errors} (${fmt.pct(s.error_ratio)})` }),
                el("td", { text: fmt.ms(s.p50_ms) }),
                el("td", { text: fmt.ms(s.p99_ms) }),
                el("td", { text: s.instances.length })
              )
            )
          )
        );
      }
      await refresh();
      return refresh;
    },
  });

  ui.registerPage({
    name: "service",
    title: "Service",
    nav: false,
    section: "services",
    async render(root, _ui, name) {
      const charts = el("div", { class: "charts" });
      const health = el("div");
      root.append(
        el("h2", {}, dot(name), name),
        el("p", {}, el("a", { href: `#/traces?service=${encodeURIComponent(name)}`, text: "its traces" }), " · ",
          el("a", { href: `#/logs?service=${encodeURIComponent(name)}`, text: "its logs" })),
        charts,
        el("h3", { text: "Instances" }),
        health
      );
      async function refresh() {
        const windowText = ui.window();
        const seconds = { "1m": 60, "5m": 300, "15m": 900, "1h": 3600 }[windowText] || 300;
        const step = `${Math.max(Math.round(seconds / 30), 1)}s`;
        const [data, instances] = await Promise.all([
          api(`${OBS}/services?window=${windowText}&step=${step}&service=${encodeURIComponent(name)}`),
          registryInstances(),
        ]);
        const entry = data.services[0];
        const series = entry ? entry.series : [];
        charts.replaceChildren(
          chart(series, "rate", "requests per second", fmt.rate),
          chart(series, "error_ratio", "error ratio", fmt.pct),
          chart(series, "p99_ms", "p99 duration", fmt.ms)
        );
        const spanStats = new Map((entry ? entry.instances : []).map((i) => [i.instance, i]));
        const registered = instances && instances[name] ? instances[name] : [];
        const rows = registered.map((inst) => {
          const stats = spanStats.get(inst.id) || null;
          spanStats.delete(inst.id);
          const age = (Date.now() - Date.parse(inst.last_heartbeat)) / 1000;
          const ok = age <= inst.ttl;
          return el(
            "tr",
            { "data-instance": inst.id },
            el("td", { text: inst.id }),
            el("td", { text: inst.address }),
            el("td", {}, badge(ok ? "up" : "late", ok ? "ok" : "bad"), ` heartbeat ${age.toFixed(0)} s ago`),
            el("td", { text: stats ? fmt.rate(stats.rate) : "–" }),
            el("td", { text: stats ? fmt.pct(stats.error_ratio) : "–" }),
            el("td", { text: stats ? fmt.ms(stats.p99_ms) : "–" })
          );
        });
        for (const [id, stats] of spanStats) {
          rows.push(
            el(
              "tr",
              { "data-instance": id },
              el("td", { text: id }),
              el("td", { text: "–" }),
              el("td", {}, badge("not registered", "")),
              el("td", { text: fmt.rate(stats.rate) }),
              el("td", { text: fmt.pct(stats.error_ratio) }),
              el("td", { text: fmt.ms(stats.p99_ms) })
            )
          );
        }
        health.replaceChildren(
          rows.length ? table(["instance", "address", "health", "rate", "errors", "p99"], rows) : empty("No instances.")
        );
      }
      await refresh();
      return refresh;
    },
  });

  // -- traces

  ui.registerPage({
    name: "traces",
    title: "Traces",
    async render(root, _ui, _arg, query) {
      const known = await api(`${OBS}/services?window=1h`);
      const service = el("select", { name: "service" }, el("option", { value: "", text: "any service" }),
        known.known.map((s) => el("option", { value: s, text: s, selected: query.get("service") === s })));
      const slow = el("input", { name: "slow", placeholder: "slower than, e.g. 200ms", value: query.get("slow") || "" });
      const errors = el("input", { type: "checkbox", name: "errors", checked: query.get("errors") === "true" });
      const limit = el("input", { name: "limit", type: "number", min: 1, max: 1000, value: query.get("limit") || 50 });
      const results = el("div", { id: "trace-results" });
      const form = el(
        "form",
        { class: "filters", onsubmit: (event) => { event.preventDefault(); refresh(); } },
        service, slow, el("label", {}, errors, " errors only"), el("label", {}, "limit ", limit),
        el("button", { type: "submit", text: "Search" })
      );
      root.append(el("h2", { text: "Traces" }), form, results);
      async function refresh() {
        const params = new URLSearchParams({ limit: limit.value || "50" });
        if (service.value) params.set("service", service.value);
        if (slow.value.trim()) params.set("slow", slow.value.trim());
        if (errors.checked) params.set("errors", "true");
        let data;
        try {
          data = await api(`${OBS}/traces?${params}`);
        } catch (error) {
          results.replaceChildren(el("p", { class: "error", role: "alert", text: error.message }));
          return;
        }
        if (!data.traces.length) {
          results.replaceChildren(empty("No trace matches."));
          return;
        }
        const longest = Math.max(...data.traces.map((t) => t.duration_ms), 1);
        results.replaceChildren(
          table(
            ["started", "root", "duration", "spans", "services", ""],
            data.traces.map((t) =>
              el(
                "tr",
                { class: t.error ? "bad-row" : "", "data-trace-id": t.trace_id },
                el("td", { text: fmt.time(t.start_ns) }),
                el("td", {}, el("a", { href: `#/trace/${t.trace_id}`, class: "trace-link", text: `${t.root_service}: ${t.root_name}` })),
                el("td", { class: "duration" },
                  el("span", { class: "bar", style: `width:${Math.max((100 * t.duration_ms) / longest, 1)}%` }),
                  el("span", { text: fmt.ms(t.duration_ms) })),
                el("td", { text: t.spans }),
                el("td", {}, t.services.map((s) => el("span", { class: "svc" }, dot(s), s))),
                el("td", {}, t.error ? badge(`${t.errors} error${t.errors === 1 ? "" : "s"}`, "bad") : null)
              )
            ),
            { class: "traces" }
          )
        );
      }
      await refresh();
      return refresh;
    },
  });

  function attributesTable(span) {
    const rows = Object.entries(span.attributes || {}).map(([k, v]) =>
      el("tr", {}, el("th", { text: k }), el("td", { text: typeof v === "string" ? v : JSON.stringify(v) }))
    );
    for (const event of span.events || []) {
      rows.push(el("tr", {}, el("th", { text: `event: ${event.name}` }), el("td", { text: JSON.stringify(event.attributes) })));
    }
    return el(
      "div",
      { class: "span-detail" },
      el("h4", { text: `${span.service}: ${span.name}` }),
      el("p", { class: "muted", text: `${span.kind} · ${fmt.ms(span.duration_ms)} · status ${span.status}${span.status_message ? `: ${span.status_message}` : ""} · instance ${span.instance || "?"} · span ${span.span_id}` }),
      rows.length ? el("table", { class: "kv" }, el("tbody", {}, rows)) : empty("No attributes.")
    );
  }

  ui.registerPage({
    name: "trace",
    title: "Trace",
    nav: false,
    section: "traces",
    async render(root, _ui, traceId) {
      const data = await api(`${OBS}/traces/${encodeURIComponent(traceId || "")}`);
      const detail = el("div", { class: "detail-holder" });
      const rows = [];
      const total = Math.max(data.duration_ms, 0.001);
      function walk(nodes) {
        for (const span of nodes) {
          const left = (100 * span.offset_ms) / total;
          const width = Math.max((100 * span.duration_ms) / total, 0.3);
          const row = el(
            "div",
            { class: `wf-row${span.error ? " bad" : ""}`, "data-span-id": span.span_id, tabindex: 0, role: "button" },
            el("div", { class: "wf-label", style: `padding-left:${span.depth * 14}px` }, dot(span.service),
              el("span", { class: "wf-service", text: span.service }), " ", el("span", { text: span.name })),
            el("div", { class: "wf-track" },
              el("div", { class: "wf-bar", style: `left:${left}%;width:${width}%;background:${ui.colour(span.service)}` }),
              // After the bar while it fits, else inside its right end.
              left + width <= 85
                ? el("span", { class: "wf-time", style: `left:${left + width}%`, text: fmt.ms(span.duration_ms) })
                : el("span", { class: "wf-time inside", style: `right:${100 - left - width}%`, text: fmt.ms(span.duration_ms) }))
          );
          const open = () => {
            for (const r of document.querySelectorAll(".wf-row.selected")) r.classList.remove("selected");
            row.classList.add("selected");
            detail.replaceChildren(attributesTable(span));
          };
          row.addEventListener("click", open);
          row.addEventListener("keydown", (event) => event.key === "Enter" && open());
          rows.push(row);
          walk(span.children);
        }
      }
      walk(data.spans);
      const shares = data.services.map((s) =>
        el("span", { class: "svc" }, dot(s.service), `${s.service} ${fmt.ms(s.self_ms)} (${fmt.pct(s.share)})`)
      );
      const logs = el("div");
      root.append(
        el("h2", { text: `Trace ${data.trace_id}` }),
        el("p", {}, `${fmt.ms(data.duration_ms)} · ${data.span_count} spans · started ${fmt.time(data.start_ns)} `,
          data.error ? badge("error", "bad") : badge("ok", "ok")),
        el("p", { class: "shares" }, el("strong", { text: "self time: " }), shares),
        el("div", { class: "waterfall", "data-trace-id": data.trace_id }, rows),
        detail,
        el("h3", { text: "Logs of this trace" }),
        logs
      );
      const records = await api(`${OBS}/logs?trace_id=${data.trace_id}&limit=500`);
      logs.replaceChildren(records.logs.length ? logTable(records.logs.slice().reverse()) : empty("No log records carry this trace id."));
    },
  });

  // -- logs

  function logTable(records) {
    return table(
      ["time", "level", "service", "message", "trace"],
      records.map((r) =>
        el(
          "tr",
          { class: `level-${r.level}` },
          el("td", { text: fmt.time(r.time_ns) }),
          el("td", {}, badge(r.level, r.level === "error" || r.level === "fatal" ? "bad" : r.level === "warn" ? "warn" : "")),
          el("td", {}, dot(r.service), r.service),
          el("td", { class: "message", text: typeof r.body === "string" ? r.body : JSON.stringify(r.body) }),
          el("td", {}, r.trace_id ? el("a", { href: `#/trace/${r.trace_id}`, text: r.trace_id.slice(0, 8) }) : "")
        )
      ),
      { class: "logs" }
    );
  }

  ui.registerPage({
    name: "logs",
    title: "Logs",
    async render(root, _ui, _arg, query) {
      const known = await api(`${OBS}/services?window=1h`);
      const service = el("select", { name: "service" }, el("option", { value: "", text: "any service" }),
        known.known.map((s) => el("option", { value: s, text: s, selected: query.get("service") === s })));
      const level = el("select", { name: "level" },
        ["", "debug", "info", "warn", "error"].map((l) => el("option", { value: l, text: l ? `${l} and above` : "any level", selected: query.get("level") === l })));
      const traceId = el("input", { name: "trace_id", placeholder: "trace id", value: query.get("trace_id") || "", size: 34 });
      const text = el("input", { name: "q", placeholder: "text", value: query.get("q") || "" });
      const results = el("div");
      root.append(
        el("h2", { text: "Logs" }),
        el("form", { class: "filters", onsubmit: (event) => { event.preventDefault(); refresh(); } },
          service, level, traceId, text, el("button", { type: "submit", text: "Filter" })),
        results
      );
      async function refresh() {
        const params = new URLSearchParams({ limit: "300" });
        if (service.value) params.set("service", service.value);
        if (level.value) params.set("level", level.value);
        if (traceId.value.trim()) params.set("trace_id", traceId.value.trim());
        if (text.value.trim()) params.set("q", text.value.trim());
        try {
          const data = await api(`${OBS}/logs?${params}`);
          results.replaceChildren(data.logs.length ? logTable(data.logs) : empty("No log record matches."));
        } catch (error) {
          results.replaceChildren(el("p", { class: "error", role: "alert", text: error.message }));
        }
      }
      await refresh();
      return refresh;
    },
  });

  // -- registry instances

  ui.registerPage({
    name: "instances",
    title: "Instances",
    async render(root) {
      const holder = el("div");
      root.append(el("h2", { text: "Registry instances" }), holder);
      async function refresh() {
        const services = await registryInstances();
        if (services === null) {
          holder.replaceChildren(empty("This gateway runs without a registry (gateway.registry.enabled: false)."));
          return;
        }
        const rows = [];
        for (const [name, instances] of Object.entries(services)) {
          for (const inst of instances) {
            const age = (Date.now() - Date.parse(inst.last_heartbeat)) / 1000;
            rows.push(
              el(
                "tr",
                { "data-instance": inst.id },
                el("td", {}, dot(name), el("a", { href: `#/service/${encodeURIComponent(name)}`, text: name })),
                el("td", { text: inst.id }),
                el("td", { text: inst.address }),
                el("td", { text: inst.version || "–" }),
                el("td", { text: inst.zone || "–" }),
                el("td", {}, badge(age <= inst.ttl ? "up" : "late", age <= inst.ttl ? "ok" : "bad"), ` ${age.toFixed(0)} s ago (ttl ${inst.ttl} s)`)
              )
            );
          }
        }
        holder.replaceChildren(
          rows.length ? table(["service", "instance", "address", "version", "zone", "heartbeat"], rows) : empty("No instance is registered.")
        );
      }
      await refresh();
      return refresh;
    },
  });

  // -- the gateway: routes, upstream health, breakers, retry budget

  function parseMetrics(text) {
    const out = [];
    for (const line of text.split("\n")) {
      if (!line || line.startsWith("#")) continue;
      const match = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)/.exec(line);
      if (!match) continue;
      const labels = {};
      for (const pair of (match[3] || "").matchAll(/([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"/g)) {
        labels[pair[1]] = pair[2];
      }
      out.push({ name: match[1], labels, value: Number(match[4]) });
    }
    return out;
  }

  function sumBy(samples, name, key) {
    const totals = new Map();
    for (const s of samples) {
      if (s.name !== name) continue;
      const k = s.labels[key] || "";
      totals.set(k, (totals.get(k) || 0) + s.value);
    }
    return totals;
  }

  ui.registerPage({
    name: "gateway",
    title: "Gateway",
    async render(root) {
      const holder = el("div");
      root.append(el("h2", { text: "Gateway" }), holder);
      async function refresh() {
        const [status, config, upstreams, metricsText] = await Promise.all([
          api("/status"),
          api("/config"),
          api("/upstreams"),
          fetch("/metrics", { credentials: "same-origin" }).then((r) => (r.ok ? r.text() : "")),
        ]);
        const samples = parseMetrics(metricsText);
        const retries = sumBy(samples, "meshgate_gateway_retries_total", "upstream");
        const exhausted = sumBy(samples, "meshgate_gateway_retry_budget_exhausted_total", "upstream");
        const requests = sumBy(samples, "meshgate_gateway_requests_total", "route");
        const routeRows = (config.routes || []).map((r) =>
          el(
            "tr",
            { "data-route": r.name },
            el("td", { text: r.name }),
            el("td", { text: Object.entries(r.match || {}).filter(([, v]) => v !== null && !(Array.isArray(v) && !v.length) && !(typeof v === "object" && v && !Array.isArray(v) && !Object.keys(v).length)).map(([k, v]) => `${k}: ${typeof v === "string" ? v : JSON.stringify(v)}`).join(", ") }),
            el("td", { text: r.service ? `service ${r.service}` : r.upstream }),
            el("td", { text: requests.get(r.name) || 0 })
          )
        );
        const upstreamBlocks = Object.entries(upstreams.upstreams || {}).map(([name, up]) => {
          const circuit = up.circuit && up.circuit.length ? up.circuit.join(", ") : "none";
          const open = (up.circuit || []).includes("open");
          const endpointRows = Object.entries(up.endpoints || {}).map(([label, e]) => {
            const state = e.drained ? ["drained", "warn"] : !e.healthy ? ["unhealthy", "bad"] : e.ejected_in_workers ? ["ejected", "bad"] : e.available ? ["healthy", "ok"] : ["unavailable", "bad"];
            return el(
              "tr",
              { "data-endpoint": label },
              el("td", { text: label }),
              el("td", {}, badge(state[0], state[1])),
              el("td", { text: e.inflight }),
              el("td", { text: `${e.open_connections} (${e.idle_connections} idle)` }),
              el("td", { text: fmt.ms(e.ewma_ms) }),
              el("td", { class: "muted", text: e.last_check_error || "" })
            );
          });
          return el(
            "section",
            { class: "upstream", "data-upstream": name },
            el("h4", {}, name, up.service ? ` (service ${up.service})` : "", " ", badge(`breaker ${circuit}`, open ? "bad" : "ok")),
            el("p", { class: "muted", text: `balancer ${up.balancer} · retries ${retries.get(name) || 0} · retries refused by the budget ${exhausted.get(name) || 0}${up.retry_budget !== undefined ? ` · budget left ${up.retry_budget}` : ""}` }),
            endpointRows.length
              ? table(["endpoint", "state", "in flight", "connections", "latency (EWMA)", "last check"], endpointRows)
              : empty("No endpoints.")
          );
        });
        const workers = status.workers || [];
        holder.replaceChildren(
          el("p", { class: "muted", text: `listening on ${status.listen} · up ${Math.round(status.uptime_seconds)} s · ${workers.filter((w) => w.alive).length}/${workers.length} workers alive · ${status.reloads} reloads${status.last_reload_error ? ` · last reload failed: ${status.last_reload_error}` : ""}` }),
          el("h3", { text: "Routes" }),
          routeRows.length ? table(["route", "match", "to", "requests"], routeRows) : empty("No routes."),
          el("h3", { text: "Upstreams" }),
          ...upstreamBlocks
        );
      }
      await refresh();
      return refresh;
    },
  });

  // Sagas and dead letters arrive with the events work: a page registered with
  // MeshgateUI.registerPage from a DashboardPage script (see dashboard.py).
})(window.MeshgateUI);
