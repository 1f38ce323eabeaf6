/* The dashboard of flask-multiprocess-controller.
 *
 * Served at <prefix>/ with every URL it calls relative to that page, so it works under any
 * MPC_URL_PREFIX and SCRIPT_NAME. It follows <prefix>/events with one EventSource and updates
 * what it shows from the task objects the events carry (no polling). Everything a task or a
 * client wrote is put in the page as text (textContent), never parsed as HTML.
 */
"use strict";

(function () {
  const PAGE = 100;                 // tasks per page of the list
  const LOG_LINES = 500;            // log lines kept on a task page
  const DISCONNECTED_AFTER = 1500;  // ms an event stream error lasts before the page says so
  const TERMINAL = ["succeeded", "failed", "stopped", "timed_out", "lost"];
  const KINDS = ["queued", "started", "progress", "stopping", "paused", "resumed", "requeued", "adopted", "ended"];
  const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i;
  const PREFIX = /^[0-9a-f-]{4,}$/i;

  const $ = (id) => document.getElementById(id);
  const state = {
    tasks: new Map(),   // uuid -> task object shown in the list
    rows: new Map(),    // uuid -> <tr>
    next: null,         // cursor of the next (older) page
    stats: null,        // the chart's counts
    current: null,      // uuid of the task page shown, or null
    shown: null,        // the task object the task page shows
    readings: 0,        // reads of the list's first page started so far
    reading: false,     // one is on its way
    missed: [],         // [kind, task] of the events received meanwhile
    log: null,          // EventSource of the task page's log
    logAfter: 0,
    healthTimer: null,
    statsTimer: null,
    positionsTimer: null,
    limits: {},         // controller name -> its max_memory (bytes, or null), from the health answer
  };

  // -- small helpers -----------------------------------------------------------------------------

  function el(tag, text, cls) {
    const node = document.createElement(tag);
    if (text !== undefined && text !== null) node.textContent = String(text);
    if (cls) node.className = cls;
    return node;
  }

  function clear(node) {
    while (node.firstChild) node.removeChild(node.firstChild);
    return node;
  }

  async function api(path, options) {
    const response = await fetch(path, Object.assign({headers: {"Accept": "application/json"}}, options || {}));
    let body = null;
    try { body = await response.json(); } catch (e) { body = null; }
    if (!response.ok) {
      const message = body && typeof body.message === "string" ? body.message : response.status + " " + response.statusText;
      const error = new Error(message);
      error.status = response.status;
      throw error;
    }
    return body;
  }

  function banner(message) {
    const node = $("banner");
    node.textContent = message || "";
    node.hidden = !message;
  }

  function show(value) {
    if (value === null || value === undefined) return "";
    return typeof value === "string" ? value : JSON.stringify(value);
  }

  function pretty(value) {
    if (value === null || value === undefined) return "—";
    return typeof value === "string" ? value : JSON.stringify(value, null, 2);
  }

  function relative(iso) {
    if (!iso) return "";
    const seconds = Math.round((Date.now() - Date.parse(iso)) / 1000);
    const ago = seconds >= 0;
    let n = Math.abs(seconds);
    let unit = "s";
    if (n >= 86400) { n = Math.floor(n / 86400); unit = "d"; }
    else if (n >= 3600) { n = Math.floor(n / 3600); unit = "h"; }
    else if (n >= 60) { n = Math.floor(n / 60); unit = "min"; }
    return ago ? n + " " + unit + " ago" : "in " + n + " " + unit;
  }

  function timeCell(iso) {
    const node = el("time", relative(iso), "rel");
    if (iso) {
      node.dateTime = iso;
      node.title = new Date(iso).toLocaleString() + " (" + iso + ")";
    }
    return node;
  }

  function duration(task) {
    if (!task.started_at) return "";
    const end = task.ended_at ? Date.parse(task.ended_at) : Date.now();
    let s = Math.max(0, (end - Date.parse(task.started_at)) / 1000);
    if (s < 60) return s.toFixed(s < 10 ? 1 : 0) + " s";
    if (s < 3600) return Math.floor(s / 60) + " min " + Math.round(s % 60) + " s";
    return Math.floor(s / 3600) + " h " + Math.round((s % 3600) / 60) + " min";
  }

  function bytes(n) {
    if (n === null || n === undefined) return "—";
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
    return n.toFixed(i ? 1 : 0) + " " + units[i];
  }

  function statusBadge(status) {
    return el("span", status ? status.replace("_", " ") : "", "status status-" + (status || "unknown"));
  }

  function progressBar(task) {
    if (typeof task.percent !== "number" && TERMINAL.includes(task.status) && task.status !== "succeeded") {
      return el("span", "—", "muted");  // it ended without saying how far it got
    }
    const bar = document.createElement("progress");
    bar.max = 100;
    if (typeof task.percent === "number") {
      bar.value = task.percent;
      bar.textContent = Math.round(task.percent) + " %";
      bar.title = task.percent.toFixed(1) + " %";
    } else if (task.status === "succeeded") {
      bar.value = 100;
    } else if (task.status === "queued") {
      bar.value = 0;
    }  // else running without a percent: an indeterminate bar
    bar.setAttribute("aria-label", "progress of task " + task.uuid);
    bar.className = "bar status-" + task.status;
    return bar;
  }

  // -- connection --------------------------------------------------------------------------------

  const connection = {
    source: null,
    down: false,       // the page says "disconnected"
    opens: 0,          // streams opened so far
    timer: null,

    start() {
      this.source = new EventSource("events");
      this.source.addEventListener("open", () => this.opened());
      this.source.addEventListener("error", () => this.failed());
      for (const kind of KINDS) this.source.addEventListener(kind, (e) => onTaskEvent(kind, e));
      this.source.addEventListener("purged", (e) => onPurged(e));
      this.source.addEventListener("reset", () => refresh());
    },

    opened() {
      clearTimeout(this.timer);
      this.timer = null;
      const first = !this.opens++;
      const wasDown = this.down;
      this.setDown(false);
      // The list was read before the stream was open, so events between the two were missed: read it
      // again now. After a short drop the browser resumes with Last-Event-ID and the server replays
      // what was missed; after a disconnection that showed, read everything again anyway.
      if (first || wasDown) refresh();
    },

    failed() {
      // A stream ending after its maximum wait reconnects at once: only a lasting error is shown.
      // Retries fail again every second while the server is away: the first failure starts the clock.
      if (this.timer === null && !this.down) {
        this.timer = setTimeout(() => { this.timer = null; this.setDown(true); }, DISCONNECTED_AFTER);
      }
      if (this.source.readyState === EventSource.CLOSED) {
        // The server answered but not with a stream (a proxy's error page, a restart in progress):
        // EventSource gives up, we do not.
        this.source.close();
        setTimeout(() => this.start(), 1000);
      }
    },

    setDown(down) {
      this.down = down;
      const node = $("connection");
      node.textContent = down ? "disconnected — reconnecting" : "live";
      node.className = "connection " + (down ? "down" : "up");
      document.body.classList.toggle("disconnected", down);
    },
  };

  // An answer and an event about one task may arrive in either order (a DELETE's "stopping" after the
  // event of its end): an ended task never goes back to an earlier state.
  function stale(shown, task) {
    return Boolean(shown) && TERMINAL.includes(shown.status) && !TERMINAL.includes(task.status);
  }

  // An event carries what changed (a progress write its progress, an end the task but its args): it is
  // merged into the task shown, as a whole task object from an answer is.
  function showTask(task) {
    const listed = state.tasks.get(task.uuid);
    if (state.rows.has(task.uuid) && !stale(listed, task)) {
      const merged = Object.assign({}, listed, task);
      if (merged.status === "queued" && merged.position === null && listed.status === "queued") {
        merged.position = listed.position;  // events carry no position: the last one read stays until loadPositions
      }
      state.tasks.set(task.uuid, merged);
      fillRow(state.rows.get(task.uuid), merged);
    }
    if (state.current !== task.uuid || stale(state.shown, task)) return;
    const shown = Object.assign({}, state.shown && state.shown.uuid === task.uuid ? state.shown : {}, task);
    // Events carry no queue position (it moves with every other task): read it with the task.
    if (shown.status === "queued" && shown.position === null) openTask(task.uuid); else renderTask(shown);
  }

  function onTaskEvent(kind, event) {
    let task;
    try { task = JSON.parse(event.data); } catch (e) { return; }
    if (!task || typeof task.uuid !== "string") return;
    if (state.reading) state.missed.push([kind, task]);  // applied again once the list read lands
    applyEvent(kind, task);
    if (kind === "ended") soon("statsTimer", loadStats, 1000);  // at most one read of the counts a second
    if (kind !== "progress") soon("positionsTimer", loadPositions, 1000);  // the queue moved
    soon("healthTimer", loadHealth, 500);
  }

  function applyEvent(kind, task) {
    if (!state.tasks.has(task.uuid) && kind === "queued" && matchesFilters(task)) addRow(task, true);
    showTask(task);
  }

  function onPurged(event) {
    let data;
    try { data = JSON.parse(event.data); } catch (e) { return; }
    const row = data && state.rows.get(data.uuid);
    if (row) {
      row.remove();
      state.rows.delete(data.uuid);
      state.tasks.delete(data.uuid);
    }
  }

  function soon(name, fn, delay) {
    if (state[name]) return;
    state[name] = setTimeout(() => { state[name] = null; fn(); }, delay);
  }

  function refresh() {
    loadHealth();
    loadStats();
    loadSchedules();
    loadUsage();
    loadTasks(false);
    if (state.current) openTask(state.current);
  }

  // -- controllers -------------------------------------------------------------------------------

  async function loadHealth() {
    let health;
    try {
      health = await fetch("health").then((r) => r.json());
    } catch (e) { return; }
    const box = clear($("controllers"));
    const select = $("filter-controller");
    const chosen = select.value;
    const names = Object.keys(health.controllers || {}).sort();
    keepLimits(health.controllers || {});
    clear(select).appendChild(el("option", "all")).value = "";
    for (const name of names) {
      const info = health.controllers[name];
      const option = el("option", name);
      option.value = name;
      select.appendChild(option);
      box.appendChild(controllerCard(name, info));
    }
    select.value = names.includes(chosen) ? chosen : "";
    if (chosen && select.value !== chosen) onFilter("controller");  // a link's controller that is not served here
    drainedHosts(health.drained_hosts || []);
  }

  // One line per drained host: its serving processes claim no new task until it is undrained.
  function drainedHosts(hosts) {
    const box = clear($("drained-hosts"));
    box.hidden = hosts.length === 0;
    for (const host of hosts) {
      const line = el("p", null, "drained");
      line.dataset.host = host.host;
      line.appendChild(el("span", "drained", "badge"));
      line.appendChild(document.createTextNode(" host " + host.host + " drained since "));
      line.appendChild(timeCell(host.since));
      line.appendChild(document.createTextNode(": it claims no new task; running tasks go on."));
      box.appendChild(line);
    }
  }

  function controllerCard(name, info) {
    const card = el("article", null, "card");
    card.dataset.controller = name;
    card.appendChild(el("h2", name));
    if (info.status === "unavailable") {
      card.appendChild(el("p", "store unavailable: " + (info.message || ""), "bad"));
      return card;
    }
    const stats = el("dl", null, "counts");
    const pairs = [["running", info.running + " / " + info.max_num_process], ["queued", info.queued]];
    for (const [term, value] of pairs) {
      const div = el("div");
      div.appendChild(el("dt", term));
      div.appendChild(el("dd", value, "count-" + term));
      stats.appendChild(div);
    }
    card.appendChild(stats);
    const meter = document.createElement("meter");
    meter.min = 0;
    meter.max = Math.max(1, info.max_num_process);
    meter.value = info.running;
    meter.title = info.running + " of " + info.max_num_process + " slots busy";
    card.appendChild(meter);
    card.appendChild(el("p", info.store, "store"));
    const stop = el("button", "Stop all", "danger");
    stop.type = "button";
    stop.addEventListener("click", () => stopAll(name));
    card.appendChild(stop);
    return card;
  }

  async function stopAll(name) {
    if (!window.confirm("Stop every queued and running task of " + name + "?")) return;
    try {
      const answer = await api("api/tasks?controller=" + encodeURIComponent(name) + "&all=true", {method: "DELETE"});
      banner("Stopped " + answer.stopped + " queued task(s); " + answer.stopping + " running task(s) stopping.");
      setTimeout(() => banner(""), 5000);
    } catch (e) { banner(e.message); }
  }

  // -- the task list -----------------------------------------------------------------------------

  function listQuery(before) {
    const params = new URLSearchParams({limit: String(PAGE)});
    if ($("filter-controller").value) params.set("controller", $("filter-controller").value);
    if ($("filter-status").value) params.set("status", $("filter-status").value);
    if (before) params.set("before", String(before));
    return "api/tasks?" + params.toString();
  }

  function matchesFilters(task) {
    const controller = $("filter-controller").value;
    const statuses = $("filter-status").value;
    return (!controller || task.controller === controller) && (!statuses || statuses.split(",").includes(task.status));
  }

  async function loadTasks(older) {
    // Events that arrive while the first page is read may be newer than what it answers: they are
    // kept and applied again on top of it. Only the latest of overlapping reads is shown.
    const reading = older ? null : ++state.readings;
    if (reading) { state.reading = true; state.missed = []; }
    let page;
    try {
      page = await api(listQuery(older ? state.next : null));
    } catch (e) {
      if (reading === state.readings) state.reading = false;
      banner(e.message);
      return;
    }
    if (reading !== null && reading !== state.readings) return;
    if (reading) {
      clear($("task-rows"));
      state.tasks.clear();
      state.rows.clear();
    }
    for (const task of page.tasks) addRow(task, false);
    if (reading) {
      state.reading = false;
      for (const [kind, task] of state.missed) applyEvent(kind, task);
      state.missed = [];
    }
    state.next = page.next;
    $("older").hidden = page.next === null || page.next === undefined;
    applySearch();
  }

  const COLUMNS = ["Task", "Controller", "Status", "Priority", "Progress", "Latest", "Where", "Created", "Started",
                   "Ended", "Waited / ran"];

  function addRow(task, atTop) {
    if (state.rows.has(task.uuid)) return;
    const row = document.createElement("tr");
    for (const label of COLUMNS) {
      const cell = document.createElement("td");
      cell.dataset.label = label;
      row.appendChild(cell);
    }
    state.tasks.set(task.uuid, task);
    state.rows.set(task.uuid, row);
    fillRow(row, task);
    const body = $("task-rows");
    if (atTop) body.insertBefore(row, body.firstChild); else body.appendChild(row);
    applySearch();
  }

  function fillRow(row, task) {
    row.dataset.uuid = task.uuid;
    row.dataset.status = task.status;
    const cells = {};
    for (const cell of row.children) cells[cell.dataset.label] = cell;
    const link = el("a", task.uuid.slice(0, 8), "uuid");
    link.href = "#/tasks/" + task.uuid;
    link.title = task.uuid;
    clear(cells.Task).appendChild(link);
    cells.Controller.textContent = task.controller || "";
    clear(cells.Status).appendChild(statusBadge(task.status));
    cells.Priority.textContent = task.priority === undefined || task.priority === null ? "" : String(task.priority);
    cells.Priority.className = "priority";
    clear(cells.Progress).appendChild(progressCell(task));
    cells.Latest.textContent = show(task.progress).slice(0, 200);
    cells.Latest.className = "latest";
    clear(cells.Where).appendChild(whereCell(task));
    for (const [label, iso] of [["Created", task.created_at], ["Started", task.started_at], ["Ended", task.ended_at]]) {
      clear(cells[label]);
      if (iso) cells[label].appendChild(clockCell(iso));
    }
    fillWaited(cells["Waited / ran"], task);
  }

  // The bar with its percent as text beside it (not only in a tooltip).
  function progressCell(task) {
    const box = el("span", null, "progress-cell");
    box.appendChild(progressBar(task));
    if (typeof task.percent === "number") box.appendChild(el("span", Math.floor(task.percent) + " %", "percent"));
    return box;
  }

  // Where the task stands: its place in the queue while queued, else the host that runs (or ran) it.
  function whereCell(task) {
    if (task.status === "queued") {
      if (typeof task.position === "number") return el("span", "#" + task.position + " in queue", "position");
      if (task.retry_at) {
        const retry = el("span", "retry at ", "position muted");
        retry.appendChild(clockCell(task.retry_at));
        return retry;
      }
      return el("span", "queued", "position muted");
    }
    const host = el("span", task.host || "", "host" + (TERMINAL.includes(task.status) ? " muted" : ""));
    if (task.host) host.title = (TERMINAL.includes(task.status) ? "ran on host " : "runs on host ") + task.host;
    return host;
  }

  // How long the task waited so far (queued for) or ran (running for / ran for); the wait in the queue of
  // a task that started is in the tooltip.
  function fillWaited(cell, task) {
    const created = Date.parse(task.created_at);
    const started = task.started_at ? Date.parse(task.started_at) : null;
    const end = task.ended_at ? Date.parse(task.ended_at) : Date.now();
    let text = "";
    let title = "";
    if (started === null) {
      if (!isNaN(created)) text = (task.ended_at ? "was queued " : "queued for ") + span((end - created) / 1000);
    } else {
      text = (task.ended_at ? "ran " : "running for ") + span((end - started) / 1000);
      if (!isNaN(created)) title = "waited " + span((started - created) / 1000) + " in the queue";
    }
    cell.textContent = text;
    cell.title = title;
    cell.className = "waited";
  }

  function span(seconds) {
    const s = Math.max(0, seconds);
    if (s < 60) return s.toFixed(s < 10 ? 1 : 0) + " s";
    if (s < 3600) return Math.floor(s / 60) + " min " + Math.floor(s % 60) + " s";
    if (s < 86400) return Math.floor(s / 3600) + " h " + Math.floor((s % 3600) / 60) + " min";
    return Math.floor(s / 86400) + " d " + Math.floor((s % 86400) / 3600) + " h";
  }

  // -- absolute times, in the browser's zone ---------------------------------------------------------

  function two(n) { return String(n).padStart(2, "0"); }

  // "UTC+05:30": the browser's offset from UTC at that moment (daylight saving time included).
  function utcOffset(date) {
    const minutes = -date.getTimezoneOffset();
    const sign = minutes < 0 ? "-" : "+";
    return "UTC" + sign + two(Math.floor(Math.abs(minutes) / 60)) + ":" + two(Math.abs(minutes) % 60);
  }

  function zoneName() {
    try { return Intl.DateTimeFormat().resolvedOptions().timeZone || ""; } catch (e) { return ""; }
  }

  function localDay(date) { return date.getFullYear() + "-" + two(date.getMonth() + 1) + "-" + two(date.getDate()); }

  // The local time of day for today's times, the date and time otherwise; the exact local time with its
  // offset, and UTC, in the tooltip.
  function clockCell(iso) {
    const date = new Date(iso);
    const time = two(date.getHours()) + ":" + two(date.getMinutes()) + ":" + two(date.getSeconds());
    const today = localDay(date) === localDay(new Date());
    const node = el("time", today ? time : localDay(date) + " " + time, "abs");
    node.dateTime = iso;
    node.title = localDay(date) + " " + time + " " + utcOffset(date) + " (" + relative(iso) + ")\n" +
      date.toISOString().replace("T", " ").replace(/\.\d+Z$/, " UTC");
    return node;
  }

  function showZone() {
    const zone = zoneName();
    $("time-zone").textContent = "Times are in " + (zone ? zone + " (" + utcOffset(new Date()) + ")" : utcOffset(new Date())) +
      "; hover one for UTC.";
  }

  function applySearch() {
    const text = $("search").value.trim().toLowerCase();
    const prefix = PREFIX.test(text) ? text : "";
    let shown = 0;
    for (const [uuid, row] of state.rows) {
      row.hidden = Boolean(prefix) && !uuid.startsWith(prefix);
      if (!row.hidden) shown++;
    }
    searchHint(text);
    emptyList(shown, prefix);
  }

  // The queue moves with every start, end and new task: read the places of the queued tasks the list shows
  // again (at most once a second, one read per controller), changing nothing else of them.
  async function loadPositions() {
    const controllers = new Set();
    for (const task of state.tasks.values()) if (task.status === "queued") controllers.add(task.controller);
    for (const controller of controllers) {
      let page;
      try {
        page = await api("api/tasks?" + new URLSearchParams({status: "queued", controller: controller, limit: String(PAGE)}));
      } catch (e) { continue; }
      for (const task of page.tasks) {
        const listed = state.tasks.get(task.uuid);
        if (!listed || listed.status !== "queued" || listed.position === task.position) continue;
        listed.position = task.position;
        fillRow(state.rows.get(task.uuid), listed);
      }
    }
  }

  // A search the box cannot use says what it takes (rather than silently showing every task).
  function searchHint(text) {
    let hint = "";
    if (text && !PREFIX.test(text)) {
      hint = /^[0-9a-f-]*$/.test(text)
        ? "Type at least 4 hex digits of a task's uuid (or the whole uuid)."
        : "A uuid has only hex digits (0-9, a-f) and dashes: type its first 4 or more, or the whole uuid.";
    }
    $("search-hint").textContent = hint;
    $("search-hint").hidden = !hint;
    $("search").setAttribute("aria-invalid", hint ? "true" : "false");
  }

  // What an empty list says: nothing matched the search or filters, or there is no task yet (then how to
  // queue one).
  function emptyList(shown, prefix) {
    const empty = $("list-empty");
    const filtered = Boolean($("filter-controller").value || $("filter-status").value);
    const none = shown === 0 && !prefix && !filtered && state.rows.size === 0 && !state.next;
    empty.hidden = shown > 0 || none;
    if (prefix) {
      empty.textContent = "No task loaded here starts with " + prefix +
        (state.next ? "; load older tasks to search further back." : ".");
    } else {
      empty.textContent = filtered ? "No tasks match these filters." : "No tasks yet.";
    }
    $("submit-hint").hidden = !none;
    if (none) submitHint();
  }

  let hintRead = null;  // the hint is made once, from the app's OpenAPI document

  function submitHint() {
    if (hintRead) return;
    hintRead = api("openapi.json").then(fillSubmitHint, () => fillSubmitHint(null));
  }

  // A curl command queueing a task on the first resource the app mounts (with its arguments' defaults),
  // or a pointer to the API description when the app describes none.
  function fillSubmitHint(doc) {
    const box = clear($("submit-hint"));
    const found = doc ? firstResource(doc) : null;
    if (!found) {
      box.appendChild(el("span", "Queue a task with a POST of its arguments (a JSON object) to a resource of the app; "));
      const link = el("a", "the API description");
      link.href = "openapi.json";
      box.appendChild(link);
      box.appendChild(el("span", " lists them, and the task shows up here at once."));
      return;
    }
    const url = new URL(((doc.servers && doc.servers[0] && doc.servers[0].url) || "").replace(/\/$/, "") + found.path,
                        location.href).href;
    const body = JSON.stringify(found.example).replace(/'/g, "'\\''");
    box.appendChild(el("p", "No tasks yet. Queue one (it shows up here at once):"));
    box.appendChild(el("pre", "curl -X POST '" + url + "' -H 'Content-Type: application/json' -d '" + body + "'", "curl"));
  }

  function firstResource(doc) {
    const schemas = (doc.components && doc.components.schemas) || {};
    for (const [path, operations] of Object.entries(doc.paths || {})) {
      const post = operations.post;
      if (path.includes("{") || !post || !post.requestBody) continue;
      let schema = ((post.requestBody.content || {})["application/json"] || {}).schema || {};
      if (schema.oneOf) schema = schema.oneOf[0];
      const name = schema.$ref ? schema.$ref.split("/").pop() : "";
      return {path: path, example: example(schemas[name] || schema)};
    }
    return null;
  }

  // Arguments to show: each one's default, or a placeholder of its type when it has none.
  function example(schema) {
    const body = {};
    const required = schema.required || [];
    for (const [name, property] of Object.entries(schema.properties || {})) {
      if (property.deprecated) continue;
      if ("default" in property) body[name] = property.default;
      else if (required.includes(name)) {
        const type = Array.isArray(property.type) ? property.type[0] : property.type;
        body[name] = {string: name, integer: 0, number: 0, boolean: false, array: [], object: {}}[type] ?? null;
      }
    }
    return body;
  }

  function onSearch(event) {
    const text = $("search").value.trim();
    keepFilters();
    if (UUID.test(text)) {
      event.preventDefault();
      location.hash = "#/tasks/" + text.toLowerCase();
      return;
    }
    applySearch();
  }

  // -- the filters in the page's URL (?controller=&status=&q=): a reload or a shared link keeps them --------

  function keepFilters() {
    const params = new URLSearchParams(location.search);
    for (const [key, value] of [["controller", $("filter-controller").value], ["status", $("filter-status").value],
                                ["q", $("search").value.trim()]]) {
      if (value) params.set(key, value); else params.delete(key);
    }
    const query = params.toString();
    history.replaceState(history.state, "", location.pathname + (query ? "?" + query : "") + location.hash);
  }

  function readFilters() {
    const params = new URLSearchParams(location.search);
    const controller = params.get("controller") || "";
    if (controller) {
      // The controllers' names come with the health read: until then, the one asked for is the only choice.
      const option = el("option", controller);
      option.value = controller;
      $("filter-controller").appendChild(option);
      $("filter-controller").value = controller;
    }
    const status = params.get("status") || "";
    const select = $("filter-status");
    if (status && !Array.from(select.options).some((option) => option.value === status)) {
      const option = el("option", status.split(",").join(", ").replace(/_/g, " "));  // a list of statuses, as the API takes
      option.value = status;
      select.appendChild(option);
    }
    select.value = status;
    $("search").value = params.get("q") || "";
  }

  function onFilter(which) {
    keepFilters();
    loadTasks(false);
    if (which === "controller") loadStats();
  }

  // -- the chart ---------------------------------------------------------------------------------

  const OUTCOMES = ["succeeded", "failed", "stopped", "timed_out", "lost"];

  async function loadStats() {
    const controller = $("filter-controller").value;
    try {
      state.stats = await api("api/stats" + (controller ? "?controller=" + encodeURIComponent(controller) : ""));
    } catch (e) { return; }
    state.stats.skew = Date.parse(state.stats.now) - Date.now();
    drawChart();
  }

  // As minutes pass, the chart's window moves on by itself: a new, empty minute on the right.
  function advanceChart() {
    const stats = state.stats;
    if (!stats) return;
    let moved = false;
    const now = Date.now() + stats.skew;  // the store's clock, whatever this computer's says
    if (now >= Date.parse(stats.since) + 2 * stats.minutes * stats.step * 1000) {
      loadStats();  // far behind (a laptop that slept): read it all again
      return;
    }
    while (now >= Date.parse(stats.since) + stats.minutes * stats.step * 1000) {
      for (const counts of Object.values(stats.counts)) { counts.shift(); counts.push(0); }
      stats.since = new Date(Date.parse(stats.since) + stats.step * 1000).toISOString();
      moved = true;
    }
    if (moved) drawChart();
  }

  function svg(tag, attributes) {
    const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
    for (const [key, value] of Object.entries(attributes || {})) node.setAttribute(key, String(value));
    return node;
  }

  // The chart's height follows its tallest minute: a few tasks take a strip, a busy hour the full height.
  function chartHeight(top) {
    return Math.min(110, 16 + 14 * top);
  }

  function drawChart() {
    const stats = state.stats;
    const box = clear($("chart"));
    if (!stats) return;
    const slots = stats.minutes;
    const totals = [];
    for (let i = 0; i < slots; i++) totals.push(OUTCOMES.reduce((sum, s) => sum + (stats.counts[s] ? stats.counts[s][i] : 0), 0));
    const top = Math.max(1, ...totals);
    const total = totals.reduce((a, b) => a + b, 0);
    if (total === 0) {
      box.appendChild(el("p", "No task ended in the last " + slots + " minutes.", "chart-empty"));
      return;
    }
    const width = 1200, height = chartHeight(top), pad = 18;
    const chart = svg("svg", {viewBox: "0 0 " + width + " " + (height + pad), role: "img", class: "chart-svg"});
    chart.appendChild(svg("title")).textContent = total + " tasks ended in the last " + slots + " minutes";
    const barWidth = width / slots;
    for (let i = 0; i < slots; i++) {
      let y = height;
      for (const status of OUTCOMES) {
        const n = stats.counts[status] ? stats.counts[status][i] : 0;
        if (!n) continue;
        const h = (n / top) * (height - 4);
        y -= h;
        const rect = svg("rect", {x: (i * barWidth + 0.5).toFixed(2), y: y.toFixed(2), width: Math.max(1, barWidth - 1).toFixed(2),
                                  height: h.toFixed(2), class: "fill-" + status});
        const minute = new Date(Date.parse(stats.since) + i * stats.step * 1000);
        rect.appendChild(svg("title")).textContent = n + " " + status + " at " + minute.toLocaleTimeString();
        chart.appendChild(rect);
      }
    }
    chart.appendChild(svg("line", {x1: 0, y1: height, x2: width, y2: height, class: "axis"}));
    const left = svg("text", {x: 0, y: height + 14, class: "tick"});
    left.textContent = "-" + slots + " min";
    const right = svg("text", {x: width, y: height + 14, class: "tick end"});
    right.textContent = "now";
    const peak = svg("text", {x: 2, y: 10, class: "tick"});
    peak.textContent = "max " + top + "/min";
    chart.appendChild(left);
    chart.appendChild(right);
    chart.appendChild(peak);
    box.appendChild(chart);
    const legend = el("p", null, "legend");
    for (const status of OUTCOMES) {
      const sum = (stats.counts[status] || []).reduce((a, b) => a + b, 0);
      if (sum) legend.appendChild(el("span", status.replace("_", " ") + " " + sum, "key key-" + status));
    }
    box.appendChild(legend);
  }

  // -- schedules ---------------------------------------------------------------------------------

  async function loadSchedules() {
    let found;
    try { found = (await api("api/schedules")).schedules; } catch (e) { return; }
    const body = clear($("schedule-rows"));
    for (const info of found) {
      const row = document.createElement("tr");
      const when = info.cron ? "cron " + info.cron + " (" + info.tz + ")" : "every " + info.every + " s";
      const cells = [info.name, info.controller, when, info.active ? "active" : "inactive"];
      for (let i = 0; i < cells.length; i++) {
        const cell = el("td", cells[i]);
        cell.dataset.label = ["Name", "Controller", "When", "Active"][i];
        if (i === 3) cell.className = info.active ? "ok" : "muted";
        row.appendChild(cell);
      }
      for (const [label, iso] of [["Next", info.next_firing], ["Last", info.last_firing]]) {
        const cell = document.createElement("td");
        cell.dataset.label = label;
        cell.appendChild(timeCell(iso));
        row.appendChild(cell);
      }
      const skipped = el("td", info.skipped || 0);
      skipped.dataset.label = "Skipped";
      row.appendChild(skipped);
      body.appendChild(row);
    }
    $("schedules-empty").hidden = found.length > 0;
  }

  // -- quota usage (controllers with a tenant_quota) ----------------------------------------------

  async function loadUsage() {
    let found;
    try { found = (await api("api/usage")).usage; } catch (e) { return; }
    const body = clear($("usage-rows"));
    let shown = 0;
    for (const info of found) {
      if (info.quota === null) continue;
      for (const tenant of info.tenants) {
        const row = document.createElement("tr");
        const cells = [
          ["Controller", info.controller], ["Tenant", tenant.tenant === null ? "—" : tenant.tenant],
          ["CPU seconds", tenant.cpu_seconds.toFixed(1)], ["Quota", info.quota + " per " + info.window + " s"],
          ["State", tenant.over ? "over quota, free in " + tenant.retry_after + " s" : "within quota"]];
        for (const [label, text] of cells) {
          const cell = el("td", text);
          cell.dataset.label = label;
          if (label === "State") cell.className = tenant.over ? "bad" : "ok";
          row.appendChild(cell);
        }
        body.appendChild(row);
        shown++;
      }
    }
    $("usage-panel").hidden = shown === 0;
  }

  // -- the task page -----------------------------------------------------------------------------

  async function openTask(uuid) {
    let task;
    try {
      task = await api("api/tasks/" + encodeURIComponent(uuid));
    } catch (e) {
      banner(e.message);
      return;
    }
    if (state.current !== uuid) return;
    if (!stale(state.shown, task)) renderTask(task);
  }

  function followLog(uuid) {
    closeLog();
    clear($("task-log"));
    state.logAfter = 0;
    $("log-state").textContent = "following…";
    const source = new EventSource("api/tasks/" + encodeURIComponent(uuid) + "/logs?follow=1");
    state.log = source;
    source.addEventListener("line", (event) => {
      let data;
      try { data = JSON.parse(event.data); } catch (e) { return; }
      if (data.n <= state.logAfter) return;  // a reconnected stream starts again from the first line
      state.logAfter = data.n;
      appendLog(data.line);
    });
    source.addEventListener("end", () => {
      $("log-state").textContent = "(task ended)";
      closeLog();
    });
  }

  function appendLog(line) {
    const log = $("task-log");
    const atBottom = log.scrollTop + log.clientHeight >= log.scrollHeight - 4;
    log.appendChild(document.createTextNode(String(line) + "\n"));
    while (log.childNodes.length > LOG_LINES) log.removeChild(log.firstChild);
    if (atBottom) log.scrollTop = log.scrollHeight;
  }

  function closeLog() {
    if (state.log) state.log.close();
    state.log = null;
  }

  function field(list, term, value) {
    const div = el("div");
    div.appendChild(el("dt", term));
    const dd = el("dd");
    if (value instanceof Node) dd.appendChild(value); else dd.textContent = value === null || value === undefined || value === "" ? "—" : String(value);
    div.appendChild(dd);
    list.appendChild(div);
  }

  // A task's attempt after the first begins from the state an earlier one saved (save_state); the time
  // shown is the latest save, the attempt's own ones included. The state itself is never sent to the page.
  function resumedFrom(task) {
    if (!task.state_saved_at || !(task.attempt > 1)) return null;
    const span = el("span", "resumed from state saved at ");
    span.appendChild(timeCell(task.state_saved_at));
    return span;
  }

  function renderTask(task) {
    state.shown = task;
    $("task-uuid").textContent = task.uuid;
    const badge = $("task-status");
    badge.textContent = task.status.replace("_", " ");
    badge.className = "status status-" + task.status;
    clear($("task-bar")).appendChild(progressBar(task));
    $("task-progress-text").textContent = show(task.progress);
    renderActions(task);
    const list = clear($("task-fields"));
    field(list, "Controller", task.controller);
    field(list, "Message", task.msg);
    field(list, "Priority", task.priority);
    field(list, "Position", task.position);
    waitingFields(list, task);
    field(list, "Attempt", task.attempt);
    field(list, "Retry at", task.retry_at ? timeCell(task.retry_at) : null);
    field(list, "Resumed", resumedFrom(task));
    field(list, "State saved", task.state_saved_at ? timeCell(task.state_saved_at) : null);
    field(list, "Pid", task.pid);
    field(list, "Exit code", task.exit_code);
    usageFields(list, task);
    field(list, "Timeout", typeof task.timeout === "number" ? task.timeout + " s" : null);
    field(list, "Created", task.created_at ? timeCell(task.created_at) : null);
    field(list, "Started", task.started_at ? timeCell(task.started_at) : null);
    field(list, "Ended", task.ended_at ? timeCell(task.ended_at) : null);
    field(list, "Duration", duration(task));
    field(list, "Schedule", task.schedule ? task.schedule.name + " (" + task.schedule.firing + ")" : null);
    if (task.stopped_with_result) field(list, "Finished early", "yes: the result is its answer so far");
    renderRerun(task, list);
    field(list, "Artifacts", artifactLinks(task));
    $("task-args").textContent = pretty(task.args);
    $("task-result").textContent = pretty(task.result);
    renderError(task.error);
    renderRetries(task.errors || []);
  }

  // The files the task saved (save_artifact, artifact_dir), each a download link (served as an attachment,
  // never rendered by the page); the name is shown as text only.
  function artifactLinks(task) {
    if (!task.artifacts || !task.artifacts.length) return null;
    const span = el("span", null, "artifacts");
    task.artifacts.forEach((artifact, i) => {
      if (i) span.appendChild(document.createTextNode(", "));
      const a = el("a", artifact.name, "artifact");
      a.href = "api/tasks/" + encodeURIComponent(task.uuid) + "/artifacts/" + encodeURIComponent(artifact.name);
      a.setAttribute("download", artifact.name);
      a.title = artifact.content_type + ", " + artifact.size + " bytes, sha256 " + artifact.sha256;
      span.appendChild(a);
    });
    return span;
  }

  function renderError(error) {
    $("task-error-panel").hidden = !error;
    if (!error) return;
    $("task-error").textContent = (error.type ? error.type + ": " : "") + show(error.message);
    const hidden = !error.traceback;
    $("task-traceback").hidden = hidden;
    $("task-traceback").textContent = error.traceback || "";
    $("task-traceback-note").hidden = !hidden;
    $("task-traceback-note").textContent = tracebackNote(error);
  }

  // Where an operator finds a traceback this page does not show: the task's log (below) and the server's log
  // (a WARNING line "Task <uuid> ended failed: ..." followed by it). The package's own errors (a crash, a
  // timeout, the memory limit) have none.
  function tracebackNote(error) {
    if (OWN_ERRORS.includes(error.type)) return "No traceback: the task did not raise (" + error.type + ").";
    return "Traceback hidden: it is in the task's log below and in the server's log (a WARNING line " +
      "\"Task … ended …\" followed by the traceback). Set MPC_EXPOSE_TRACEBACKS = True in the app's config " +
      "(or expose_tracebacks=True on the controller) to show it here.";
  }

  function renderRetries(errors) {
    $("task-retries-panel").hidden = errors.length === 0;
    const list = clear($("task-retries"));
    for (const error of errors) {
      const item = el("li");
      const head = (error.attempt !== undefined ? "attempt " + error.attempt + ": " : "") +
        (error.type ? error.type + ": " : "") + show(error.message);
      item.appendChild(el("span", head));
      if (error.traceback) item.appendChild(el("pre", error.traceback));
      list.appendChild(item);
    }
  }

  function button(label, cls, action) {
    const node = el("button", label, cls);
    node.type = "button";
    node.addEventListener("click", action);
    return node;
  }

  function renderActions(task) {
    const box = clear($("task-actions"));
    const uuid = task.uuid;
    if (["queued", "running", "paused"].includes(task.status)) {
      box.appendChild(button("Stop", "danger stop", async () => {
        if (!window.confirm("Stop task " + uuid + "?")) return;
        await change(uuid, {method: "DELETE"});
      }));
    }
    // "Finish now": a running task returns its best answer so far (kept as its result) and ends stopped.
    if (["running", "paused"].includes(task.status)) {
      box.appendChild(button("Finish now", "finish", async () => {
        if (!window.confirm("Finish task " + uuid + " now, keeping its result so far?")) return;
        await change(uuid, {method: "DELETE", query: "?finish=true"});
      }));
    }
    if (task.status === "running") box.appendChild(button("Pause", "pause", () => patch(uuid, {status: "paused"})));
    if (task.status === "paused") box.appendChild(button("Resume", "resume", () => patch(uuid, {status: "running"})));
    if (task.status === "queued") {
      const input = el("input");
      input.type = "number";
      input.step = "1";
      input.value = String(task.priority);
      input.setAttribute("aria-label", "priority");
      input.className = "priority";
      box.appendChild(input);
      box.appendChild(button("Set priority", "reprioritise", () => {
        const value = Number(input.value);
        if (!Number.isInteger(value)) { banner("A priority is an integer (lower runs first)."); return; }
        patch(uuid, {priority: value});
      }));
    }
  }

  // "Run again" for an ended task (POST api/tasks/<uuid>/rerun queues a new one with its arguments, then the
  // page shows the new task), and the links between a task and its reruns, both ways.
  function renderRerun(task, list) {
    const link = (uuid) => {
      const a = el("a", uuid.slice(0, 8), "uuid");
      a.href = "#/tasks/" + uuid;
      a.title = uuid;
      return a;
    };
    if (task.rerun_of) field(list, "Rerun of", link(task.rerun_of));
    if (task.reruns && task.reruns.length) {
      const span = el("span", null, "reruns");
      task.reruns.forEach((uuid, i) => { if (i) span.appendChild(document.createTextNode(", ")); span.appendChild(link(uuid)); });
      field(list, "Reruns", span);
    }
    if (!TERMINAL.includes(task.status)) return;
    $("task-actions").appendChild(button("Run again", "rerun", async () => {
      try {
        const created = await api("api/tasks/" + encodeURIComponent(task.uuid) + "/rerun", {method: "POST"});
        banner("");
        location.hash = "#/tasks/" + created.uuid;
      } catch (e) { banner(e.message); }
    }));
  }

  function patch(uuid, body) {
    return change(uuid, {method: "PATCH", body: JSON.stringify(body), headers: {"Content-Type": "application/json", "Accept": "application/json"}});
  }

  async function change(uuid, options) {
    try {
      const {query, ...rest} = options;
      const task = await api("api/tasks/" + encodeURIComponent(uuid) + (query || ""), rest);
      banner("");
      showTask(task);
    } catch (e) { banner(e.message); }
  }

  // -- why a task waits, what a running task uses -------------------------------------------------

  const OWN_ERRORS = ["ProcessDied", "TaskTimeout", "MemoryLimitExceeded", "ResultTooLarge", "Shutdown", "Killed",
    "Lost", "PauseExpired"];
  const WAITING = {
    slot: "a free place (every place is taken, or tasks are ahead of it)",
    paused: "a paused task to resume (paused tasks hold every place)",
    retry_at: "its retry time",
    schedule: "its start time",
    drained: "a host to undrain (every serving host is drained)",
    quota: "its tenant's CPU quota (used up for this window)",
    resources: "room on a host for what it declares",
    key: "a running task of its concurrency key to end (max_per_key)",
    tenant: "a running task of its tenant to end (max_per_tenant)",
  };

  function keepLimits(controllers) {
    let changed = false;
    for (const [name, info] of Object.entries(controllers)) {
      if (!info || !("max_memory" in info) || state.limits[name] === info.max_memory) continue;
      state.limits[name] = info.max_memory;
      changed = true;
    }
    // The limits may come after the task page was drawn: draw it again (not a queued one, whose priority box
    // may be in use).
    if (changed && state.shown && state.shown.status !== "queued") renderTask(state.shown);
  }

  // A queued task's waiting_on and eta (estimated from its place and the median run time of recent successes).
  function waitingFields(list, task) {
    if (task.status !== "queued") return;
    const reason = task.waiting_on;
    const detail = task.waiting_for ? " (" + task.waiting_for + ")" : "";
    field(list, "Waiting on", reason ? reason + ": " + (WAITING[reason] || reason) + detail : null);
    field(list, "ETA", task.eta ? timeCell(task.eta) : "unknown (no recent success to measure)");
  }

  // Memory (the peak RSS of the task's process tree so far) and CPU time, live while the task runs: written with
  // its progress or every few seconds. The controller's max_memory stands beside the memory, with a meter.
  function usageFields(list, task) {
    const limit = state.limits[task.controller];
    const peak = typeof task.memory_peak === "number" ? task.memory_peak : null;
    let memory = peak === null ? null : bytes(peak);
    if (limit) {
      const box = el("span", null, "memory");
      box.appendChild(el("span", peak === null ? "—" : bytes(peak), "memory-peak"));
      box.appendChild(el("span", " of " + bytes(limit) + " limit", "memory-limit"));
      if (peak !== null) {
        const meter = document.createElement("meter");
        meter.min = 0;
        meter.max = limit;
        meter.high = limit * 0.8;
        meter.value = Math.min(peak, limit);
        meter.title = Math.round(100 * peak / limit) + "% of max_memory";
        box.appendChild(meter);
      }
      memory = box;
    }
    const live = ["running", "paused", "stopping"].includes(task.status) ? " (so far)" : "";
    field(list, "Memory peak", memory);
    field(list, "CPU time", typeof task.cpu_time === "number" ? task.cpu_time.toFixed(2) + " s" + live : null);
  }

  // A queued task's place, reason and estimate move as other tasks end: read it again now and then.
  function refreshWaiting() {
    if (state.current && state.shown && state.shown.status === "queued") openTask(state.current);
  }

  // -- routing -----------------------------------------------------------------------------------

  function route() {
    const match = /^#\/tasks\/([0-9a-fA-F-]{36})$/.exec(location.hash);
    const uuid = match ? match[1].toLowerCase() : null;
    $("list-view").hidden = Boolean(uuid);
    $("task-view").hidden = !uuid;
    if (uuid !== state.current) { closeLog(); state.shown = null; }
    state.current = uuid;
    if (uuid) {
      clear($("task-fields"));
      openTask(uuid);
      followLog(uuid);
    }
  }

  function tick() {
    advanceChart();
    refreshWaiting();
    for (const node of document.querySelectorAll("time.rel")) node.textContent = relative(node.dateTime);
    for (const [uuid, row] of state.rows) {
      const task = state.tasks.get(uuid);
      if (task && !task.ended_at) fillWaited(row.querySelector('td[data-label="Waited / ran"]'), task);
    }
  }

  function start() {
    readFilters();
    showZone();
    $("filter-controller").addEventListener("change", () => onFilter("controller"));
    $("filter-status").addEventListener("change", () => onFilter("status"));
    $("search").addEventListener("input", onSearch);
    $("filters").addEventListener("submit", (event) => { event.preventDefault(); onSearch(event); });
    $("older").addEventListener("click", () => loadTasks(true));
    window.addEventListener("hashchange", route);
    connection.start();
    loadHealth();
    loadStats();
    loadSchedules();
    loadUsage();
    loadTasks(false);
    route();
    setInterval(tick, 5000);  // relative times only: the data comes from the event stream
  }

  document.addEventListener("DOMContentLoaded", start);
})();
