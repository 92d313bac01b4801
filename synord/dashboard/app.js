// synord dashboard: a client of the control API (the same /v1 routes as the CLI).
// The token comes in the URL fragment (never sent to the server) and is kept for the tab only.
'use strict';

const token = new URLSearchParams(location.hash.slice(1)).get('token') || sessionStorage.getItem('synord-token');
if (token) {
  sessionStorage.setItem('synord-token', token);
  history.replaceState(null, '', location.pathname);  // keep the token out of the address bar
}
const $ = (id) => document.getElementById(id);
const SVG = 'http://www.w3.org/2000/svg';
let UNIT = 'CRD';  // the ledger's currency unit (its "unit" field, where it gives one)

async function api(path, method = 'GET', body) {
  const opts = {method, headers: {'Authorization': 'Bearer ' + token}};
  if (body !== undefined) {
    opts.headers['Content-Type'] = 'application/json';
    opts.body = JSON.stringify(body);
  }
  const r = await fetch(path, opts);
  let data = null;
  try { data = await r.json(); } catch (e) { /* empty body */ }
  if (!r.ok) throw new Error((data && data.error) || (path + ': HTTP ' + r.status));
  return data;
}

// ---- formatting -------------------------------------------------------------

function bytes(n) {
  if (n == null) return '-';
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(1) : n) + ' ' + units[i];
}
function duration(s) {
  if (s == null) return '-';
  if (s < 60) return s.toFixed(s < 10 ? 1 : 0) + ' s';
  if (s < 3600) return Math.floor(s / 60) + ' min ' + Math.floor(s % 60) + ' s';
  if (s < 86400) return Math.floor(s / 3600) + ' h ' + Math.floor((s % 3600) / 60) + ' min';
  return Math.floor(s / 86400) + ' d ' + Math.floor((s % 86400) / 3600) + ' h';
}
function money(x) {
  if (x == null) return '-';
  const a = Math.abs(x);
  if (a >= 1e6) return x.toExponential(1) + ' ' + UNIT;  // e.g. a bid's "any price" ceiling
  const digits = a === 0 ? 2 : a >= 1 ? 2 : Math.min(10, 2 - Math.floor(Math.log10(a)) + 1);
  return x.toFixed(digits) + ' ' + UNIT;
}
function axisMoney(v) {  // short enough for a chart's axis
  return (v !== 0 && Math.abs(v) < 1e-3 ? v.toExponential(1) : String(+v.toPrecision(3))) + ' ' + UNIT;
}
function whyNot(d) {  // one reason ("why_not") or several ("reasons"), whichever the API gives
  return d.why_not || (Array.isArray(d.reasons) ? d.reasons.join('; ') : null);
}
function when(ts) {
  if (!ts) return '-';
  const ms = ts > 1e12 ? ts : ts * 1000;  // the ledger keeps milliseconds, the rest seconds
  return new Date(ms).toLocaleString();
}

// Peer ids share their first characters ("12D3KooW..."): show the shortest tail (>= 6)
// that tells every known id apart.
let knownPeers = [];
function shortId(id) {
  if (!id) return '-';
  for (let n = 6; n < id.length; n++) {
    const tail = id.slice(-n);
    if (knownPeers.filter((p) => p.endsWith(tail)).length <= 1) return '…' + tail;
  }
  return id;
}

// ---- DOM helpers ----------------------------------------------------------------

function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === 'text') e.textContent = v; else e.setAttribute(k, v);
  }
  for (const c of children) e.append(c);
  return e;
}
function table(t, header, rows, empty = 'none') {
  t.replaceChildren();
  const head = t.createTHead().insertRow();
  header.forEach((h) => head.append(el('th', {text: h})));
  const body = t.createTBody();
  if (!rows.length) {
    body.insertRow().append(el('td', {class: 'empty', colspan: header.length, text: empty}));
  }
  for (const r of rows) {
    const row = body.insertRow();
    for (const c of r) {
      const td = row.insertCell();
      if (c instanceof Node) td.append(c); else td.textContent = c == null ? '-' : String(c);
    }
  }
}
function kv(dl, pairs) {
  dl.replaceChildren();
  for (const [k, v] of pairs) dl.append(el('dt', {text: k}), el('dd', {text: v == null ? '-' : String(v)}));
}

// ---- charts (hand-made SVG: nothing loads from the network) ------------------------

function chart(box, samples, series, unit) {
  const W = 800, H = 160, L = 64, R = 10, T = 18, B = 22;
  const svg = document.createElementNS(SVG, 'svg');
  svg.setAttribute('viewBox', `0 0 ${W} ${H}`);
  svg.setAttribute('preserveAspectRatio', 'none');
  const add = (tag, attrs, text) => {
    const e = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
    if (text != null) e.textContent = text;
    svg.append(e);
    return e;
  };
  if (samples.length < 2) {
    add('text', {x: W / 2, y: H / 2, 'text-anchor': 'middle', class: 'none'},
        'collecting history… (one sample per ' + duration(window.historyInterval || 60) + ')');
    box.replaceChildren(svg);
    return;
  }
  const t0 = samples[0].ts, t1 = samples[samples.length - 1].ts;
  let ymax = 0;
  for (const s of series) for (const p of samples) ymax = Math.max(ymax, s.value(p));
  ymax = s_nice(ymax || 1);
  const x = (t) => L + (W - L - R) * (t - t0) / Math.max(1e-9, t1 - t0);
  const y = (v) => H - B - (H - T - B) * v / ymax;
  for (let i = 0; i <= 4; i++) {
    const v = ymax * i / 4;
    add('line', {x1: L, x2: W - R, y1: y(v), y2: y(v), class: i ? 'grid' : 'axis'});
    add('text', {x: L - 6, y: y(v) + 4, 'text-anchor': 'end', class: 'label'}, unit(v));
  }
  add('text', {x: L, y: H - 6, class: 'label'}, new Date(t0 * 1000).toLocaleTimeString());
  add('text', {x: W - R, y: H - 6, 'text-anchor': 'end', class: 'label'}, new Date(t1 * 1000).toLocaleTimeString());
  series.forEach((s, i) => {
    const d = samples.map((p, j) => (j ? 'L' : 'M') + x(p.ts).toFixed(1) + ' ' + y(s.value(p)).toFixed(1)).join(' ');
    add('path', {d, class: 's' + i, 'data-series': s.name});
    add('rect', {x: L + 10 + i * 150, y: 4, width: 10, height: 10, class: 'legend' + i});
    add('text', {x: L + 24 + i * 150, y: 13, class: 'label'}, s.name);
  });
  box.replaceChildren(svg);
}
function s_nice(v) {  // a round axis maximum above v
  const p = Math.pow(10, Math.floor(Math.log10(v)));
  for (const m of [1, 2, 2.5, 5, 10]) if (m * p >= v) return m * p;
  return 10 * p;
}

// ---- sections -----------------------------------------------------------------

let lastStatus = null;

function renderStatus(st) {
  lastStatus = st;
  $('peer').textContent = st.peer_id;
  const state = $('state');
  const working = st.contributing && st.running_tasks > 0;
  state.className = 'state ' + (st.contributing ? 'on' : st.paused ? 'paused' : 'off');
  state.textContent = st.contributing ? (working ? 'Contributing · working' : 'Contributing')
    : st.paused ? 'Paused' : 'Not contributing';
  $('why').textContent = st.contributing ? '' : 'Why not: ' + (whyNot(st) || 'unknown');
  $('pause').hidden = !!st.paused;
  $('resume').hidden = !st.paused;
  kv($('node'), [
    ['contributing', st.contributing ? 'yes' : 'no'],
    ['running tasks', st.running_tasks],
    ['peers', st.peers],
    ['uptime', duration(st.uptime_s)],
    ['version', st.version],
    ['home', st.home],
  ]);
}

function renderHardware(p) {
  const h = p.host || {}, off = p.offerable || {};
  kv($('hardware'), [
    ['host', `${h.hostname || '?'} · ${h.os || '?'} · ${h.arch || '?'}`],
    ['cpu', `${h.cpu_model || '?'} · ${h.logical_cores || '?'} threads (${h.effective_cpus || '?'} usable)`],
    ['memory', `${bytes(h.memory_total_bytes)} (${bytes(h.memory_available_bytes)} free)`],
    ['offered', off.allowed === false ? 'nothing now: ' + (off.why_not || '')
      : `${off.cpus ?? '-'} CPUs · ${bytes(off.memory_bytes)} · ${off.gpus ?? 0} GPUs`],
    ['sandboxes', Object.entries(p.runtimes || {}).filter(([, r]) => r.available).map(([k]) => k).join(', ') || 'none'],
  ]);
  table($('devices'), ['device', 'model', 'memory', 'fp32'],
    (p.devices || []).map((d) => [d.kind, d.model || d.vendor || '-', bytes(d.memory_bytes),
      (d.throughput && d.throughput.fp32_gflops) ? d.throughput.fp32_gflops + ' GFLOPS' : '-']));
}

// The preferences form is generated from whatever keys /v1/limits returns. Each key is a
// plain value typed by the "types" map, or an object {value, type, help, evaluable, reason};
// without a type, the value's own JSON type decides.
let limitsShown = '';
// the API's input kinds (hwprobe.policy's preference types) -> how the editor reads them
const NUMBER_TYPES = new Set(['int', 'float', 'share', 'percent', 'seconds']);
function limitEntry(key, raw, meta) {
  const m = (meta && meta[key]) || {};
  const e = (raw && typeof raw === 'object' && !Array.isArray(raw) && 'value' in raw) ? raw : {value: raw};
  let type = m.type || e.type;
  if (!type) {
    type = typeof e.value === 'boolean' ? 'bool' : typeof e.value === 'number' ? 'float' : 'str';
  }
  const evaluable = m.evaluable ?? e.evaluable ?? e.can_evaluate;
  const note = evaluable === false ? (m.note || 'cannot evaluate here') : '';
  return {value: e.value, type, help: m.help || e.help || '', note};
}
function renderLimits(d) {
  const sig = JSON.stringify([d.limits, d.overrides]);
  const form = $('limits');
  if (sig === limitsShown || form.contains(document.activeElement)) return;  // don't clobber edits
  limitsShown = sig;
  form.replaceChildren();
  const overrides = d.overrides || {};
  const meta = Object.fromEntries((d.keys || []).map(k => [k.key, k]));
  for (const [key, raw] of Object.entries(d.limits).sort()) {
    const {value, type, help, note} = limitEntry(key, raw, meta);
    const input = el('input', {id: 'limit-' + key, name: key, 'data-type': type});
    if (type === 'bool') {
      input.type = 'checkbox';
      input.checked = !!value;
    } else {
      input.type = NUMBER_TYPES.has(type) ? 'number' : 'text';
      if (type !== 'int') input.step = 'any';
      input.value = value == null ? '' : String(value);
      if (value == null) input.placeholder = 'not set';
    }
    input.dataset.orig = type === 'bool' ? String(!!value) : (value == null ? '' : String(value));
    const label = el('label', {for: input.id, text: key});
    if (help) label.title = help;
    form.append(el('div', {class: 'row' + (key in overrides ? ' override' : '')},
      label, input, el('span', {class: 'type', text: type})));
    if (note) form.append(el('div', {class: 'note', text: key + ': ' + note}));
  }
  form.append(el('div', {class: 'actions'}, el('button', {id: 'limits-apply', type: 'submit', text: 'Apply'})));
}
function parseLimit(input) {
  const type = input.dataset.type;
  if (type === 'bool') return input.checked;
  const raw = input.value.trim();
  if (raw === '') return null;  // back to the config's value
  if (type === 'int') return parseInt(raw, 10);
  if (NUMBER_TYPES.has(type)) return parseFloat(raw);
  return raw;  // sizes ("2M"), hours, weekly schedules: the API parses them
}
async function applyLimits(ev) {
  ev.preventDefault();
  const body = {};
  for (const input of $('limits').querySelectorAll('input')) {
    const now = input.dataset.type === 'bool' ? String(input.checked) : input.value.trim();
    if (now !== input.dataset.orig) body[input.name] = parseLimit(input);
  }
  const msg = $('limits-msg');
  if (!Object.keys(body).length) { msg.className = 'msg'; msg.textContent = 'nothing changed'; return; }
  try {
    const d = await api('/v1/limits', 'POST', body);
    document.activeElement.blur();
    limitsShown = '';
    renderLimits(d);
    msg.className = 'msg';
    msg.textContent = 'applied: ' + Object.keys(body).join(', ') + (d.allowed === false ? ' — not contributing: ' + whyNot(d) : '');
    refresh();
  } catch (e) {
    msg.className = 'msg bad';
    msg.textContent = e.message;
  }
}

function progressCell(j) {
  const p = j.progress;
  if (!p) return '-';
  const span = el('span', {class: 'progress'});
  if (p.total) {
    span.append(el('progress', {max: p.total, value: p.done || 0}), ' ');
  }
  span.append((p.phase || p.stage || '') + (p.total ? ` ${Math.round(100 * (p.done || 0) / p.total)}%` : ''));
  const last = (j.events || []).slice(-1)[0];  // the job's latest notice (migration, upload)
  if (last) span.append(el('div', {class: 'notice', text: last.text}));
  return span;
}
function renderJobs(jobs) {
  table($('jobs'), ['job', 'role', 'state', 'sandbox', 'peer', 'progress', 'exit', ''],
    jobs.map((j) => {
      const logs = el('button', {type: 'button', class: 'logs', 'data-job': j.id, text: 'Logs'});
      logs.onclick = () => followLogs(j.id);
      return [j.id, j.role || 'consumer', j.state, j.runtime, shortId(j.provider || j.consumer),
        progressCell(j), j.exit_code, logs];
    }), 'no tasks');
}

let logAbort = null;
async function followLogs(jobId) {
  if (logAbort) logAbort.abort();
  logAbort = new AbortController();
  $('logbox').hidden = false;
  $('log-job').textContent = jobId;
  const pre = $('log');
  pre.textContent = '';
  try {
    const r = await fetch(`/v1/jobs/${encodeURIComponent(jobId)}/logs?follow=1`,
      {headers: {'Authorization': 'Bearer ' + token}, signal: logAbort.signal});
    if (!r.ok) { pre.textContent = ((await r.json()).error || 'HTTP ' + r.status); return; }
    const reader = r.body.getReader();
    const dec = new TextDecoder();
    let buf = '';
    for (;;) {
      const {done, value} = await reader.read();
      if (done) break;
      buf += dec.decode(value, {stream: true});
      let nl;
      while ((nl = buf.indexOf('\n')) >= 0) {
        const line = buf.slice(0, nl).trim();
        buf = buf.slice(nl + 1);
        if (!line) continue;
        const m = JSON.parse(line);
        if (m.data != null) pre.append(m.data);
        else if (m.exit_code !== undefined) pre.append(`\n[exit ${m.exit_code}]\n`);
        else if (m.error) pre.append(`\n[${m.error}]\n`);
        pre.scrollTop = pre.scrollHeight;
      }
    }
  } catch (e) {
    if (e.name !== 'AbortError') pre.append(`\n[${e.message}]\n`);
  }
}

function renderPeers(peers) {
  knownPeers = peers.map((p) => p.peer_id).concat(lastStatus ? [lastStatus.peer_id] : []);
  table($('peers'), ['peer', 'devices', 'sandboxes', 'last seen'], peers.map((p) => {
    const caps = p.capabilities || {};
    const devs = [...new Set((caps.devices || []).map((d) => d.kind))].join(', ');
    const rts = Object.entries(caps.runtimes || {}).filter(([, r]) => r.available).map(([k]) => k).join(', ');
    return [shortId(p.peer_id), devs || '-', rts || '-', p.last_seen ? new Date(p.last_seen * 1000).toLocaleTimeString() : '-'];
  }), 'no peers yet');
}

function renderBook(b) {
  table($('book'), ['class', 'asks', 'bids', 'best ask', 'best bid', 'last trade'],
    Object.entries(b.classes || {}).sort().map(([cls, s]) => [cls, (s.asks || []).length, (s.bids || []).length,
      s.best_ask == null ? '-' : money(s.best_ask) + '/unit-h', s.best_bid == null ? '-' : money(s.best_bid) + '/unit-h',
      s.last_trade == null ? '-' : money(typeof s.last_trade === 'object' ? s.last_trade.price : s.last_trade)]),
    'empty book');
}

function renderLedger(l) {
  UNIT = l.unit || l.currency || UNIT;
  let earned = 0, spent = 0;
  for (const r of l.receipts || []) { if (r.role === 'provider') earned += r.amount; else spent += r.amount; }
  kv($('money'), [
    ['balance', money(l.balance)],
    ['earned (as provider)', money(earned)],
    ['spent (as consumer)', money(spent)],
    ['receipts', (l.receipts || []).length],
  ]);
  table($('receipts'), ['ended', 'role', 'other party', 'cpu', 'wall', 'price', 'amount', 'outcome'],
    (l.receipts || []).slice(0, 50).map((r) => [when(r.ended), r.role,
      shortId(r.role === 'provider' ? r.consumer : r.provider), duration(r.cpu_s), duration(r.wall_s),
      money(r.price) + '/unit-h', (r.role === 'provider' ? '+' : '−') + money(r.amount), r.outcome]),
    'no receipts yet: they come when tasks end');
}

// Samples arrive incrementally (?since= the newest we hold); the charts span the last day.
const CHART_SPAN_S = 86400;
let samples = [];
function renderHistory(h) {
  window.historyInterval = h.interval_s;
  samples = samples.concat(h.samples || []);
  const newest = samples.length ? samples[samples.length - 1].ts : 0;
  samples = samples.filter((p) => p.ts > newest - CHART_SPAN_S);
  const s = samples;
  chart($('chart-util'), s, [
    {name: 'host CPU %', value: (p) => p.cpu_percent},
    {name: 'tasks ×10', value: (p) => 10 * p.tasks},
  ], (v) => v.toFixed(0) + '%');
  chart($('chart-money'), s, [
    {name: 'earned (total)', value: (p) => p.earned},
    {name: 'spent (total)', value: (p) => p.spent},
  ], axisMoney);
}

// ---- refresh loop ---------------------------------------------------------------

let slowTick = 0;
async function refresh() {
  if (!token) { $('err').textContent = 'no API token: open the URL that `synord dashboard` prints'; return; }
  try {
    const [st, peers, jobs, limits] = await Promise.all([
      api('/v1/status'), api('/v1/peers'), api('/v1/jobs'), api('/v1/limits')]);
    renderStatus(st);
    renderPeers(peers);
    renderJobs(jobs);
    renderLimits(limits);
    if (slowTick++ % 5 === 0) {  // the heavier documents every ~10 s
      const [probe, book, ledger, hist] = await Promise.all([
        api('/v1/probe'), api('/v1/book'), api('/v1/ledger'),
        api('/v1/history?since=' + (samples.length ? samples[samples.length - 1].ts : 0))]);
      renderHardware(probe);
      renderLedger(ledger);  // first: it sets the currency unit
      renderBook(book);
      renderHistory(hist);
    }
    $('err').textContent = '';
    document.body.dataset.loaded = '1';
  } catch (e) {
    $('err').textContent = 'cannot reach the daemon: ' + e.message;
    $('state').className = 'state off';
    $('state').textContent = 'Offline';
  }
}

async function setPaused(paused) {
  try {
    await api(paused ? '/v1/pause' : '/v1/resume', 'POST');
  } catch (e) { $('err').textContent = e.message; }
  refresh();
}

$('pause').onclick = () => setPaused(true);
$('resume').onclick = () => setPaused(false);
$('limits').onsubmit = applyLimits;
$('log-close').onclick = () => { if (logAbort) logAbort.abort(); $('logbox').hidden = true; };
refresh();
setInterval(refresh, 2000);
