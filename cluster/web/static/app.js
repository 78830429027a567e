// rayfarm's web page: plain JavaScript, no build step, no dependencies.
//
// The page is a client of the farm's own HTTP API. It signs in once (POST /session
// sets an HttpOnly cookie holding the API token), then every call, image, video and
// event stream rides that cookie, so the farm applies exactly the rights and visibility
// it applies to the SDK. State-changing calls carry X-Rayfarm-Request: 1, without which
// the farm refuses a cookie (CSRF). Whatever the farm refuses, the page shows the
// farm's own message. Views are routed in the URL's fragment (#/jobs/<id>), so every
// path stays the API's. Data from the farm is only ever put in the page as text.
"use strict";

(() => {
  const PAGE_SIZE = 50;
  // The jobs list re-reads its page this long after a change that could alter it
  // (a submission, a job entering or leaving the filtered state; /watch/list says
  // which), so a burst of changes costs one read. The jobs it shows change live,
  // through /watch.
  const RELIST_DELAY_MS = 300;
  const FARM_REFRESH_MS = 3000;
  // The log keeps about this much of its end on the page (the API has all of it).
  const LOG_MAX_CHARS = 2000000;
  const TERMINAL = new Set(["COMPLETED", "FAILED", "CANCELLED"]);

  const $ = (id) => document.getElementById(id);

  /** An element with attributes and children (strings become text nodes). */
  function el(tag, attrs = {}, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs)) {
      if (value === undefined || value === null || value === false) continue;
      if (name === "className") node.className = value;
      else if (name === "text") node.textContent = value;
      else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
      else node.setAttribute(name, value === true ? "" : String(value));
    }
    for (const child of children) {
      if (child === null || child === undefined) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  // -- the API ---------------------------------------------------------------------------

  class ApiError extends Error {
    constructor(status, code, message) {
      super(message);
      this.status = status;
      this.code = code;
    }
  }

  async function errorOf(response) {
    let text = "";
    try {
      text = await response.text();
      const body = JSON.parse(text);
      if (body && body.error) {
        return new ApiError(response.status, body.error.code, body.error.message);
      }
    } catch (_) {
      // not the farm's JSON error body: show what came back
    }
    return new ApiError(response.status, "http_error",
      `${response.status} ${response.statusText}${text ? `: ${text.slice(0, 300)}` : ""}`);
  }

  /** Call the API; resolve to its JSON (null for 204), reject with an ApiError. */
  async function call(method, path, body) {
    const headers = { "X-Rayfarm-Request": "1", Accept: "application/json" };
    let payload;
    if (body !== undefined) {
      headers["Content-Type"] = "application/json";
      payload = JSON.stringify(body);
    }
    let response;
    try {
      response = await fetch(path, { method, headers, body: payload, credentials: "same-origin" });
    } catch (exc) {
      throw new ApiError(0, "unreachable", `the farm did not answer (${exc.message})`);
    }
    if (!response.ok) {
      const error = await errorOf(response);
      if (response.status === 401 && path !== "/session") signedOut(error.message);
      throw error;
    }
    return response.status === 204 ? null : response.json();
  }

  /**
   * Follow a Server-Sent Events stream: onMessage(kind, data) for each message, every
   * kind (EventSource only delivers the kinds a page names in advance, and the farm's
   * execution log grows new ones). Reconnects after a dropped connection, with
   * Last-Event-ID where the stream gives ids; stops at `event: end` or when closed.
   * Returns a function that closes it.
   */
  function follow(url, onMessage, onEnd) {
    const abort = new AbortController();
    let lastId = null;
    let retryMs = 2000;
    let closed = false;

    async function run() {
      while (!closed) {
        const headers = { Accept: "text/event-stream" };
        if (lastId) headers["Last-Event-ID"] = lastId;
        try {
          const response = await fetch(url, { headers, signal: abort.signal,
                                               credentials: "same-origin" });
          if (!response.ok) {
            const error = await errorOf(response);
            if (response.status === 401) signedOut(error.message);
            else showNotice(error.message);
            return;
          }
          const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
          let buffer = "";
          let fields = { data: [] };
          for (;;) {
            const { value, done } = await reader.read();
            if (done) break;
            buffer += value;
            let cut;
            while ((cut = buffer.indexOf("\n")) >= 0) {
              const line = buffer.slice(0, cut).replace(/\r$/, "");
              buffer = buffer.slice(cut + 1);
              if (line === "") {
                if (fields.data.length || fields.event) {
                  if (fields.id !== undefined) lastId = fields.id;
                  const kind = fields.event || "message";
                  if (kind === "end") {
                    closed = true;
                    abort.abort();
                    if (onEnd) onEnd();
                    return;
                  }
                  let data = fields.data.join("\n");
                  try { data = JSON.parse(data); } catch (_) { /* leave as text */ }
                  onMessage(kind, data);
                }
                fields = { data: [] };
              } else if (!line.startsWith(":")) {
                const colon = line.indexOf(":");
                const name = colon < 0 ? line : line.slice(0, colon);
                const text = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
                if (name === "data") fields.data.push(text);
                else if (name === "event") fields.event = text;
                else if (name === "id") fields.id = text;
                else if (name === "retry" && /^\d+$/.test(text)) retryMs = Number(text);
              }
            }
          }
        } catch (exc) {
          if (closed) return;
        }
        if (!closed) await new Promise((resolve) => setTimeout(resolve, retryMs));
      }
    }

    run();
    return () => { closed = true; abort.abort(); };
  }

  // -- formatting ------------------------------------------------------------------------

  const timeFormat = new Intl.DateTimeFormat(undefined, { dateStyle: "medium", timeStyle: "medium" });

  function timeNode(iso) {
    if (!iso) return el("span", { className: "none", text: "—" });
    return el("time", { datetime: iso, text: timeFormat.format(new Date(iso)) });
  }

  function setTime(node, iso) {
    node.replaceChildren(timeNode(iso));
  }

  function seconds(value) {
    if (value === undefined || value === null) return "";
    return value < 10 ? `${value.toFixed(2)} s` : value < 120 ? `${value.toFixed(1)} s`
      : `${Math.floor(value / 60)} min ${Math.round(value % 60)} s`;
  }

  function bytes(n) {
    return n < 1024 ? `${n} B` : n < 1048576 ? `${(n / 1024).toFixed(1)} KB`
      : n < 1073741824 ? `${(n / 1048576).toFixed(1)} MB` : `${(n / 1073741824).toFixed(2)} GB`;
  }

  function stateBadge(node, state) {
    node.textContent = state;
    node.className = `state state-${state.toLowerCase()}`;
  }

  function logLine(event) {
    const at = String(event.at || "").slice(0, 23).replace("T", " ");
    let text;
    if (event.kind === "state") {
      text = `${event.from || "-"} -> ${event.to}${event.error ? `: ${event.error}` : ""}`;
    } else {
      text = Object.entries(event)
        .filter(([name]) => !["id", "kind", "at"].includes(name))
        .map(([name, value]) => `${name}=${value}`)
        .join(" ");
    }
    return `${at}  ${String(event.kind).padEnd(12)} ${text}`;
  }

  // -- the shell: who is signed in, views, notices ---------------------------------------

  let me = null;
  let cleanups = [];

  function stopLive() {
    for (const cleanup of cleanups) cleanup();
    cleanups = [];
  }

  function showNotice(message) {
    const notice = $("notice");
    notice.textContent = message;
    notice.hidden = !message;
  }

  function show(view, title) {
    for (const section of document.querySelectorAll("main > .view")) {
      section.hidden = section.id !== `view-${view}`;
    }
    for (const link of document.querySelectorAll("#nav a")) {
      if (link.dataset.view === view) link.setAttribute("aria-current", "page");
      else link.removeAttribute("aria-current");
    }
    document.title = title ? `${title} · rayfarm` : "rayfarm";
  }

  function focusHeading(view) {
    const heading = document.querySelector(`#view-${view} h1`);
    if (heading) heading.focus({ preventScroll: false });
  }

  function setSignedIn(who) {
    me = who;
    $("nav").hidden = !who;
    $("who").hidden = !who;
    if (who) {
      $("who-name").textContent = `${who.user} (${who.role})`;
      $("nav-submit").hidden = !who.may_submit;
      $("sign-out").hidden = !who.accounts; // a farm without accounts: nothing to leave
    }
  }

  function signedOut(message) {
    stopLive();
    setSignedIn(null);
    showSignIn(message || "");
  }

  function showSignIn(message) {
    show("signin", "Sign in");
    $("signin-error").textContent = message || "";
    $("signin-token").value = "";
    $("signin-token").focus();
  }

  $("signin-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const token = $("signin-token").value.trim();
    if (!token) {
      $("signin-error").textContent = "Enter an API token.";
      $("signin-token").focus();
      return;
    }
    $("signin-error").textContent = "";
    try {
      await call("POST", "/session", { token });
      setSignedIn(await call("GET", "/session"));
      showNotice("");
      route(true);
    } catch (error) {
      $("signin-error").textContent = error.message;
      $("signin-token").select();
    }
  });

  $("sign-out").addEventListener("click", async () => {
    try {
      await call("DELETE", "/session");
    } catch (error) {
      showNotice(error.message);
      return;
    }
    history.replaceState(null, "", "#/");
    signedOut("You have signed out.");
  });

  // -- routing ---------------------------------------------------------------------------

  const JOB_ROUTE = /^\/jobs\/([^/?]+)$/;

  function route(moveFocus) {
    const hash = location.hash || "#/";
    if (!hash.startsWith("#/")) return; // an in-page link (skip to content)
    stopLive();
    showNotice("");
    if (!me) return showSignIn("");
    const [path, query] = hash.slice(1).split("?");
    const params = new URLSearchParams(query || "");
    let view;
    const job = JOB_ROUTE.exec(path);
    if (path === "/" || path === "/jobs") view = showJobs(params);
    else if (job) view = showJob(decoded(job[1]));
    else if (path === "/submit") view = showSubmit();
    else if (path === "/farm") view = showFarm();
    else view = showMissing(`There is no page ${path} here.`);
    if (moveFocus) focusHeading(view);
  }

  window.addEventListener("hashchange", () => route(true));

  function decoded(part) {
    try {
      return decodeURIComponent(part);
    } catch (_) {
      return part; // not valid percent-encoding: the farm answers "no job" for it
    }
  }

  function showMissing(text) {
    show("missing", "Not here");
    $("missing-text").textContent = text;
    return "missing";
  }

  // -- jobs ------------------------------------------------------------------------------

  function showJobs(params) {
    show("jobs", "Jobs");
    const state = params.get("state") || "";
    const owner = params.get("owner") || "";
    const offset = Math.max(0, parseInt(params.get("offset") || "0", 10) || 0);
    $("filter-state").value = state;
    $("filter-owner").value = owner;
    const rows = new Map();
    const body = $("jobs-body");
    body.replaceChildren();
    $("jobs-summary").textContent = "Loading jobs…";
    let watched = "";
    let stopWatch = () => {};
    let active = true;
    let reads = 0; // the newest read's number: an older answer arriving later is dropped
    let stale = false; // a change came while the tab was hidden
    let relistTimer = null;

    function pageLink(node, to) {
      const query = new URLSearchParams();
      if (state) query.set("state", state);
      if (owner) query.set("owner", owner);
      if (to) query.set("offset", String(to));
      const qs = query.toString();
      node.href = `#/${qs ? `?${qs}` : ""}`;
    }

    function update(job) {
      let row = rows.get(job.id);
      if (!row) {
        row = el("tr", { "data-job": job.id });
        row.cells_ = {
          link: el("a", { href: `#/jobs/${encodeURIComponent(job.id)}` }),
          id: el("span", { className: "sub mono" }),
          state: el("span"),
          owner: el("td", { "data-label": "Owner" }),
          bar: el("progress", { max: 1, value: 0 }),
          count: el("span", { className: "count" }),
          created: el("td", { "data-label": "Submitted" }),
          started: el("td", { "data-label": "Started" }),
          finished: el("td", { "data-label": "Finished" }),
        };
        const c = row.cells_;
        row.append(
          el("td", { "data-label": "Job" }, c.link, el("br"), c.id),
          el("td", { "data-label": "State" }, c.state),
          c.owner,
          el("td", { "data-label": "Progress", className: "progress" }, c.bar, " ", c.count),
          c.created, c.started, c.finished,
        );
        rows.set(job.id, row);
      }
      const c = row.cells_;
      c.link.textContent = job.scene_file;
      c.id.textContent = job.id;
      stateBadge(c.state, job.state);
      c.owner.textContent = job.owner;
      c.bar.max = Math.max(job.frames_total, 1);
      c.bar.value = job.frames_done;
      c.bar.setAttribute("aria-label", `Frames of ${job.scene_file} (${job.id})`);
      c.count.textContent = `${job.frames_done}/${job.frames_total} frames`;
      setTime(c.created, job.created_at);
      setTime(c.started, job.started_at);
      setTime(c.finished, job.finished_at);
      return row;
    }

    function summarize(total, shown) {
      const counts = {};
      for (const row of rows.values()) {
        const s = row.cells_.state.textContent;
        counts[s] = (counts[s] || 0) + 1;
      }
      const parts = Object.entries(counts).map(([s, n]) => `${n} ${s.toLowerCase()}`);
      $("jobs-summary").textContent = total === 0
        ? (state || owner ? "No job matches these filters." : "No jobs yet.")
        : `Showing ${offset + 1}–${offset + shown} of ${total} jobs` +
          (parts.length ? `: ${parts.join(", ")}.` : ".");
    }

    let total = 0;

    async function load() {
      if (document.hidden && body.childElementCount) {
        stale = true; // a tab in the background reads when it is shown again
        return;
      }
      stale = false;
      const read = ++reads;
      const query = new URLSearchParams({ limit: String(PAGE_SIZE), offset: String(offset) });
      if (state) query.set("state", state);
      if (owner) query.set("owner", owner);
      let data;
      try {
        data = await call("GET", `/jobs?${query}`);
      } catch (error) {
        if (active && read === reads && error.status !== 401) showNotice(error.message);
        return;
      }
      if (!active || read !== reads) return;
      showNotice("");
      total = data.total;
      const ordered = data.jobs.map(update);
      for (const id of [...rows.keys()]) {
        if (!data.jobs.some((job) => job.id === id)) rows.delete(id);
      }
      body.replaceChildren(...ordered);
      summarize(total, data.jobs.length);
      const newer = $("jobs-newer");
      const older = $("jobs-older");
      newer.hidden = offset === 0;
      older.hidden = offset + data.jobs.length >= total;
      pageLink(newer, Math.max(0, offset - PAGE_SIZE));
      pageLink(older, offset + PAGE_SIZE);
      const live = data.jobs.filter((job) => !TERMINAL.has(job.state)).map((job) => job.id);
      const key = live.join(",");
      if (key !== watched) {
        stopWatch();
        watched = key;
        stopWatch = key
          ? follow(`/watch?jobs=${key}`, (kind, message) => {
            if (kind !== "job" || !rows.has(message.job.id)) return;
            update(message.job);
            summarize(total, rows.size);
          }, () => { watched = ""; })
          : () => {};
      }
    }

    function relistSoon() {
      if (relistTimer === null) {
        relistTimer = setTimeout(() => { relistTimer = null; load(); }, RELIST_DELAY_MS);
      }
    }

    function shown() {
      if (!document.hidden && stale) load();
    }

    load();
    // Jobs this list does not show yet: /watch/list names every visible job that is
    // submitted or changes state. `ready` comes first on each (re)connect: read the
    // list then, so nothing between the read above (or a lost connection) and the
    // stream is missed.
    const stopList = follow("/watch/list", (kind, change) => {
      if (kind === "ready") return load();
      if (kind !== "change") return;
      if (rows.has(change.job)) {
        // Its row changes through /watch; it leaves a list filtered by state, and every
        // list once deleted (DELETE /jobs/{id}, retention).
        if (change.state === "DELETED" || (state && change.state !== state)) relistSoon();
      } else if (change.state === "DELETED") {
        return;
      } else if ((!state || change.state === state) && (!owner || change.owner === owner)) {
        relistSoon();
      }
    });
    document.addEventListener("visibilitychange", shown);
    cleanups.push(() => {
      active = false;
      clearTimeout(relistTimer);
      stopList();
      stopWatch();
      document.removeEventListener("visibilitychange", shown);
    });
    return "jobs";
  }

  $("jobs-filter").addEventListener("submit", (event) => {
    event.preventDefault();
    const query = new URLSearchParams();
    const state = $("filter-state").value;
    const owner = $("filter-owner").value.trim();
    if (state) query.set("state", state);
    if (owner) query.set("owner", owner);
    const qs = query.toString();
    location.hash = `#/${qs ? `?${qs}` : ""}`;
  });
  $("filter-state").addEventListener("change", () => $("jobs-filter").requestSubmit());

  // -- one job ---------------------------------------------------------------------------

  function showJob(id) {
    show("job", `Job ${id}`);
    const base = `/jobs/${encodeURIComponent(id)}`;
    let active = true;
    let current = null;
    const frames = new Map();
    const tasks = new Map();
    let showProgress = $("log-progress").checked;
    let outputsShown = false;

    $("job-title").textContent = `Job ${id}`;
    for (const field of ["job-owner", "job-frames", "job-tasks", "job-tiles", "job-slices",
      "job-device",
      "job-blender",
      "job-created", "job-started", "job-finished", "job-answer", "job-rights", "job-live",
      "frames-count"]) {
      $(field).textContent = "";
    }
    $("job-state").textContent = "";
    $("job-state").className = "state";
    $("job-error").hidden = true;
    $("job-cancel").hidden = true;
    $("job-retry").hidden = true;
    $("frames").replaceChildren();
    $("frames-empty").hidden = false;
    $("tasks-body").replaceChildren();
    $("log").textContent = "";
    $("outputs").hidden = true;
    $("outputs-body").replaceChildren();

    // A sliced frame still rendering shows its preview (the merge of its slices so far),
    // marked with the share of its samples; the stored frame replaces it.
    function addFrame(n, fraction) {
      const partial = fraction !== undefined && fraction < 1;
      const known = frames.get(n);
      if (known) {
        if (known.dataset.partial === "1") showFraction(known, n, partial ? fraction : 1);
        return;
      }
      const thumb = `${base}/frames/${n}/thumbnail`;
      const image = el("img", { src: partial ? `${thumb}?samples=${fraction}` : thumb, alt: "",
                                loading: "lazy", width: 160, height: 90 });
      // A preview is written with its frame; one missing now is retried once.
      image.addEventListener("error", () => {
        if (!image.dataset.retried) {
          image.dataset.retried = "1";
          setTimeout(() => { image.src = `${thumb}?again=1`; }, 1500);
        }
      }, { once: false });
      const item = el("li", { "data-frame": n },
        el("button", { type: "button", className: "thumb", "aria-label": `Open frame ${n}`,
                       onclick: () => openFrame(n) },
          image, el("span", { className: "frame-no", text: String(n) })));
      if (partial) {
        item.dataset.partial = "1";
        showFraction(item, n, fraction);
      }
      frames.set(n, item);
      const after = [...frames.keys()].filter((k) => k > n).sort((a, b) => a - b)[0];
      $("frames").insertBefore(item, after === undefined ? null : frames.get(after));
      $("frames-empty").hidden = true;
      $("frames-count").textContent = current
        ? `(${frames.size} of ${current.frames_total})` : `(${frames.size})`;
    }

    function showFraction(item, n, fraction) {
      const image = item.querySelector("img");
      const label = item.querySelector(".frame-no");
      const thumb = `${base}/frames/${n}/thumbnail`;
      if (fraction >= 1) {
        delete item.dataset.partial;
        image.src = `${thumb}?stored=1`;
        label.textContent = String(n);
        label.title = "";
        return;
      }
      image.src = `${thumb}?samples=${fraction}`;
      label.textContent = `${n} · ${Math.round(fraction * 100)}%`;
      label.title = `${Math.round(fraction * 100)}% of its samples so far`;
    }

    function openFrame(n) {
      const partial = frames.get(n) && frames.get(n).dataset.partial === "1";
      if (partial) {
        const dialog = $("viewer");
        $("viewer-title").textContent = `Frame ${n} (its samples so far, still rendering)`;
        $("viewer-image").src = `${base}/frames/${n}/thumbnail?at=${Date.now()}`;
        $("viewer-image").alt = `Frame ${n} of job ${id}, still rendering`;
        $("viewer-link").href = `${base}/frames/${n}/thumbnail`;
        $("viewer-link").textContent = "Open the preview";
        dialog.showModal();
        return;
      }
      const isExr = current && current.spec.format === "exr";
      const dialog = $("viewer");
      $("viewer-title").textContent = `Frame ${n}` + (isExr ? " (preview of the EXR)" : "");
      const image = $("viewer-image");
      image.src = isExr ? `${base}/frames/${n}/thumbnail` : `${base}/frames/${n}`;
      image.alt = `Frame ${n} of job ${id}`;
      $("viewer-link").href = `${base}/frames/${n}`;
      $("viewer-link").textContent = isExr ? "Download the EXR" : "Open the full image";
      dialog.showModal();
    }

    function task(event) {
      let row = tasks.get(event.task);
      if (!row) {
        const logLink = el("a", { href: `${base}/tasks/${event.task}/log`, target: "_blank",
                                  rel: "noopener", className: "mono", text: event.task,
                                  title: "Blender's output for this task" });
        row = el("tr", { "data-task": event.task });
        row.cells_ = {};
        const names = ["frame", "tile", "state", "actor", "node", "device", "time", "attempts"];
        const labels = ["Frame", "Tile", "State", "Actor", "Node", "Device", "Time", "Attempts"];
        row.append(el("td", { "data-label": "Task" }, logLink));
        names.forEach((name, i) => {
          row.cells_[name] = el("td", { "data-label": labels[i] });
          row.append(row.cells_[name]);
        });
        row.cells_.frame.textContent = event.frame;
        row.cells_.tile.textContent = event.slice === undefined ? event.tile
          : `${event.tile} · slice ${Number(event.slice) + 1}`;
        tasks.set(event.task, row);
        $("tasks-body").append(row);
      }
      return row.cells_;
    }

    function place(cells, event) {
      if (event.actor !== undefined) cells.actor.textContent = event.actor;
      if (event.node !== undefined) {
        cells.node.textContent = event.host ? `${event.host} · ${event.node.slice(0, 8)}`
          : event.node.slice(0, 8);
        cells.node.title = event.node;
      }
      if (event.device !== undefined) cells.device.textContent = event.device;
      if (event.attempt !== undefined) cells.attempts.textContent = event.attempt;
    }

    function onEvent(kind, event) {
      if (!active || typeof event !== "object") return;
      if (kind !== "progress" || showProgress) appendLog(logLine(event));
      switch (kind) {
        case "task_queued":
          task(event).state.textContent = "queued";
          break;
        case "task_started": {
          const cells = task(event);
          cells.state.textContent = "rendering";
          place(cells, event);
          break;
        }
        case "progress": {
          const cells = task(event);
          if (cells.state.textContent === "rendering" || cells.state.textContent.includes("/")) {
            cells.state.textContent = `rendering ${event.samples}/${event.of}`;
          }
          break;
        }
        case "task_done": {
          const cells = task(event);
          cells.state.textContent = "done";
          place(cells, event);
          cells.time.textContent = seconds(event.seconds);
          break;
        }
        case "task_failed": {
          const cells = task(event);
          cells.state.textContent = event.retry ? "failed, retrying" : "failed";
          cells.state.title = event.error || "";
          place(cells, event);
          break;
        }
        case "task_retried":
          task(event).state.textContent = "queued again";
          task(event).attempts.textContent = event.attempt;
          break;
        case "frame":
          addFrame(event.frame, 1);
          break;
        case "preview":
          addFrame(event.frame, Number(event.fraction));
          break;
        case "output":
          loadOutputs();
          break;
        default:
          break;
      }
    }

    // Lines are written once per animation frame: a job's replayed log can be thousands
    // of events, and measuring the scroll position for each would lay the page out as
    // many times.
    let pending = [];
    let logChars = 0;
    function appendLog(line) {
      pending.push(line);
      if (pending.length === 1) requestAnimationFrame(flushLog);
    }
    function flushLog() {
      if (!active) return;
      const log = $("log");
      const atBottom = log.scrollTop + log.clientHeight >= log.scrollHeight - 8;
      const text = pending.join("\n") + "\n";
      log.append(text);
      logChars += text.length;
      pending = [];
      while (log.childNodes.length > 1 && logChars > LOG_MAX_CHARS) {
        logChars -= log.firstChild.textContent.length;
        log.firstChild.remove();
      }
      if (atBottom) log.scrollTop = log.scrollHeight;
    }

    $("log-progress").onchange = () => {
      showProgress = $("log-progress").checked;
    };

    async function loadOutputs() {
      if (outputsShown) return;
      let data;
      try {
        data = await call("GET", `${base}/outputs`);
      } catch (error) {
        return;
      }
      const video = data.outputs.find((o) => o.name.endsWith(".mp4"));
      if (!video || !active) return;
      outputsShown = true;
      const src = `${base}/outputs/${video.name.split("/").map(encodeURIComponent).join("/")}`;
      $("outputs-body").replaceChildren(
        el("video", { controls: true, preload: "metadata", src, className: "video",
                      "aria-label": `Video of job ${id}` }),
        el("p", {}, el("a", { href: src, download: "", text: `Download ${video.name}` }),
          ` (${bytes(video.size)})`),
      );
      $("outputs").hidden = false;
    }

    function render(job, actions) {
      const previous = current;
      current = job;
      $("job-title").textContent = `${job.scene_file} · ${job.id}`;
      document.title = `${job.scene_file} ${job.state} · rayfarm`;
      stateBadge($("job-state"), job.state);
      $("job-owner").textContent = job.owner + (job.spec.project ? ` (${job.spec.project})` : "");
      $("job-frames").textContent = `${job.frames_done} of ${job.frames_total}`;
      $("job-tasks").textContent = `${job.tasks_done} of ${job.tasks_total}`;
      $("job-tiles").textContent = job.tiles || String(job.spec.tiles);
      $("job-slices").textContent = job.slices ? String(job.slices) : String(job.spec.slices);
      $("job-device").textContent = job.device || "—";
      $("job-blender").textContent = job.rendered_by
        ? `${job.rendered_by} (saved by ${job.saved_by || "?"})` : "—";
      setTime($("job-created"), job.created_at);
      setTime($("job-started"), job.started_at);
      setTime($("job-finished"), job.finished_at);
      $("job-progress").max = Math.max(job.frames_total, 1);
      $("job-progress").value = job.frames_done;
      $("frames-count").textContent = `(${frames.size} of ${job.frames_total})`;
      const after = job.spec.depends_on || [];
      $("job-after-fact").hidden = after.length === 0;
      $("job-after").replaceChildren(...after.flatMap((dep, i) => [
        ...(i ? [", "] : []), el("a", { href: `#/jobs/${encodeURIComponent(dep)}`, text: dep })]));
      const waits = job.detail ? `Waiting: ${job.detail}` : "";
      $("job-detail").hidden = !(waits || job.urgent);
      $("job-detail").textContent = [job.urgent ? "Urgent (marked by an admin)." : "", waits]
        .filter(Boolean).join(" ");
      $("job-error").hidden = !job.error;
      $("job-error").textContent = job.error || "";
      if (!previous || previous.state !== job.state) {
        $("job-live").textContent = `The job is ${job.state.toLowerCase()}.`;
      }
      // Shown by the user's rights, enabled by the job's state: both as the farm says.
      $("job-cancel").hidden = !actions.change;
      $("job-retry").hidden = !actions.change;
      $("job-cancel").disabled = !actions.cancel;
      $("job-retry").disabled = !actions.retry;
      $("job-rights").textContent = !actions.change
        ? `Only ${job.owner} or an admin may cancel or retry this job.`
        : actions.cancel || actions.retry ? ""
          : `A ${job.state.toLowerCase()} job can be neither cancelled nor retried.`;
      if (job.state === "COMPLETED" && job.spec.post && job.spec.post.video) loadOutputs();
    }

    async function act(action, button) {
      if (action === "cancel" && !window.confirm(`Cancel job ${id}? Frames already stored are kept.`)) {
        return;
      }
      button.disabled = true;
      const answer = $("job-answer");
      answer.className = "answer";
      answer.textContent = action === "cancel" ? "Cancelling…" : "Retrying…";
      try {
        const job = await call("POST", `${base}/${action}`);
        answer.textContent = action === "cancel" ? `Cancelled: the job is ${job.state}.`
          : `Queued again: the job is ${job.state}.`;
        if (action === "retry") startLive();
      } catch (error) {
        answer.className = "answer error";
        answer.textContent = `The farm refused: ${error.message}`;
        button.disabled = false;
      }
    }

    // Both streams end with the job's terminal state; a retry starts them again, the
    // execution log after the last event shown. While they are closed, /watch/list
    // tells of a retry made elsewhere (another page, the SDK, a colleague).
    let lastEventId = null;
    let liveOpen = false;
    let reopen = false; // retried while the streams were still closing
    let stopRetryWatch = () => {};
    cleanups.push(() => stopRetryWatch());
    function startLive() {
      if (!active) return;
      if (liveOpen) {
        reopen = true;
        return;
      }
      stopRetryWatch();
      liveOpen = true;
      reopen = false;
      let ended = 0;
      const ends = () => {
        ended += 1;
        if (ended < 2) return;
        liveOpen = false;
        if (reopen) startLive();
        else watchForRetry();
      };
      const stopWatch = follow(`/watch?jobs=${encodeURIComponent(id)}`, (kind, message) => {
        if (active && kind === "job") render(message.job, message.actions);
      }, ends);
      const after = lastEventId ? `?after=${encodeURIComponent(lastEventId)}` : "";
      const stopEvents = follow(`${base}/events${after}`, (kind, event) => {
        if (event && event.id) lastEventId = event.id;
        onEvent(kind, event);
      }, ends);
      cleanups.push(stopWatch, stopEvents);
    }

    function watchForRetry() {
      if (!active) return;
      stopRetryWatch = follow("/watch/list", async (kind, change) => {
        if (kind === "change" && change.job === id && change.state === "PENDING") {
          if (!liveOpen) startLive();
        } else if (kind === "ready") {
          // On each (re)connect: retried while nothing listened?
          let job;
          try {
            job = await call("GET", base);
          } catch (_) {
            return;
          }
          if (active && !liveOpen && !TERMINAL.has(job.state)) startLive();
        }
      });
    }

    $("job-cancel").onclick = () => act("cancel", $("job-cancel"));
    $("job-retry").onclick = () => act("retry", $("job-retry"));

    (async () => {
      let stored;
      try {
        stored = await call("GET", `${base}/frames`);
      } catch (error) {
        if (!active || error.status === 401) return;
        if (error.status === 404) showMissing(error.message);
        else showNotice(error.message);
        return;
      }
      if (!active) return;
      for (const frame of stored.frames) addFrame(frame.frame);
      startLive();
    })();
    cleanups.push(() => { active = false; });
    return "job";
  }

  $("viewer-close").addEventListener("click", () => $("viewer").close());
  $("viewer").addEventListener("click", (event) => {
    if (event.target === $("viewer")) $("viewer").close(); // a click on the backdrop
  });

  // -- submit ----------------------------------------------------------------------------

  function showSubmit() {
    show("submit", "Submit a job");
    const allowed = me.may_submit;
    $("submit-form").hidden = !allowed;
    $("submit-refused").hidden = allowed;
    $("submit-refused").textContent = allowed ? ""
      : `${me.user} is a ${me.role}: only artists and admins submit jobs.`;
    const projects = $("submit-project");
    projects.replaceChildren(el("option", { value: "", text: "None" }),
      ...me.projects.map((p) => el("option", { value: p, text: p })));
    $("submit-project-field").hidden = me.projects.length === 0;
    $("submit-error").textContent = "";
    $("submit-status").textContent = "";
    $("submit-progress").hidden = true;
    return "submit";
  }

  function specFromForm() {
    const spec = { frames: $("submit-frames").value.trim() };
    const tiles = $("submit-tiles").value.trim();
    if (tiles && tiles !== "1") spec.tiles = /^\d+$/.test(tiles) ? Number(tiles) : tiles;
    const slices = $("submit-slices").value.trim();
    if (slices && slices !== "1") spec.slices = /^\d+$/.test(slices) ? Number(slices) : slices;
    const numbers = [["submit-samples", "samples"], ["submit-resolution", "resolution_percentage"],
      ["submit-priority", "priority"]];
    for (const [field, name] of numbers) {
      const value = $(field).value.trim();
      if (value !== "") spec[name] = Number(value);
    }
    if ($("submit-format").value !== "png") spec.format = $("submit-format").value;
    if ($("submit-project").value) spec.project = $("submit-project").value;
    if ($("submit-blender").value.trim()) spec.blender = $("submit-blender").value.trim();
    if ($("submit-video").checked) spec.post = { video: { fps: Number($("submit-fps").value) } };
    if ($("submit-order").value) spec.order = $("submit-order").value;
    const after = $("submit-after").value.split(/[\s,]+/).filter(Boolean);
    if (after.length) spec.depends_on = after;
    return spec;
  }

  $("submit-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const error = $("submit-error");
    error.textContent = "";
    const file = $("submit-scene").files[0];
    if (!file) {
      error.textContent = "Choose a .blend file to render.";
      $("submit-scene").focus();
      return;
    }
    if (!$("submit-frames").value.trim()) {
      error.textContent = "Say which frames to render (for example 1-250).";
      $("submit-frames").focus();
      return;
    }
    const form = new FormData();
    form.append("spec", JSON.stringify(specFromForm()));
    form.append("scene", file, file.name);
    // XMLHttpRequest, not fetch: it reports the upload's progress.
    const request = new XMLHttpRequest();
    const bar = $("submit-progress");
    const button = $("submit-button");
    request.open("POST", "/jobs");
    request.setRequestHeader("X-Rayfarm-Request", "1");
    request.setRequestHeader("Accept", "application/json");
    request.upload.onprogress = (progress) => {
      if (progress.lengthComputable) {
        bar.max = progress.total;
        bar.value = progress.loaded;
      }
    };
    request.onload = () => {
      button.disabled = false;
      bar.hidden = true;
      let body = null;
      try { body = JSON.parse(request.responseText); } catch (_) { /* not JSON */ }
      if (request.status === 201 && body) {
        $("submit-status").textContent = `Submitted job ${body.id}.`;
        $("submit-form").reset();
        location.hash = `#/jobs/${body.id}`;
        return;
      }
      if (request.status === 401) {
        signedOut(body && body.error ? body.error.message : "");
        return;
      }
      $("submit-status").textContent = "";
      error.textContent = body && body.error ? body.error.message
        : `${request.status} ${request.statusText}`;
    };
    request.onerror = () => {
      button.disabled = false;
      bar.hidden = true;
      $("submit-status").textContent = "";
      error.textContent = "The farm did not answer: the upload did not complete.";
    };
    button.disabled = true;
    bar.hidden = false;
    bar.value = 0;
    $("submit-status").textContent = `Uploading ${file.name}…`;
    request.send(form);
  });

  // -- the farm --------------------------------------------------------------------------

  // The farm's current and requested size: render nodes up, and, when it autoscales,
  // how many it asks the cluster for and between which bounds.
  function farmSize(scaling) {
    if (!scaling) return "—";
    const nodes = (n) => `${n} render node${n === 1 ? "" : "s"}`;
    if (!scaling.autoscaling) return `${nodes(scaling.nodes_up)} (a fixed cluster)`;
    const { nodes_up: up, nodes_requested: asked, min_nodes: min, max_nodes: max } = scaling;
    const where = asked > up ? "scaling up" : asked < up ? "scaling down" : "steady";
    return `${nodes(up)} up, ${asked} requested (${min}–${max}): ${where}`;
  }

  function showFarm() {
    show("farm", "Farm");
    let active = true;

    async function load() {
      if (document.hidden && $("farm-queue").textContent) return; // a tab in the background
      let farm;
      try {
        farm = await call("GET", "/farm");
      } catch (error) {
        if (active && error.status !== 401) showNotice(error.message);
        return;
      }
      if (!active) return;
      showNotice("");
      const busy = farm.actors.filter((a) => a.busy).length;
      $("farm-size").textContent = farmSize(farm.scaling);
      $("farm-actors").textContent = farm.dispatcher ? String(farm.actors.length) : "—";
      $("farm-busy").textContent = farm.dispatcher ? String(busy) : "—";
      $("farm-pending").textContent = farm.tasks_pending === null ? "—" : String(farm.tasks_pending);
      $("farm-queue").textContent = String(farm.queue_depth);
      $("farm-jobs").textContent = Object.entries(farm.jobs)
        .filter(([, n]) => n > 0).map(([s, n]) => `${n} ${s.toLowerCase()}`).join(", ") || "none";
      $("farm-down").hidden = farm.dispatcher;
      const nodes = new Map();
      for (const actor of farm.actors) {
        const key = `${actor.host}\u0000${actor.node}`;
        if (!nodes.has(key)) nodes.set(key, []);
        nodes.get(key).push(actor);
      }
      const blocks = [...nodes.values()].map((actors) => {
        const { host, node } = actors[0];
        const title = host || node ? `${host}${node ? ` · node ${node.slice(0, 12)}` : ""}`
          : "Not placed yet (reported with the first task)";
        const working = actors.filter((a) => a.busy).length;
        return el("section", { className: "node", "aria-label": `Node ${title}` },
          el("h2", { text: title }, el("span", { className: "count",
            text: ` ${working} of ${actors.length} busy` })),
          el("table", { className: "actors stack" },
            el("thead", {}, el("tr", {}, el("th", { scope: "col", text: "Actor" }),
              el("th", { scope: "col", text: "Device" }), el("th", { scope: "col", text: "Now" }))),
            el("tbody", {}, ...actors.map((a) => el("tr", { "data-actor": a.index },
              el("td", { "data-label": "Actor", text: String(a.index) }),
              el("td", { "data-label": "Device", text: a.device || "—" }),
              el("td", { "data-label": "Now" }, el("span", {
                className: `state ${a.busy ? "state-processing" : "state-idle"}`,
                text: a.busy ? "busy" : "idle" })))))));
      });
      $("farm-nodes").replaceChildren(...blocks);
    }

    load();
    const timer = setInterval(load, FARM_REFRESH_MS);
    cleanups.push(() => { active = false; clearInterval(timer); });
    return "farm";
  }

  // -- start -----------------------------------------------------------------------------

  (async () => {
    try {
      setSignedIn(await call("GET", "/session"));
    } catch (error) {
      if (error.status !== 401) showNotice(error.message);
      if (!me) {
        showSignIn("");
        return;
      }
    }
    route(false);
  })();
})();
