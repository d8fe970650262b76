// The dashboard: reads GET /v1/tokens/stats with the caller's bearer token and draws it.
//
// The token comes from the URL fragment (#token=..., which browsers never send to a
// server) or the sign-in box, lives in this tab's sessionStorage, and is only ever sent in
// the Authorization header. Everything the API returns is written as text, never as HTML.
"use strict";

(() => {
  const KEY = "gateway-token";
  // Relative to /dashboard, so they name the gateway that served the page, under any prefix.
  const STATS = "v1/tokens/stats";
  const CHECKOUT = "v1/billing/checkout";
  const EXPIRED = "Your session has expired or the token is invalid. Paste a new token.";
  const DOWN = "Can't reach the gateway. Check your connection and try again.";
  const WARN_AT = 0.8;
  const CHART_DAYS = 31;
  const DAY_MS = 86400000;

  let current = null; // the stats last drawn, null when nothing is on screen

  // -- helpers -----------------------------------------------------------------------------

  const $ = (id) => document.getElementById(id);

  /** An element with attributes (class, data-*, aria-*, ...) and text or element children. */
  function h(tag, attrs, ...children) {
    const el = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (name === "class") el.className = value;
      else el.setAttribute(name, value === true ? "" : String(value));
    }
    for (const child of children.flat()) {
      if (child === null || child === undefined || child === false) continue;
      el.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return el;
  }

  function show(el, on) { el.classList.toggle("hidden", !on); }

  const fmt = (n) => Number(n || 0).toLocaleString("en-US");
  const rate = (n) => (n < 10 ? Number(n).toFixed(1).replace(/\.0$/, "") : fmt(Math.round(n)));
  const percent = (fraction) => `${Math.floor(fraction * 100 + 1e-9)}%`;
  const label = (name) => name.replace(/_/g, " ");
  const title = (name) => label(name).replace(/^./, (c) => c.toUpperCase());
  const plural = (n, one, many) => `${fmt(n)} ${n === 1 ? one : many}`;

  function day(iso, withYear = true) {
    if (!iso) return "";
    const options = {month: "short", day: "numeric"};
    if (withYear) options.year = "numeric";
    return new Date(iso).toLocaleDateString("en-US", options);
  }

  /** A "YYYY-MM-DD" (a UTC day, as the API counts them) as "Nov 21". */
  const utcDay = (key) => new Date(`${key}T00:00:00Z`).toLocaleDateString(
    "en-US", {month: "short", day: "numeric", timeZone: "UTC"});

  /** ``value`` as an absolute http(s) address, or null: never a javascript: URL. */
  function webAddress(value) {
    if (typeof value !== "string" || !value) return null;
    try {
      const url = new URL(value, location.href);
      return url.protocol === "https:" || url.protocol === "http:" ? url.href : null;
    } catch (e) {
      return null;
    }
  }

  function relativeDays(iso, now) {
    const days = Math.ceil((new Date(iso) - now) / DAY_MS);
    if (days <= 0) return "today";
    return days === 1 ? "tomorrow" : `in ${days} days`;
  }

  // -- the token ---------------------------------------------------------------------------

  function takeTokenFromFragment() {
    const match = location.hash.match(/(?:^#|&)token=([^&]*)/);
    if (!match) return;
    let token = match[1];
    try { token = decodeURIComponent(token); } catch (e) { /* keep it as it came */ }
    if (token.trim()) sessionStorage.setItem(KEY, token.trim());
    history.replaceState(null, "", location.pathname + location.search); // off the address bar
  }

  const storedToken = () => sessionStorage.getItem(KEY);

  function forget() {
    sessionStorage.removeItem(KEY);
    current = null;
  }

  // -- talking to the gateway --------------------------------------------------------------

  class ApiError extends Error {
    constructor(message, {expired = false} = {}) {
      super(message);
      this.expired = expired;
    }
  }

  /** The answer's JSON; throws an ApiError whose message is fit to show as it is. */
  async function api(path, options = {}) {
    let resp;
    try {
      resp = await fetch(path, {
        ...options,
        cache: "no-store",
        credentials: "omit",
        headers: {...(options.headers || {}), Authorization: `Bearer ${storedToken()}`},
      });
    } catch (e) {
      throw new ApiError(DOWN);
    }
    if (resp.status === 401) throw new ApiError(EXPIRED, {expired: true});
    let body = null;
    try { body = await resp.json(); } catch (e) { /* not JSON */ }
    if (resp.ok && body) return body;
    if (body && body.detail) throw new ApiError(body.detail);
    // A proxy in front of a gateway that is down answers 502-504 without a problem body.
    if (resp.status >= 502 && resp.status <= 504) throw new ApiError(DOWN);
    throw new ApiError(`The gateway answered ${resp.status} ${resp.statusText}`.trim() + ".");
  }

  // -- views -------------------------------------------------------------------------------

  function error(message) {
    $("error").textContent = message || "";
    show($("error"), !!message);
  }

  /** One of "signin", "loading", "dashboard", or "unavailable" (just the error and the
   * refresh button: signed in, nothing to show yet). */
  function view(name) {
    for (const id of ["signin", "loading", "dashboard"]) show($(id), id === name);
    const signedIn = name !== "signin";
    show($("refresh"), signedIn);
    show($("signout"), signedIn);
    show($("account"), name === "dashboard");
    if (name !== "dashboard") show($("buy"), false);
    if (name === "signin") $("token-input").focus();
  }

  function busy(on) {
    $("refresh").disabled = on;
    $("refresh").classList.toggle("busy", on);
  }

  async function load() {
    if (!storedToken()) {
      view("signin");
      return;
    }
    if (!current) view("loading");
    busy(true);
    try {
      render(await api(STATS));
    } catch (e) {
      if (e.expired) {
        forget();
        view("signin");
      } else if (!current) {
        view("unavailable");
      } // else: the last numbers stay on screen under the error
      error(e.message);
    } finally {
      busy(false);
    }
  }

  // -- drawing the stats -------------------------------------------------------------------

  function render(s) {
    current = s;
    error("");
    view("dashboard");
    const now = new Date(s.generated_at);
    const types = Object.entries(s.token_types || {});
    const planned = types.filter(([, t]) => t.allocated > 0);
    const features = s.features || [];

    $("who").textContent = s.organization;
    $("plan").textContent = s.plan;
    document.title = `Usage · ${s.organization} · AI credits`;
    const starts = types.map(([, t]) => t.period_start).filter(Boolean).sort();
    const ends = planned.map(([, t]) => t.refresh_at).filter(Boolean).sort();
    $("period").textContent = starts.length && ends.length
      ? `${title(s.plan)} plan · this period ${day(starts[0], false)} – ${day(ends[0])}`
      : `${title(s.plan)} plan`;
    $("updated").textContent = `Updated ${now.toLocaleTimeString("en-US", {hour: "numeric", minute: "2-digit"})}`;
    $("updated").title = now.toLocaleString("en-US");

    const canBuy = !!(s.billing && s.billing.checkout && (s.billing.packs || []).length);
    show($("buy"), canBuy);

    show($("upgrade"), planned.length === 0 && !!s.upgrade_to);
    $("upgrade-current").textContent = s.plan;
    $("upgrade-plan").textContent = s.upgrade_to || "";
    const plans = webAddress(s.upgrade_url); // optional: where the operator sells plans
    show($("upgrade-link"), !!plans);
    if (plans) $("upgrade-link").href = plans;
    show($("upgrade-buy"), canBuy);
    show($("upgrade-actions"), !!plans || canBuy);

    $("warnings").replaceChildren(...planned
      .filter(([, t]) => t.used_fraction >= WARN_AT)
      .map(([name, t]) => warning(name, t, canBuy)));

    // Nothing to show but the upgrade call: no empty charts and tables under it.
    const nothing = types.length === 0 && features.length === 0;
    show($("usage"), !nothing);
    show($("no-balances"), nothing && !s.upgrade_to);

    $("total-used").textContent = fmt(types.reduce((sum, [, t]) => sum + t.used, 0));
    $("total-requests").textContent = fmt(features.reduce((sum, f) => sum + f.requests, 0));
    $("next-refresh").textContent = ends.length ? day(ends[0]) : "—";
    $("next-refresh-in").textContent = ends.length ? relativeDays(ends[0], now) : "No allowance in this plan";

    $("balances").replaceChildren(...types.map(([name, t]) => card(name, t)));
    chart(s.daily || [], starts[0], now);
    rows($("features"), features.map((f) => h("tr", {"data-route": f.route || ""},
      h("td", {class: "feature"}, f.route || "Other"),
      h("td", {class: "opt token-type"}, label(f.token_type)),
      h("td", {class: "num tokens"}, fmt(f.tokens)),
      h("td", {class: "num requests"}, fmt(f.requests)))), 4);
    rows($("users"), (s.users || []).map((u) => h("tr", {"data-user": u.user || ""},
      h("td", {class: "user"}, u.user || "—"),
      h("td", {class: "num tokens"}, fmt(u.tokens)),
      h("td", {class: "num requests"}, fmt(u.requests)))), 3);
  }

  function warning(name, t, canBuy) {
    const used = `You have used ${percent(t.used_fraction)} of your ${label(name)} tokens this period`;
    const refresh = `the refresh on ${day(t.refresh_at)}`;
    let headline, text;
    if (t.used_fraction < 1) {
      headline = "Running low.";
      text = `${used}: ${plural(t.available, "token", "tokens")} left until ${refresh}.`;
    } else if (t.available > 0) {
      headline = "Allowance used up.";
      text = `${used}: ${plural(t.available, "purchased token", "purchased tokens")} left.`;
    } else {
      headline = "Out of tokens.";
      text = `${used}. ${canBuy ? "Buy a token pack or wait" : "Wait"} for ${refresh}.`;
    }
    const out = t.used_fraction >= 1 && t.available <= 0;
    return h("div", {class: `notice ${out ? "error" : "warn"} low-balance`, role: "status", "data-token-type": name},
      h("span", null, h("strong", null, headline), " ", text));
  }

  function card(name, t) {
    const allocated = t.allocated > 0;
    const fraction = allocated ? Math.min(1, t.used / t.allocated) : 0;
    const f = t.forecast || {};
    const state = !allocated ? "none" : t.used_fraction >= 1 ? "out" : t.used_fraction >= WARN_AT ? "low" : "ok";
    const pill = f.before_refresh && state === "ok"
      ? h("span", {class: "pill risk"}, "At risk")
      : h("span", {class: "pill"}, {
        none: "Not in plan", out: t.available > 0 ? "On purchased" : "Used up", low: "Running low", ok: "Healthy",
      }[state]);
    const bar = h("div");
    bar.style.width = `${(fraction * 100).toFixed(1)}%`; // CSSOM, which the page's CSP allows
    let forecast;
    if (allocated && t.available <= 0) {
      forecast = h("p", {class: "forecast soon"}, `None left until the refresh on ${day(t.refresh_at)}.`);
    } else if (!f.runs_out_at) {
      forecast = h("p", {class: "forecast idle"}, "No recent use, so no forecast yet.");
    } else if (f.before_refresh) {
      forecast = h("p", {class: "forecast soon"},
        `At about ${rate(f.burn_per_day)} tokens a day, you'll run out around ${day(f.runs_out_at)}, before the refresh.`);
    } else {
      forecast = h("p", {class: "forecast"},
        `At about ${rate(f.burn_per_day)} tokens a day, this lasts until the refresh.`);
    }
    return h("article", {class: `card ${state === "ok" ? "" : state}`.trim(), "data-token-type": name},
      h("div", {class: "card-head"},
        h("div", null, h("h3", null, title(name)), t.description ? h("p", {class: "desc"}, t.description) : null),
        pill),
      h("div", {class: "big"},
        h("span", {class: "available"}, fmt(t.available)),
        h("span", {class: "unit"}, t.available === 1 ? "token left" : "tokens left")),
      h("div", {class: "progress", role: "progressbar", "aria-label": `${title(name)} tokens used`,
                "aria-valuemin": 0, "aria-valuemax": 100, "aria-valuenow": Math.round(fraction * 100)}, bar),
      h("div", {class: "usage-line"},
        allocated
          ? h("span", null, h("span", {class: "used"}, fmt(t.used)), " of ",
              h("span", {class: "allocated"}, fmt(t.allocated)), " used this period")
          : h("span", null, h("span", {class: "used"}, fmt(t.used)), " used · ",
              h("span", {class: "allocated"}, "0"), " in your plan"),
        h("span", {class: "pct"}, allocated ? percent(t.used / t.allocated) : "")),
      h("div", {class: "facts"},
        h("span", {class: "refresh"}, allocated ? `Refreshes ${day(t.refresh_at)}` : "No allowance"),
        t.purchased > 0 ? h("span", null, h("span", {class: "purchased"}, fmt(t.purchased)), " purchased") : null,
        t.reserved > 0 ? h("span", null, h("span", {class: "reserved"}, fmt(t.reserved)), " held for requests in progress") : null),
      forecast);
  }

  function chart(daily, periodStart, now) {
    const tokens = new Map(daily.map((d) => [d.date, d.tokens]));
    const end = Date.UTC(now.getUTCFullYear(), now.getUTCMonth(), now.getUTCDate());
    let start = end - (CHART_DAYS - 1) * DAY_MS;
    if (periodStart) {
      const p = new Date(periodStart);
      start = Math.max(start, Date.UTC(p.getUTCFullYear(), p.getUTCMonth(), p.getUTCDate()));
    }
    if (daily.length) start = Math.min(start, Date.parse(`${daily[0].date}T00:00:00Z`));
    start = Math.min(start, end - 13 * DAY_MS); // a young period still gets a readable chart
    const keys = [];
    for (let t = start; t <= end; t += DAY_MS) keys.push(new Date(t).toISOString().slice(0, 10));
    const max = Math.max(1, ...keys.map((k) => tokens.get(k) || 0));
    $("daily").replaceChildren(...keys.map((key) => {
      const n = tokens.get(key) || 0;
      const bar = h("div");
      bar.style.height = `${Math.max(2, (n / max) * 100)}%`;
      return h("div", {class: n ? "day" : "day zero", "data-date": key, "data-tokens": n,
                       title: `${utcDay(key)}: ${plural(n, "token", "tokens")}`}, bar);
    }));
    const total = daily.reduce((sum, d) => sum + d.tokens, 0);
    show($("daily-empty"), total === 0);
    $("daily").setAttribute("aria-label", `Tokens used per day, ${utcDay(keys[0])} to ${utcDay(keys[keys.length - 1])}`);
    $("daily-caption").textContent = `${plural(total, "token", "tokens")} this period`;
    $("daily-first").textContent = utcDay(keys[0]);
    $("daily-last").textContent = "Today";
  }

  function rows(table, trs, columns) {
    table.tBodies[0].replaceChildren(...(trs.length ? trs
      : [h("tr", null, h("td", {class: "nothing", colspan: columns}, "Nothing used yet this period."))]));
  }

  // -- buying tokens -----------------------------------------------------------------------

  function openPacks() {
    if (!current) return;
    $("packs-status").textContent = "";
    $("packs-list").replaceChildren(...current.billing.packs.map((p) => h("div", {class: "pack", "data-pack": p.name},
      h("div", null,
        h("div", {class: "pack-amount"}, `${fmt(p.amount)} tokens`),
        h("div", {class: "pack-type"}, title(p.token_type))),
      h("button", {class: "btn primary", type: "button", "data-pack": p.name}, "Buy"))));
    $("packs").showModal();
  }

  async function checkout(pack) {
    const buttons = $("packs-list").querySelectorAll("button");
    buttons.forEach((b) => { b.disabled = true; });
    $("packs-status").textContent = "Opening secure checkout…";
    try {
      const session = await api(CHECKOUT, {
        method: "POST",
        headers: {"Content-Type": "application/json"},
        body: JSON.stringify({pack}),
      });
      const url = webAddress(session.url);
      if (!url) throw new ApiError("The gateway did not return a checkout address.");
      location.assign(url);
    } catch (e) {
      if (e.expired) {
        $("packs").close();
        forget();
        view("signin");
        error(e.message);
        return;
      }
      $("packs-status").textContent = e.message;
      buttons.forEach((b) => { b.disabled = false; });
    }
  }

  // -- wiring ------------------------------------------------------------------------------

  $("refresh").addEventListener("click", load);
  $("buy").addEventListener("click", openPacks);
  $("upgrade-buy").addEventListener("click", openPacks);
  $("packs-close").addEventListener("click", () => $("packs").close());
  $("packs-list").addEventListener("click", (event) => {
    const button = event.target.closest("button[data-pack]");
    if (button) checkout(button.dataset.pack);
  });
  $("signout").addEventListener("click", () => {
    forget();
    error("");
    for (const id of ["balances", "warnings", "daily"]) $(id).replaceChildren();
    for (const id of ["features", "users"]) $(id).tBodies[0].replaceChildren();
    view("signin");
  });
  $("signin-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const token = $("token-input").value.trim().replace(/^Bearer\s+/i, "");
    if (!token) {
      error("Paste a token first.");
      return;
    }
    sessionStorage.setItem(KEY, token);
    $("token-input").value = "";
    error("");
    load();
  });
  window.addEventListener("hashchange", () => {
    if (!/(?:^#|&)token=/.test(location.hash)) return;
    takeTokenFromFragment();
    current = null;
    load();
  });

  takeTokenFromFragment();
  load();
})();
