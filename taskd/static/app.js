// The taskd dashboard: one event stream (/events) draws everything; buttons and the form
// call the JSON API. No framework and no build step, so this file is what the browser runs.
//
// Job data (payloads, errors, types) is untrusted: it only ever reaches the page through
// textContent and attributes, never innerHTML.

"use strict";

// With a [server] token every request needs it, as an Authorization header (never in the
// URL, which ends up in logs and histories). The page asks for it once per tab.
const TOKEN_KEY = "taskd-token";
let token = sessionStorage.getItem(TOKEN_KEY);

function authHeaders() {
  return token ? { Authorization: `Bearer ${token}` } : {};
}

// One point per event (one a second): two minutes of history for the charts.
const HISTORY_POINTS = 120;
// A heartbeat older than this looks suspicious (the default interval is 5 s).
const STALE_HEARTBEAT_MS = 10000;
// Line colours of the charts, one per queue in name order.
const PALETTE = ["#2f7de1", "#e0663a", "#22a06b", "#a35bd6", "#d4a106", "#d6336c", "#0f9fb0"];
// A job in one of these states can still be cancelled.
const CANCELLABLE = new Set(["queued", "scheduled", "active"]);

const $ = (id) => document.getElementById(id);

// Chart history: [{queue: {throughput, waitP99}}, ...], oldest first.
const history = [];
// Job types seen in the stream, offered as suggestions in the form.
const knownTypes = new Set();
// The latest picture, to redraw the charts when the window is resized.
let lastPicture = null;

// ---------------------------------------------------------------- the API

// Calls the JSON API with the token; resolves to the answer's body, or rejects with an
// Error carrying the API's own message (it is written for people, so we show it as is).
async function api(method, path, body) {
  const headers = { Accept: "application/json", ...authHeaders() };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let response;
  try {
    response = await fetch(path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
    });
  } catch (err) {
    throw new Error(`the daemon does not answer (${err.message})`);
  }
  let answer = null;
  try {
    answer = await response.json();
  } catch {
    // Not JSON (a proxy's error page, say): fall back to the status below.
  }
  if (!response.ok) {
    const message = answer && answer.error ? answer.error.message : null;
    throw new Error(message || `HTTP ${response.status} ${response.statusText}`);
  }
  return answer;
}

// Shows the outcome of a button's action in the banner at the top of the page.
function notify(text, isError) {
  const notice = $("notice");
  notice.textContent = text;
  notice.classList.toggle("error", Boolean(isError));
  notice.hidden = false;
  clearTimeout(notify.timer);
  // Successes go away by themselves; errors stay until the next action so they are read.
  if (!isError) notify.timer = setTimeout(() => (notice.hidden = true), 4000);
}

// Runs an action for a button: disabled meanwhile so a double click does not send twice.
async function act(button, doing, method, path) {
  button.disabled = true;
  try {
    await api(method, path);
    notify(doing, false);
  } catch (err) {
    notify(err.message, true);
  } finally {
    button.disabled = false;
  }
}

// ---------------------------------------------------------------- the event stream

// Read with fetch, not EventSource, which cannot send the Authorization header. A stream
// that ends or fails is opened again after a pause; a refused token asks for another.
const RETRY_MS = 2000;

async function connect() {
  try {
    const response = await fetch("/events", { headers: authHeaders(), cache: "no-store" });
    if (response.status === 401) {
      askForToken();
      return;
    }
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    setConnection("live");
    await readEvents(response.body.pipeThrough(new TextDecoderStream()).getReader());
    setConnection("reconnecting");
  } catch {
    setConnection("offline");
  }
  setTimeout(connect, RETRY_MS);
}

// Server-sent events: frames end with a blank line; a "picture" frame's data is JSON.
async function readEvents(reader) {
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const lines = buffer.slice(0, end).split("\n");
      buffer = buffer.slice(end + 2);
      const data = lines.filter((l) => l.startsWith("data: ")).map((l) => l.slice(6));
      if (lines.includes("event: picture") && data.length) render(JSON.parse(data.join("\n")));
    }
  }
}

function askForToken() {
  setConnection(token ? "unauthorized" : "needs_token");
  $("token-form").hidden = false;
  $("token-input").focus();
}

function useToken(event) {
  event.preventDefault();
  token = $("token-input").value.trim();
  sessionStorage.setItem(TOKEN_KEY, token);
  $("token-input").value = "";
  $("token-form").hidden = true;
  setConnection("connecting");
  connect();
}

const CONNECTION_TEXT = {
  connecting: "connecting…",
  live: "live",
  reconnecting: "reconnecting…",
  offline: "offline, retrying soon",
  needs_token: "this daemon needs its token",
  unauthorized: "token refused: enter the right one",
};

function setConnection(state) {
  $("conn").dataset.state = state;
  $("conn-text").textContent = CONNECTION_TEXT[state];
}

// ---------------------------------------------------------------- rendering

function render(picture) {
  lastPicture = picture;
  const stats = picture.stats;
  // Ages are measured against the server's clock, so a skewed laptop clock does not lie.
  const now = Date.parse(stats.time);
  renderMeta(stats);
  renderQueues(stats.queues);
  renderLimits(stats.queues);
  renderUnhandled(stats.queues);
  remember(stats.queues);
  drawCharts();
  renderDaemons(stats.instances);
  renderAutoscale(stats.autoscale);
  renderSchedules(picture.schedules || []);
  // The job list follows the stream, or, filtered, the API (GET /jobs) once per event.
  if (jobFilter) refreshJobs();
  else renderRecent(picture.recent, now);
  renderFailed(picture.failed, now);
  rememberTypes(picture.recent.concat(picture.failed));
  rememberQueues(Object.keys(stats.queues));
  updatePurgeCount();
  // The history's first page, once the stream shows the daemon answers (with the token);
  // or, without an archive, a word saying so (and no request bound to fail).
  if (!historyShown) {
    historyShown = true;
    if (picture.archive) searchHistory();
    else archiveOff();
  }
}

function renderMeta(stats) {
  const redis = stats.redis || {};
  const parts = [];
  if (redis.version) parts.push(`Redis ${redis.version}`);
  if (redis.used_memory != null) parts.push(formatBytes(redis.used_memory));
  parts.push(`updated ${new Date(stats.time).toLocaleTimeString()}`);
  $("meta").textContent = parts.join(" · ");
}

// Updates a table body in place, one row per item, matched by key. Rows are reused
// rather than rebuilt every second, so a button under the pointer or keyboard focus
// survives the next event.
function syncRows(tbodyId, items, keyOf, createRow, updateRow) {
  const tbody = $(tbodyId);
  const existing = new Map();
  for (const row of Array.from(tbody.rows)) existing.set(row.dataset.key, row);
  const wanted = new Set(items.map(keyOf));
  for (const [key, row] of existing) if (!wanted.has(key)) row.remove();
  items.forEach((item, index) => {
    const key = keyOf(item);
    let row = existing.get(key);
    if (!row) {
      row = createRow(item);
      row.dataset.key = key;
    }
    updateRow(row, item);
    // Move only rows out of place: moving a node takes the focus away from it.
    if (tbody.rows[index] !== row) tbody.insertBefore(row, tbody.rows[index] || null);
  });
  // The "nothing here" line next to the table.
  $(tbodyId.replace("-body", "-empty")).hidden = items.length > 0;
}

// A row of empty cells, one per column name; a cell is found again by its data-col.
function makeRow(columns, numeric) {
  const row = document.createElement("tr");
  for (const column of columns) {
    const cell = row.insertCell();
    cell.dataset.col = column;
    if (numeric.includes(column)) cell.className = "num";
  }
  return row;
}

function cell(row, column) {
  return row.querySelector(`[data-col="${column}"]`);
}

// Sets a cell's text, and its tooltip when the text is shortened for display.
function setText(row, column, text, title) {
  const target = cell(row, column);
  const value = text == null ? "" : String(text);
  if (target.textContent !== value) target.textContent = value;
  if (title !== undefined) target.title = title;
}

function makeButton(label, action) {
  const button = document.createElement("button");
  button.type = "button";
  button.className = "small";
  button.textContent = label;
  button.dataset.action = action;
  return button;
}

// ---- queues

const QUEUE_COLUMNS = ["name", "queued", "scheduled", "active", "completed", "failed",
  "cancelled", "rate_limited", "concurrency_limited", "throughput", "wait_p50", "wait_p99",
  "status", "action"];
const QUEUE_COUNTS = ["queued", "scheduled", "active", "completed", "failed", "cancelled"];
// Counters of the queue's totals: how often a job waited for its type's limits.
const LIMIT_WAITS = ["rate_limited", "concurrency_limited"];

function renderQueues(queues) {
  const items = Object.keys(queues).sort().map((name) => ({ name, ...queues[name] }));
  syncRows("queues-body", items, (q) => q.name, createQueueRow, updateQueueRow);
}

function createQueueRow(queue) {
  const row = makeRow(QUEUE_COLUMNS,
    [...QUEUE_COUNTS, ...LIMIT_WAITS, "throughput", "wait_p50", "wait_p99"]);
  const badge = document.createElement("span");
  badge.className = "badge";
  cell(row, "status").append(badge);
  const button = makeButton("Pause", "pause");
  // The row's current state decides, not the state when the row was made.
  button.addEventListener("click", () => {
    const pausing = row.dataset.paused !== "true";
    const verb = pausing ? "pause" : "resume";
    act(button, `Queue ${queue.name}: ${verb} requested`, "POST",
      `/queues/${encodeURIComponent(queue.name)}/${verb}`);
  });
  const purge = makeButton("Purge…", "purge");
  purge.addEventListener("click", () => openPurge(queue.name));
  cell(row, "action").append(button, " ", purge);
  return row;
}

function updateQueueRow(row, queue) {
  setText(row, "name", queue.name);
  for (const count of QUEUE_COUNTS) setText(row, count, formatCount(queue[count]));
  // A counter is absent until it first counts.
  const totals = queue.totals || {};
  for (const count of LIMIT_WAITS) setText(row, count, formatCount(totals[count] || 0));
  const throughput = queue.throughput ? queue.throughput["1m"] : null;
  setText(row, "throughput", throughput == null ? "–" : throughput.toFixed(2));
  const wait = queue.wait_ms || {};
  setText(row, "wait_p50", formatMs(wait.p50));
  setText(row, "wait_p99", formatMs(wait.p99));
  row.dataset.paused = String(Boolean(queue.paused));
  const badge = cell(row, "status").firstChild;
  badge.textContent = queue.paused ? "paused" : "running";
  badge.className = queue.paused ? "badge paused" : "badge running";
  const button = cell(row, "action").firstChild;
  button.textContent = queue.paused ? "Resume" : "Pause";
  button.dataset.action = queue.paused ? "resume" : "pause";
}

// ---- limits

const LIMIT_COLUMNS = ["type", "queue", "concurrency", "running", "held", "rate", "started",
  "rate_limited", "concurrency_limited"];

// One row per limited job type of each queue; the card shows only when there is one.
function renderLimits(queues) {
  const items = [];
  for (const queue of Object.keys(queues).sort()) {
    const limits = queues[queue].limits || {};
    for (const type of Object.keys(limits).sort()) items.push({ queue, type, ...limits[type] });
  }
  syncRows("limits-body", items, (l) => `${l.queue}/${l.type}`,
    () => makeRow(LIMIT_COLUMNS, LIMIT_COLUMNS.slice(2)), updateLimitRow);
  $("limits").hidden = items.length === 0;
}

function updateLimitRow(row, limit) {
  setText(row, "type", limit.type);
  setText(row, "queue", limit.queue);
  // A dash where the type has no such limit: its counts would only ever read 0.
  const concurrency = limit.global_concurrency != null;
  setText(row, "concurrency", concurrency ? formatCount(limit.global_concurrency) : "–");
  setText(row, "running", concurrency ? formatCount(limit.running) : "–");
  setText(row, "held", concurrency ? formatCount(limit.held) : "–");
  const rate = limit.rate_limit != null;
  setText(row, "rate", rate ? limit.rate_limit : "–");
  setText(row, "started", rate ? formatCount(limit.started_in_window) : "–");
  setText(row, "rate_limited", formatCount(limit.rate_limited));
  setText(row, "concurrency_limited", formatCount(limit.concurrency_limited));
  cell(row, "held").classList.toggle("warn", limit.held > 0);
}

// ---- job types without a handler

const UNHANDLED_COLUMNS = ["type", "queue", "waited", "job"];

// One row per ready job type no live daemon of its queue can run; shown only when there is one.
function renderUnhandled(queues) {
  const items = [];
  for (const queue of Object.keys(queues).sort()) {
    const types = queues[queue].no_handler || {};
    for (const type of Object.keys(types).sort()) items.push({ queue, type, ...types[type] });
  }
  syncRows("unhandled-body", items, (u) => `${u.queue}/${u.type}`,
    () => makeRow(UNHANDLED_COLUMNS, ["waited"]), updateUnhandledRow);
  $("unhandled").hidden = items.length === 0;
}

function updateUnhandledRow(row, entry) {
  setText(row, "type", entry.type);
  setText(row, "queue", entry.queue);
  setText(row, "waited", formatMs(entry.wait_ms));
  setText(row, "job", shortId(entry.job), entry.job);
  cell(row, "waited").classList.add("warn");
}

// ---- daemons

const DAEMON_COLUMNS = ["id", "host", "pid", "queues", "types", "load", "uptime", "heartbeat"];

function renderDaemons(instances) {
  syncRows("daemons-body", instances, (d) => d.id,
    (d) => makeRow(DAEMON_COLUMNS, ["pid", "load", "uptime", "heartbeat"]), updateDaemonRow);
}

function updateDaemonRow(row, daemon) {
  setText(row, "id", daemon.id);
  setText(row, "host", daemon.host);
  setText(row, "pid", daemon.pid);
  setText(row, "queues", (daemon.queues || []).join(", "));
  setText(row, "types", (daemon.types || []).join(", "));
  setText(row, "load", `${daemon.active} / ${daemon.concurrency}`);
  setText(row, "uptime", formatDuration(daemon.uptime_s * 1000), `since ${daemon.started_at}`);
  setText(row, "heartbeat", formatMs(daemon.heartbeat_age_ms), daemon.last_heartbeat);
  cell(row, "heartbeat").classList.toggle("warn", daemon.heartbeat_age_ms > STALE_HEARTBEAT_MS);
}

// ---- the sizing hint, for the fleet (docs/operations.md#autoscaling)

function renderAutoscale(hint) {
  const line = $("autoscale");
  line.hidden = !hint; // a daemon older than the hint gives none
  if (!hint) return;
  const desired = hint.desired_daemons;
  let drain = `drains in ${formatMs(hint.drain_s * 1000)}`;
  if (hint.backlog === 0) drain = "nothing waits";
  else if (hint.drain_s == null) drain = "does not drain at these rates";
  line.textContent =
    `Sizing hint: ${desired} daemon${desired === 1 ? "" : "s"} ` +
    `(${hint.daemons} live; ${hint.min_daemons} to ${hint.max_daemons}) · ` +
    `backlog ${formatCount(hint.backlog)} · ` +
    `${hint.arrival_per_s.toFixed(1)} jobs/s in, ${hint.completion_per_s.toFixed(1)} done · ` +
    `${drain} (target ${hint.target_drain_s} s)`;
  line.dataset.desired = String(desired);
  line.classList.toggle("warn", desired > hint.daemons);
}

// ---- schedules

const SCHEDULE_COLUMNS = ["name", "cron", "type", "queue", "next", "last", "job"];

function renderSchedules(schedules) {
  syncRows("schedules-body", schedules, (s) => s.name,
    () => makeRow(SCHEDULE_COLUMNS, []), updateScheduleRow);
}

function updateScheduleRow(row, schedule) {
  setText(row, "name", schedule.name);
  setText(row, "cron", `${schedule.cron} (${schedule.timezone})`);
  setText(row, "type", schedule.type);
  setText(row, "queue", schedule.queue);
  setText(row, "next", schedule.next_run);
  setText(row, "last", schedule.last_run || "never");
  const job = schedule.last_job;
  setText(row, "job", job ? `${shortId(job.id)} ${job.state}` : "", job ? job.id : "");
}

// ---- recent jobs

const RECENT_COLUMNS = ["id", "type", "queue", "priority", "state", "attempts", "age",
  "action"];
// Why a job that could run waits (its `waiting_for`), next to its state: text and tooltip.
const WAITING_TEXT = new Map([
  ["rate_limit", ["waits for rate limit", "its type's rate_limit is used up: due when it allows"]],
  ["concurrency", ["waits for concurrency limit",
    "held: its type's global_concurrency is reached, it runs when one of them ends"]],
]);
// The states in which `waiting_for` means something.
const WAITING = new Set(["queued", "scheduled"]);

function renderRecent(jobs, now) {
  syncRows("recent-body", jobs, (job) => job.id, createRecentRow, (row, job) =>
    updateRecentRow(row, job, now));
}

function createRecentRow(job) {
  const row = makeRow(RECENT_COLUMNS, ["priority", "attempts", "age"]);
  cell(row, "id").className = "mono";
  const badge = document.createElement("span");
  const waiting = document.createElement("span");
  waiting.className = "waiting";
  // The space keeps the two apart in copied text and for screen readers.
  cell(row, "state").append(badge, " ", waiting);
  const button = makeButton("Cancel", "cancel");
  button.addEventListener("click", () =>
    act(button, `Job ${shortId(job.id)}: cancel requested`, "POST",
      `/jobs/${encodeURIComponent(job.id)}/cancel`));
  cell(row, "action").append(button);
  return row;
}

// The cells every job table shows alike.
function setJobCells(row, job) {
  setText(row, "id", shortId(job.id), job.id);
  setText(row, "type", job.type);
  setText(row, "queue", job.queue);
  setText(row, "priority", job.priority);
  setText(row, "attempts", `${job.attempts} / ${job.max_attempts}`);
}

function updateRecentRow(row, job, now) {
  setJobCells(row, job);
  const due = job.state === "scheduled" && job.run_at ? `, due ${job.run_at}` : "";
  setText(row, "age", formatDuration(now - Date.parse(job.created_at)),
    `created ${job.created_at}${due}`);
  const state = job.cancel_requested && job.state === "active" ? "cancelling" : job.state;
  const badge = cell(row, "state").firstChild;
  // A running job's latest progress report, if its handler sends any.
  const progress = job.state === "active" && job.progress ? ` ${job.progress.value}` : "";
  badge.textContent = state + progress;
  badge.title = job.progress ? job.progress.message : "";
  badge.className = `badge state-${job.state}`;
  row.dataset.state = job.state;
  const why = WAITING.has(job.state) && job.waiting_for
    ? WAITING_TEXT.get(job.waiting_for) || [`waits for ${job.waiting_for}`, ""]
    : null;
  const waiting = cell(row, "state").lastChild;
  waiting.textContent = why ? why[0] : "";
  waiting.title = why ? why[1] : "";
  waiting.hidden = !why;
  row.dataset.waitingFor = why ? job.waiting_for : "";
  // Cancel only where the API accepts it; a requested cancel is not asked for twice.
  const button = cell(row, "action").firstChild;
  button.hidden = !CANCELLABLE.has(job.state);
  button.disabled = Boolean(job.cancel_requested);
}

// ---- failed jobs

const FAILED_COLUMNS = ["id", "type", "queue", "priority", "attempts", "age", "error",
  "action"];

function renderFailed(jobs, now) {
  syncRows("failed-body", jobs, (job) => job.id, createFailedRow, (row, job) =>
    updateFailedRow(row, job, now));
  $("retry-all").hidden = jobs.length === 0;
}

function createFailedRow(job) {
  const row = makeRow(FAILED_COLUMNS, ["priority", "attempts", "age"]);
  cell(row, "id").className = "mono";
  cell(row, "error").className = "error-text";
  const button = makeButton("Retry", "retry");
  button.addEventListener("click", () =>
    act(button, `Job ${shortId(job.id)}: back on its queue`, "POST",
      `/jobs/${encodeURIComponent(job.id)}/retry`));
  cell(row, "action").append(button);
  return row;
}

function updateFailedRow(row, job, now) {
  setJobCells(row, job);
  const finished = job.finished_at || job.created_at;
  setText(row, "age", `${formatDuration(now - Date.parse(finished))} ago`, finished);
  // Errors can be long (an exec handler's stderr): shortened by CSS, whole in the tooltip.
  setText(row, "error", job.error || "(no message)", job.error || "");
}

// Queue names seen in the stream, offered as suggestions in the filters.
function rememberQueues(names) {
  const list = $("known-queues");
  const known = new Set(Array.from(list.options, (option) => option.value));
  for (const name of names) {
    if (known.has(name)) continue;
    const option = document.createElement("option");
    option.value = name;
    list.append(option);
  }
}

function rememberTypes(jobs) {
  const list = $("known-types");
  for (const job of jobs) {
    if (knownTypes.has(job.type)) continue;
    knownTypes.add(job.type);
    const option = document.createElement("option");
    option.value = job.type;
    list.append(option);
  }
}

// ---------------------------------------------------------------- the job list

// Filtered, the list shows GET /jobs's first page for the filters, asked for again with
// each event (one request at a time); without filters, the stream's latest jobs.

const JOBS_PAGE = 20;
let jobFilter = null; // the filters as GET /jobs's parameters, or null
let jobsLoading = false;

function filterJobs(event) {
  event.preventDefault();
  const params = new URLSearchParams();
  for (const name of ["state", "type", "queue"]) {
    const value = $(`jobs-${name}`).value.trim();
    if (value) params.set(name, value);
  }
  if ([...params.keys()].length === 0) {
    clearJobFilter();
    return;
  }
  params.set("limit", String(JOBS_PAGE));
  jobFilter = params;
  const shown = [...params].filter(([name]) => name !== "limit");
  $("recent-scope").textContent = `matching ${shown.map(([k, v]) => `${k} ${v}`).join(", ")}`;
  $("recent-empty").textContent = "No job matches.";
  $("jobs-clear").hidden = false;
  refreshJobs();
}

function clearJobFilter() {
  jobFilter = null;
  for (const name of ["state", "type", "queue"]) $(`jobs-${name}`).value = "";
  $("recent-scope").textContent = `latest ${JOBS_PAGE}`;
  $("recent-empty").textContent = "No jobs yet.";
  $("jobs-clear").hidden = true;
  showJobsError(null);
  if (lastPicture) renderRecent(lastPicture.recent, Date.parse(lastPicture.stats.time));
}

async function refreshJobs() {
  if (jobsLoading || !jobFilter) return;
  const asked = jobFilter;
  jobsLoading = true;
  try {
    const page = await api("GET", `/jobs?${asked}`);
    // Filters changed meanwhile: this answer is for the old ones.
    if (asked !== jobFilter) return;
    showJobsError(null);
    const now = lastPicture ? Date.parse(lastPicture.stats.time) : Date.now();
    renderRecent(page.jobs, now);
    rememberTypes(page.jobs);
  } catch (err) {
    if (asked === jobFilter) showJobsError(err.message);
  } finally {
    jobsLoading = false;
  }
}

function showJobsError(text) {
  const error = $("jobs-error");
  error.textContent = text || "";
  error.hidden = !text;
}

// One job by its id, whatever its state (GET /jobs/ID), shown whole under the list.
async function lookUpJob(event) {
  event.preventDefault();
  const id = $("lookup-id").value.trim();
  if (!id) {
    showJobsError("Give a job's id.");
    $("lookup-id").focus();
    return;
  }
  const button = $("lookup-button");
  button.disabled = true;
  try {
    const job = await api("GET", `/jobs/${encodeURIComponent(id)}`);
    showJobsError(null);
    $("lookup-job-id").textContent = job.id;
    $("lookup-job").textContent = JSON.stringify(job, null, 2);
    const detail = $("lookup-detail");
    detail.hidden = false;
    detail.scrollIntoView({ block: "nearest" });
  } catch (err) {
    $("lookup-detail").hidden = true;
    showJobsError(err.message);
  } finally {
    button.disabled = false;
  }
}

// ---------------------------------------------------------------- purge and bulk retry

// Both ask first, in a modal dialog; a purge only once the queue's name is typed.

let purgeQueue = null;

function openPurge(name) {
  purgeQueue = name;
  $("purge-queue").textContent = name;
  $("purge-state").value = "queued";
  $("purge-confirm").value = "";
  showDialogError("purge", null);
  updatePurgeCount();
  $("purge-dialog").showModal();
  $("purge-confirm").focus();
}

// What the dialog says the purge would take now, and whether it may go.
function updatePurgeCount() {
  if (!$("purge-dialog").open) return;
  const state = $("purge-state").value;
  const queue = lastPicture ? lastPicture.stats.queues[purgeQueue] : null;
  const count = queue ? queue[state] : null;
  $("purge-count").textContent = count == null ? "" : `${formatCount(count)} ${state} now.`;
  $("purge-submit").disabled = $("purge-confirm").value !== purgeQueue;
}

async function purgeJobs(event) {
  event.preventDefault();
  if ($("purge-confirm").value !== purgeQueue) return;
  const state = $("purge-state").value;
  const path = `/queues/${encodeURIComponent(purgeQueue)}/jobs?state=${encodeURIComponent(state)}`;
  await inDialog("purge", async () => {
    const answer = await api("DELETE", path);
    notify(`Queue ${answer.queue}: ${formatCount(answer.removed)} ${answer.state} jobs purged`,
      false);
  });
}

function openRetry() {
  $("retry-type").value = "";
  $("retry-queue").value = "";
  showDialogError("retry", null);
  updateRetrySummary();
  $("retry-dialog").showModal();
  $("retry-type").focus();
}

function retryFilters() {
  const body = {};
  for (const name of ["type", "queue"]) {
    const value = $(`retry-${name}`).value.trim();
    if (value) body[name] = value;
  }
  return body;
}

function updateRetrySummary() {
  const { type, queue } = retryFilters();
  const which = type ? `every failed job of type ${type}` : "every failed job";
  const where = queue ? `of queue ${queue}` : "of every queue";
  $("retry-summary").textContent = `Retries ${which} ${where}.`;
}

async function retryDead(event) {
  event.preventDefault();
  const body = retryFilters();
  await inDialog("retry", async () => {
    const answer = await api("POST", "/dead/retry", body);
    notify(`${formatCount(answer.retried)} dead letters back on their queues`, false);
  });
}

// Runs a dialog's action with its buttons disabled; closes the dialog when it is done,
// or keeps it open with the API's message.
async function inDialog(name, action) {
  const submit = $(`${name}-submit`);
  submit.disabled = true;
  try {
    await action();
    $(`${name}-dialog`).close();
  } catch (err) {
    showDialogError(name, err.message);
  } finally {
    submit.disabled = false;
    if (name === "purge") updatePurgeCount();
  }
}

function showDialogError(name, text) {
  const error = $(`${name}-error`);
  error.textContent = text || "";
  error.hidden = !text;
}

// ---------------------------------------------------------------- history

// Finished jobs from the archive (GET /archive), asked for when the user searches, not
// with every event: the archive is PostgreSQL's, and it can be large.

// Jobs per page: the API gives up to 1000, a person reads a screenful at a time.
const HISTORY_PAGE = 20;
const HISTORY_COLUMNS = ["id", "type", "queue", "state", "attempts", "finished", "error"];
// A date and time without an offset, as people type them: this browser's local time.
const LOCAL_TIME = /^\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}(:\d{2})?$/;

let historyShown = false;
// The search the list shows, and where its next page starts (null: there is none).
let historyQuery = null;
let historyCursor = null;

// The form as GET /archive's parameters, or null after saying what is wrong in the page.
function readHistoryForm() {
  const params = new URLSearchParams();
  for (const name of ["type", "queue", "state"]) {
    const value = $(`history-${name}`).value.trim();
    if (value) params.set(name, value);
  }
  for (const name of ["since", "until"]) {
    const value = $(`history-${name}`).value.trim();
    if (value) params.set(name, historyTime(value));
  }
  const contains = $("history-q").value.trim();
  if (contains) {
    try {
      JSON.parse(contains);
    } catch (err) {
      showHistoryError(`The payload filter is not valid JSON: ${err.message}. ` +
        'Strings need double quotes, e.g. {"name": "value"}.');
      $("history-q").focus();
      return null;
    }
    params.set("q", contains);
  }
  params.set("limit", String(HISTORY_PAGE));
  return params;
}

// RFC 3339 times and epoch seconds go as they are (the API checks them); a local date and
// time is sent as the UTC time it is.
function historyTime(text) {
  if (!LOCAL_TIME.test(text)) return text;
  const when = new Date(text.replace(" ", "T"));
  return Number.isNaN(when.getTime()) ? text : when.toISOString();
}

function showHistoryError(text) {
  const error = $("history-error");
  error.textContent = text || "";
  error.hidden = !text;
}

async function searchHistory(event) {
  if (event) event.preventDefault();
  const params = readHistoryForm();
  if (!params) return;
  historyQuery = params;
  historyCursor = null;
  await loadHistory(true);
}

// Loads the search's first page (`fresh`), or its next one after the rows shown.
async function loadHistory(fresh) {
  const params = new URLSearchParams(historyQuery);
  if (!fresh) params.set("cursor", historyCursor);
  const buttons = [$("history-search"), $("history-more")];
  for (const button of buttons) button.disabled = true;
  try {
    const page = await api("GET", `/archive?${params}`);
    showHistoryError(null);
    const body = $("history-body");
    if (fresh) {
      body.replaceChildren();
      $("history-detail").hidden = true;
    }
    body.append(...page.jobs.map(historyRow));
    historyCursor = page.next_cursor;
    $("history-more").hidden = !historyCursor;
    $("history-empty").hidden = body.rows.length > 0;
  } catch (err) {
    showHistoryError(err.message);
  } finally {
    for (const button of buttons) button.disabled = false;
  }
}

// A daemon without [archive]: the card says so, and offers nothing to search.
function archiveOff() {
  $("history").dataset.archive = "off";
  const parts = ["history-form", "history-times", "history-table", "history-more", "history-empty"];
  for (const id of parts) {
    $(id).hidden = true;
  }
  $("history-off").hidden = false;
}

function historyRow(job) {
  const row = makeRow(HISTORY_COLUMNS, ["attempts"]);
  // A job retried after it failed for good is archived once per end: ids may repeat.
  row.dataset.id = job.id;
  row.dataset.state = job.state;
  const show = makeButton(shortId(job.id), "show");
  show.classList.add("mono");
  show.title = `${job.id}: show the whole job`;
  show.addEventListener("click", () => showHistoryJob(job));
  cell(row, "id").append(show);
  const badge = document.createElement("span");
  badge.className = `badge state-${job.state}`;
  badge.textContent = job.state;
  cell(row, "state").append(badge);
  setText(row, "type", job.type);
  setText(row, "queue", job.queue);
  setText(row, "attempts", `${job.attempts} / ${job.max_attempts}`);
  setText(row, "finished", new Date(job.finished_at).toLocaleString(), job.finished_at);
  cell(row, "error").className = "error-text";
  setText(row, "error", job.error || "", job.error || "");
  return row;
}

// The job's whole document, as GET /jobs/ID answers it, under the list.
function showHistoryJob(job) {
  $("history-job-id").textContent = job.id;
  $("history-job").textContent = JSON.stringify(job, null, 2);
  const detail = $("history-detail");
  detail.hidden = false;
  detail.scrollIntoView({ block: "nearest" });
}

// ---------------------------------------------------------------- charts

// Keeps one point per event: per queue, the throughput and the wait p99.
function remember(queues) {
  const point = {};
  for (const [name, queue] of Object.entries(queues)) {
    point[name] = {
      throughput: queue.throughput ? queue.throughput["1m"] : null,
      waitP99: queue.wait_ms ? queue.wait_ms.p99 : null,
    };
  }
  history.push(point);
  if (history.length > HISTORY_POINTS) history.shift();
}

function drawCharts() {
  const names = lastPicture ? Object.keys(lastPicture.stats.queues).sort() : [];
  // The smallest scales (1 job/s, 10 ms) keep an idle chart's labels readable.
  drawChart($("chart-throughput"), names, (p) => p.throughput, 1, (v) => v.toFixed(2));
  drawChart($("chart-wait"), names, (p) => p.waitP99, 10, formatMs);
  drawLegend($("legend-throughput"), names);
  drawLegend($("legend-wait"), names);
}

// A line chart: x is the last HISTORY_POINTS events (now at the right), y from 0 to the
// largest value shown (at least `least`). Missing values (no data yet) break the line
// instead of reading 0.
function drawChart(canvas, names, valueOf, least, label) {
  const ctx = fitCanvas(canvas);
  const { width, height } = canvas.getBoundingClientRect();
  const pad = { left: 44, right: 8, top: 8, bottom: 18 };
  const plotW = Math.max(1, width - pad.left - pad.right);
  const plotH = Math.max(1, height - pad.top - pad.bottom);
  ctx.clearRect(0, 0, width, height);

  let max = least;
  for (const point of history) {
    for (const name of names) {
      const value = point[name] ? valueOf(point[name]) : null;
      if (value != null && value > max) max = value;
    }
  }
  max = niceCeiling(max);
  // The scale starts at 0: a negative sample (clock jitter between daemons) stays on it.
  const toY = (value) => pad.top + plotH * (1 - Math.max(0, value) / max);

  // Grid lines and labels: 0, half and the top of the scale; time marks under the plot.
  const style = getComputedStyle(document.body);
  ctx.font = "11px system-ui, sans-serif";
  ctx.fillStyle = style.getPropertyValue("--muted").trim() || "#777";
  ctx.strokeStyle = style.getPropertyValue("--grid").trim() || "#ddd";
  ctx.lineWidth = 1;
  ctx.textAlign = "right";
  ctx.textBaseline = "middle";
  for (const fraction of [0, 0.5, 1]) {
    const y = Math.round(pad.top + plotH * (1 - fraction)) + 0.5;
    ctx.beginPath();
    ctx.moveTo(pad.left, y);
    ctx.lineTo(pad.left + plotW, y);
    ctx.stroke();
    ctx.fillText(label(max * fraction), pad.left - 6, y);
  }
  ctx.textAlign = "center";
  ctx.textBaseline = "top";
  const step = plotW / (HISTORY_POINTS - 1);
  for (const [seconds, text] of [[HISTORY_POINTS - 1, "-2m"], [59, "-1m"], [0, "now"]]) {
    const x = pad.left + plotW - seconds * step;
    ctx.textAlign = seconds === 0 ? "right" : seconds === HISTORY_POINTS - 1 ? "left" : "center";
    ctx.fillText(text, x, pad.top + plotH + 4);
  }

  // The newest point sits at the right edge; older ones move left one step per event.
  ctx.lineWidth = 2;
  ctx.lineJoin = "round";
  names.forEach((name, index) => {
    ctx.strokeStyle = PALETTE[index % PALETTE.length];
    ctx.beginPath();
    let drawing = false;
    history.forEach((point, i) => {
      const value = point[name] ? valueOf(point[name]) : null;
      if (value == null) {
        drawing = false;
        return;
      }
      const x = pad.left + plotW - (history.length - 1 - i) * step;
      const y = toY(value);
      if (drawing) ctx.lineTo(x, y);
      else ctx.moveTo(x, y);
      drawing = true;
    });
    ctx.stroke();
    // A dot on the latest value: it marks "now", and shows a series only one point long.
    const latest = history.length ? history[history.length - 1][name] : null;
    const value = latest ? valueOf(latest) : null;
    if (value != null) {
      ctx.fillStyle = ctx.strokeStyle;
      ctx.beginPath();
      ctx.arc(pad.left + plotW, toY(value), 3, 0, 2 * Math.PI);
      ctx.fill();
    }
  });
  canvas.dataset.points = String(history.length);
}

// Sizes the canvas's pixels to its displayed size, so lines stay sharp on any screen.
function fitCanvas(canvas) {
  const ratio = window.devicePixelRatio || 1;
  const { width, height } = canvas.getBoundingClientRect();
  const pixelsW = Math.round(width * ratio);
  const pixelsH = Math.round(height * ratio);
  if (canvas.width !== pixelsW || canvas.height !== pixelsH) {
    canvas.width = pixelsW;
    canvas.height = pixelsH;
  }
  const ctx = canvas.getContext("2d");
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  return ctx;
}

// A round number at or above `value`, so the axis reads 0 / 5 / 10 rather than 0 / 4.3 / 8.6.
function niceCeiling(value) {
  if (!(value > 0)) return 1;
  const magnitude = 10 ** Math.floor(Math.log10(value));
  for (const factor of [1, 2, 5, 10]) {
    if (value <= factor * magnitude) return factor * magnitude;
  }
  return 10 * magnitude;
}

function drawLegend(list, names) {
  const text = names.join("\n");
  if (list.dataset.names === text) return; // unchanged: leave the DOM alone
  list.dataset.names = text;
  list.replaceChildren(...names.map((name, index) => {
    const item = document.createElement("li");
    const swatch = document.createElement("span");
    swatch.className = "swatch";
    swatch.style.background = PALETTE[index % PALETTE.length];
    item.append(swatch, document.createTextNode(name));
    return item;
  }));
}

// ---------------------------------------------------------------- the form

// Reads and checks the form. Returns the request body, or null after showing what is wrong
// next to the field: better than sending it and reading the API's 422.
function readForm() {
  const type = $("job-type").value.trim();
  const payloadText = $("job-payload").value.trim();
  const delayText = $("job-delay").value.trim();
  const body = { type };
  showPayloadError(null);
  if (!type) {
    showResult("Give the job's type, e.g. echo.", true);
    $("job-type").focus();
    return null;
  }
  if (payloadText) {
    try {
      body.payload = JSON.parse(payloadText);
    } catch (err) {
      showPayloadError(`The payload is not valid JSON: ${err.message}. ` +
        'Strings need double quotes, e.g. {"name": "value"}.');
      return null;
    }
  }
  if (delayText) {
    const delay = Number(delayText);
    if (!Number.isFinite(delay) || delay < 0 || delay > 31622400) {
      showResult("The delay must be a number of seconds from 0 to 31622400.", true);
      $("job-delay").focus();
      return null;
    }
    body.delay = delay;
  }
  return body;
}

function showPayloadError(text) {
  const field = $("job-payload");
  const error = $("payload-error");
  error.textContent = text || "";
  error.hidden = !text;
  field.setAttribute("aria-invalid", text ? "true" : "false");
  if (text) field.focus();
}

function showResult(text, isError) {
  const result = $("submit-result");
  result.textContent = text;
  result.classList.toggle("error", isError);
}

async function submitJob(event) {
  event.preventDefault();
  const body = readForm();
  if (!body) return;
  const button = $("submit-button");
  button.disabled = true;
  showResult("Submitting…", false);
  try {
    const job = await api("POST", "/jobs", body);
    showResult(`Submitted ${shortId(job.id)}: ${job.state} on ${job.queue}.`, false);
    $("submit-result").dataset.jobId = job.id;
  } catch (err) {
    showResult(err.message, true);
  } finally {
    button.disabled = false;
  }
}

// ---------------------------------------------------------------- formatting

// UUIDv7 ids start with the time, so jobs of the same minute share their first digits;
// the random tail tells them apart.
function shortId(id) {
  return `…${id.slice(-8)}`;
}

function formatCount(n) {
  return n == null ? "–" : Number(n).toLocaleString("en");
}

function formatMs(ms) {
  if (ms == null) return "–";
  if (ms < 1000) return `${Math.round(ms)} ms`;
  if (ms < 60000) return `${(ms / 1000).toFixed(1)} s`;
  return formatDuration(ms);
}

// "42s", "3m 05s", "2h 10m", "4d 3h": precise enough at a glance.
function formatDuration(ms) {
  const s = Math.max(0, Math.floor(ms / 1000));
  if (s < 60) return `${s}s`;
  const m = Math.floor(s / 60);
  if (m < 60) return `${m}m ${String(s % 60).padStart(2, "0")}s`;
  const h = Math.floor(m / 60);
  if (h < 24) return `${h}h ${String(m % 60).padStart(2, "0")}m`;
  return `${Math.floor(h / 24)}d ${h % 24}h`;
}

function formatBytes(bytes) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let value = bytes;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit += 1;
  }
  return `${value.toFixed(unit === 0 ? 0 : 1)} ${units[unit]} used`;
}

// ---------------------------------------------------------------- start

function start() {
  $("submit-form").addEventListener("submit", submitJob);
  $("token-form").addEventListener("submit", useToken);
  $("history-form").addEventListener("submit", searchHistory);
  $("history-more").addEventListener("click", () => loadHistory(false));
  $("jobs-form").addEventListener("submit", filterJobs);
  $("jobs-clear").addEventListener("click", clearJobFilter);
  $("lookup-form").addEventListener("submit", lookUpJob);
  $("purge-form").addEventListener("submit", purgeJobs);
  $("purge-state").addEventListener("change", updatePurgeCount);
  $("purge-confirm").addEventListener("input", updatePurgeCount);
  $("purge-cancel").addEventListener("click", () => $("purge-dialog").close());
  $("retry-all").addEventListener("click", openRetry);
  $("retry-form").addEventListener("submit", retryDead);
  $("retry-type").addEventListener("input", updateRetrySummary);
  $("retry-queue").addEventListener("input", updateRetrySummary);
  $("retry-cancel").addEventListener("click", () => $("retry-dialog").close());
  // Clear the JSON complaint as soon as the user edits the payload again.
  $("job-payload").addEventListener("input", () => showPayloadError(null));
  // Canvas pixels follow the layout: redraw when it changes (rotation, resizing).
  window.addEventListener("resize", drawCharts);
  drawCharts();
  connect();
}

start();
