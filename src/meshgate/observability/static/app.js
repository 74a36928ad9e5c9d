// meshgate dashboard: the page shell. Pages plug in with MeshgateUI.registerPage
// ({name, title, nav, render(root, ui, arg, query)}); render may return a function
// that the shell calls again on live updates to refresh what the page shows.
//
// Every value shown comes from telemetry that any process may send, so text is
// only ever set with textContent and attributes with setAttribute: never as markup.
"use strict";

(function () {
  const pages = [];
  const byName = new Map();
  const SVG = "http://www.w3.org/2000/svg";
  let current = null; // {name, arg, query, refresh}
  let lastVersion = -1;
  let lastRender = 0;

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    return fill(node, attrs, children);
  }

  function svg(tag, attrs, ...children) {
    const node = document.createElementNS(SVG, tag);
    return fill(node, attrs, children);
  }

  function fill(node, attrs, children) {
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (key === "text") node.textContent = String(value);
      else if (key === "style") {
        // Through the CSSOM: the page's policy refuses style attributes.
        for (const declaration of String(value).split(";")) {
          const at = declaration.indexOf(":");
          if (at > 0) node.style.setProperty(declaration.slice(0, at).trim(), declaration.slice(at + 1).trim());
        }
      }
      else if (key.startsWith("on") && typeof value === "function") {
        node.addEventListener(key.slice(2), value);
      } else node.setAttribute(key, value === true ? "" : String(value));
    }
    for (const child of children.flat()) {
      if (child === null || child === undefined || child === false) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  class ApiError extends Error {
    constructor(status, detail) {
      super(detail);
      this.status = status;
    }
  }

  async function api(path, options) {
    const response = await fetch(path, {
      credentials: "same-origin",
      headers: { Accept: "application/json" },
      ...(options || {}),
    });
    if (response.status === 401) {
      window.location.assign("/ui/login");
      throw new ApiError(401, "logged out");
    }
    const type = response.headers.get("content-type") || "";
    const body = type.includes("json") ? await response.json() : await response.text();
    if (!response.ok) {
      const detail = body && body.detail ? body.detail : `HTTP ${response.status}`;
      throw new ApiError(response.status, typeof detail === "string" ? detail : JSON.stringify(detail));
    }
    return body;
  }

  function ms(value) {
    if (value === null || value === undefined) return "–";
    if (value >= 1000) return `${(value / 1000).toFixed(2)} s`;
    if (value >= 10) return `${value.toFixed(0)} ms`;
    return `${value.toFixed(1)} ms`;
  }

  function rate(value) {
    if (!value) return "0/s";
    return value >= 10 ? `${value.toFixed(0)}/s` : `${value.toFixed(2)}/s`;
  }

  function pct(value) {
    return `${((value || 0) * 100).toFixed(1)} %`;
  }

  function time(ns) {
    const date = new Date(Number(ns) / 1e6);
    return date.toLocaleTimeString([], { hour12: false }) + "." + String(date.getMilliseconds()).padStart(3, "0");
  }

  function colour(name) {
    let hash = 0;
    for (const ch of String(name)) hash = (hash * 31 + ch.codePointAt(0)) >>> 0;
    return `hsl(${hash % 360}, 60%, 55%)`;
  }

  function windowValue() {
    return document.getElementById("window").value;
  }

  function parseHash() {
    const raw = window.location.hash.replace(/^#\/?/, "");
    const [path, search] = raw.split("?");
    const [name, ...rest] = (path || "").split("/");
    return {
      name: name || "map",
      arg: rest.length ? decodeURIComponent(rest.join("/")) : null,
      query: new URLSearchParams(search || ""),
    };
  }

  function go(name, arg, query) {
    let hash = `#/${name}`;
    if (arg) hash += `/${encodeURIComponent(arg)}`;
    const search = query ? new URLSearchParams(query).toString() : "";
    if (search) hash += `?${search}`;
    if (window.location.hash === hash) render();
    else window.location.hash = hash;
  }

  function registerPage(page) {
    if (!page || !page.name || typeof page.render !== "function") {
      throw new Error("registerPage needs {name, title, render}");
    }
    if (byName.has(page.name)) throw new Error(`page ${page.name} is registered twice`);
    pages.push(page);
    byName.set(page.name, page);
    buildNav();
    if (current === null || current.name === page.name) scheduleRender();
  }

  function buildNav() {
    const nav = document.getElementById("nav");
    if (!nav) return;
    nav.replaceChildren(
      ...pages
        .filter((p) => p.nav !== false)
        .map((p) => el("a", { href: `#/${p.name}`, "data-page": p.name, text: p.title || p.name }))
    );
    markNav();
  }

  function markNav() {
    const active = current ? (byName.get(current.name) || {}).section || current.name : null;
    for (const link of document.querySelectorAll("#nav a")) {
      link.classList.toggle("active", link.dataset.page === active);
    }
  }

  function showError(root, error) {
    root.replaceChildren(el("p", { class: "error", role: "alert", text: error.message || String(error) }));
  }

  let pending = false;
  function scheduleRender() {
    if (pending) return;
    pending = true;
    queueMicrotask(() => {
      pending = false;
      render();
    });
  }

  async function render() {
    const root = document.getElementById("app");
    const { name, arg, query } = parseHash();
    const page = byName.get(name);
    current = { name, arg, query, refresh: null };
    markNav();
    if (!page) {
      root.replaceChildren(el("p", { class: "muted", text: `loading ${name}…` }));
      return;
    }
    const mine = current;
    root.replaceChildren();
    root.dataset.page = name;
    try {
      const refresh = await page.render(root, ui, arg, query);
      if (current === mine && typeof refresh === "function") mine.refresh = refresh;
      stamp();
    } catch (error) {
      if (current === mine) showError(root, error);
    }
  }

  function stamp() {
    lastRender = Date.now();
    const node = document.getElementById("updated");
    if (node) node.textContent = `updated ${new Date().toLocaleTimeString([], { hour12: false })}`;
  }

  async function poll() {
    const live = document.getElementById("live");
    if (!live || !live.checked || document.hidden || !current || !current.refresh) return;
    try {
      const stats = await api("/v1/observability/stats");
      // New telemetry, or gateway state that may have changed (every 10 s).
      if (stats.version !== lastVersion || Date.now() - lastRender > 10000) {
        lastVersion = stats.version;
        await current.refresh();
        stamp();
      }
    } catch (error) {
      // A failed poll is retried on the next tick; the page keeps what it shows.
    }
  }

  async function loadExtensions() {
    let list = [];
    try {
      list = await api("/ui/pages.json");
    } catch (error) {
      return;
    }
    for (const page of list) {
      document.body.append(el("script", { src: page.script }));
    }
  }

  const ui = {
    registerPage,
    api,
    ApiError,
    el,
    svg,
    go,
    fmt: { ms, rate, pct, time },
    colour,
    window: windowValue,
    pages: () => pages.slice(),
  };
  window.MeshgateUI = ui;

  window.addEventListener("hashchange", render);
  document.addEventListener("DOMContentLoaded", () => {
    buildNav();
    document.getElementById("window").addEventListener("change", render);
    if (!window.location.hash) window.location.replace("#/map");
    render();
    loadExtensions();
    setInterval(poll, 3000);
  });
})();
