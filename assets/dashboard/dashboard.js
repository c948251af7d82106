// runcache dashboard: plain JavaScript, no build step. It reads /cache/stats every 2 s and
// /cache/stats/history (only the samples it does not have yet), draws the history with uPlot,
// and runs the admin actions. The admin token lives in this tab's sessionStorage only.
(function () {
  'use strict';

  const TOKEN_KEY = 'runcache.adminToken';
  const REFRESH_MS = 2000;
  // A request that hangs must not stop the refreshing: it is abandoned after this.
  const TIMEOUT_MS = 5000;

  const $ = (sel) => document.querySelector(sel);
  const el = (tag, attrs, ...children) => {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === 'class') node.className = v;
      else node.setAttribute(k, v);
    }
    for (const c of children) node.append(c);
    return node;
  };

  let token = null;
  let timer = null;
  let inFlight = false;
  let lastT = 0;
  let samples = [];
  let capacity = 720;
  let charts = [];
  let currentVersion = '';
  let instance = null; // `instance` and `started_ms` of the history being drawn
  let intervalMs = 5000;
  let lastOk = 0;

  class ApiError extends Error {
    constructor(status, code, message, retryAfter) {
      super(message);
      this.status = status;
      this.code = code;
      this.retryAfter = retryAfter;
    }
  }

  // Paths are relative to the page (/dashboard), so the page also works behind a proxy that
  // serves runcache under a prefix.
  async function api(method, path, body) {
    const headers = { Authorization: 'Bearer ' + token, Accept: 'application/json' };
    const init = { method, headers, cache: 'no-store', credentials: 'omit', signal: AbortSignal.timeout(TIMEOUT_MS) };
    if (body !== undefined) {
      headers['Content-Type'] = 'application/json';
      init.body = JSON.stringify(body);
    }
    let resp;
    try {
      resp = await fetch(path, init);
    } catch (e) {
      const why = e.name === 'TimeoutError' ? 'no answer within ' + TIMEOUT_MS / 1000 + ' s' : e.message;
      throw new ApiError(0, 'unreachable', 'runcache did not answer (' + why + ')');
    }
    let data = null;
    try {
      data = await resp.json();
    } catch (_) {
      data = null;
    }
    if (!resp.ok) {
      const err = data && data.error ? data.error : {};
      throw new ApiError(resp.status, err.code || 'http_' + resp.status,
        err.message || resp.statusText || 'HTTP ' + resp.status, resp.headers.get('Retry-After'));
    }
    return data;
  }

  function explain(e) {
    if (e.status === 401) {
      return 'That token was refused (401 unauthorized): it is not this runcache\'s admin token. ' +
        'Use the value of admin.token (RUNCACHE__ADMIN__TOKEN), or the token runcache logged at start.';
    }
    if (e.status === 429) {
      return 'Too many admin requests from this address (429); retry in ' + (e.retryAfter || 'a few') + ' s.';
    }
    if (e.status === 0) return 'runcache is unreachable: ' + e.message + '.';
    return e.message + ' (' + e.status + ' ' + e.code + ')';
  }

  // ---- formatting ----------------------------------------------------------------------
  const nf = new Intl.NumberFormat('en');
  const fmtInt = (v) => (v == null ? '–' : nf.format(v));
  const fmtMs = (v) => (v == null ? '–' : (v < 10 ? v.toFixed(2) : v.toFixed(1)) + ' ms');
  const fmtPct = (v) => (v == null ? '–' : v.toFixed(1) + ' %');
  const fmtRate = (v) => (v == null ? '–' : (v < 10 ? v.toFixed(2) : v.toFixed(1)) + '/s');
  function fmtBytes(v) {
    if (v == null) return '–';
    const units = ['B', 'KiB', 'MiB', 'GiB'];
    let i = 0;
    while (v >= 1024 && i < units.length - 1) { v /= 1024; i++; }
    return (i === 0 ? v : v.toFixed(1)) + ' ' + units[i];
  }
  const fmtTime = (ms) => new Date(ms).toLocaleTimeString();
  // Axis ticks: 24-hour clock, short enough for a 390 px screen.
  const fmtTick = (ms) => new Date(ms).toLocaleTimeString([], { hourCycle: 'h23', hour: '2-digit', minute: '2-digit', second: '2-digit' });
  const RECENT_SHOWN = 10;

  // ---- sign-in -------------------------------------------------------------------------
  function showLogin(message) {
    stop();
    $('#board').hidden = true;
    $('#signout').hidden = true;
    $('#login').hidden = false;
    const err = $('#login-error');
    err.textContent = message || '';
    err.hidden = !message;
    $('#token').value = '';
    $('#token').focus();
  }

  async function signIn(candidate) {
    token = candidate;
    const button = $('#login-form button');
    button.disabled = true;
    try {
      const stats = await api('GET', 'cache/stats');
      sessionStorage.setItem(TOKEN_KEY, token);
      $('#login').hidden = true;
      $('#board').hidden = false;
      $('#signout').hidden = false;
      renderStats(stats);
      await loadHistory(true);
      start();
      $('#main').focus({ preventScroll: true });
    } catch (e) {
      token = null;
      // Only a refusal forgets the saved token: after an outage or a 429, a reload retries.
      if (e.status === 401) sessionStorage.removeItem(TOKEN_KEY);
      showLogin(explain(e));
    } finally {
      button.disabled = false;
    }
  }

  function signOut(message) {
    token = null;
    sessionStorage.removeItem(TOKEN_KEY);
    samples = [];
    lastT = 0;
    instance = null;
    destroyCharts();
    showLogin(message);
  }

  // ---- refresh loop --------------------------------------------------------------------
  function start() {
    stop();
    lastOk = Date.now();
    timer = setInterval(() => {
      checkStale();
      refresh();
    }, REFRESH_MS);
  }

  // Figures older than a few refreshes are said to be so, whatever is failing.
  function checkStale() {
    if (Date.now() - lastOk > 3 * REFRESH_MS && !problem) {
      setProblem('The figures are stale: no update from runcache since ' + fmtTime(lastOk) + '.');
    }
  }

  function stop() {
    if (timer) clearInterval(timer);
    timer = null;
  }

  async function refresh() {
    if (inFlight || !token) return;
    inFlight = true;
    try {
      const stats = await api('GET', 'cache/stats');
      renderStats(stats);
      await loadHistory(false);
      lastOk = Date.now();
      setProblem(null);
    } catch (e) {
      if (e.status === 401) {
        signOut('The token is no longer accepted (401): was admin.token changed? Enter the current one.');
      } else {
        setProblem('Could not refresh: ' + explain(e));
      }
    } finally {
      inFlight = false;
    }
  }

  let problem = null;
  function setProblem(text) {
    problem = text;
    updateBanner();
  }

  let fallback = null;
  function updateBanner() {
    const banner = $('#banner');
    const text = problem || fallback;
    banner.textContent = text || '';
    banner.hidden = !text;
    banner.dataset.kind = problem ? 'error' : (fallback ? 'fallback' : '');
  }

  async function loadHistory(initial) {
    const hist = await api('GET', 'cache/stats/history' + (lastT && !initial ? '?since=' + lastT : ''));
    const from = hist.instance + '@' + hist.started_ms;
    if (!initial && instance !== from) {
      // Another instance answered (a balancer in front), or this one restarted: its history is
      // its own, so the charts start again from it rather than splice two series together.
      lastT = 0;
      return loadHistory(true);
    }
    instance = from;
    $('#instance').textContent = 'instance ' + hist.instance.slice(0, 8) + ' ·';
    $('#instance').title = hist.instance;
    intervalMs = hist.interval_ms || intervalMs;
    capacity = hist.capacity || capacity;
    $('#interval').textContent = String(Math.round((hist.interval_ms || 5000) / 100) / 10);
    if (initial) samples = [];
    for (const s of hist.samples) {
      if (s.t_ms > lastT || initial) samples.push(s);
    }
    if (samples.length > capacity) samples = samples.slice(samples.length - capacity);
    if (samples.length) lastT = samples[samples.length - 1].t_ms;
    const last = samples[samples.length - 1];
    // Whether Redis answers is what the last background probe found, which can differ from
    // the store in use: the circuit closes only once a returning Redis is made safe.
    if (last && last.redis_reachable != null) {
      const up = last.redis_reachable;
      setStat('redis', up, up ? 'up' : 'unreachable', up ? 'good' : 'bad');
    }
    drawCharts();
  }

  // ---- figures -------------------------------------------------------------------------
  function setStat(name, value, text, state) {
    for (const node of document.querySelectorAll('[data-stat="' + name + '"]')) {
      node.textContent = text;
      node.dataset.value = value == null ? '' : String(value);
      node.classList.toggle('good', state === 'good');
      node.classList.toggle('bad', state === 'bad');
    }
  }

  function renderStats(s) {
    const st = s.stats;
    const onRedis = s.backend === 'redis';
    currentVersion = s.version;
    setStat('backend', s.backend, onRedis ? 'Redis' : 'memory (fallback)', onRedis ? 'good' : 'bad');
    setStat('redis', s.redis_reachable, s.redis_reachable ? 'up' : 'unreachable', s.redis_reachable ? 'good' : 'bad');
    setStat('circuit', onRedis ? 'closed' : 'open', onRedis ? 'closed' : 'open', onRedis ? 'good' : 'bad');
    setStat('pending_invalidations', s.pending_invalidations, fmtInt(s.pending_invalidations),
      s.pending_invalidations > 0 ? 'bad' : null);
    setStat('version', s.version, s.version);
    setStat('hit_rate_percent', st.hit_rate_percent, fmtPct(st.hit_rate_percent));
    setStat('total_requests', st.total_requests, fmtInt(st.total_requests));
    setStat('hits', st.hits, fmtInt(st.hits));
    setStat('misses', st.misses, fmtInt(st.misses));
    setStat('p95_latency_ms', st.p95_latency_ms, fmtMs(st.p95_latency_ms));
    setStat('origin_errors', st.origin_errors, fmtInt(st.origin_errors), st.origin_errors > 0 ? 'bad' : null);
    setStat('keys', st.keys, st.keys_method === 'pending' ? 'counting…' : fmtInt(st.keys));

    fallback = onRedis ? null
      : 'Redis is unreachable: runcache is serving from its in-process memory tier (fallback). ' +
        (s.pending_invalidations > 0
          ? fmtInt(s.pending_invalidations) + ' invalidation(s) are journaled and will reach Redis before it serves again.'
          : 'It returns to Redis by itself when Redis answers again.');
    updateBanner();

    const tbody = $('#views tbody');
    tbody.replaceChildren(...Object.entries(s.views).map(([name, v]) => el('tr', { 'data-view': name },
      el('th', { scope: 'row' }, name),
      el('td', {}, fmtInt(v.hits)),
      el('td', {}, fmtInt(v.misses)),
      el('td', {}, fmtPct(v.hits + v.misses ? v.hit_rate_percent : null)),
      el('td', {}, fmtInt(v.stale_served)),
      el('td', {}, fmtInt(v.errors)),
      el('td', {}, v.p95_latency_ms.toFixed(2)),
      el('td', {}, v.avg_origin_latency_ms.toFixed(1)),
      el('td', {}, fmtInt(v.ttl_seconds)))));

    const hot = s.hot_keys || [];
    $('#hot').replaceChildren(...hot.map((h) => el('li', {},
      el('code', {}, h.key), ' ', el('span', { class: 'meta' }, fmtInt(h.reads) + (h.reads === 1 ? ' read' : ' reads')))));
    $('#hot-empty').hidden = hot.length > 0;

    const recent = (s.recent_actions || []).slice(0, RECENT_SHOWN);
    $('#recent').replaceChildren(...recent.map((r) => el('li', {},
      el('strong', {}, r.action), ' ', el('code', {}, r.target), ' ',
      el('span', { class: 'meta' }, '· ' + fmtInt(r.entries) + ' entries · ' + r.who + ' · ' + fmtTime(r.at_ms)))));
    $('#recent-empty').hidden = recent.length > 0;

    $('#updated').textContent = 'updated ' + new Date().toLocaleTimeString();
    $('#updated').title = s.message;
  }

  // ---- charts --------------------------------------------------------------------------
  // A log scale has no 0: a sub-microsecond interval is drawn as a gap.
  const positive = (v) => (v > 0 ? v : null);
  const perSec = (field) => (s) => (s.interval_ms > 0 ? (s[field] * 1000) / s.interval_ms : null);
  const CHARTS = [
    {
      id: 'chart-traffic',
      series: [
        { label: 'Hit rate', value: (s) => s.hit_rate_percent, scale: '%', color: '--s1', fmt: fmtPct },
        { label: 'Requests', value: (s) => s.request_rate, scale: 'rps', color: '--s2', dash: [7, 4], fmt: fmtRate },
      ],
      axes: [{ scale: '%', side: 3, fmt: (v) => v + ' %' }, { scale: 'rps', side: 1, fmt: (v) => v + '/s' }],
      scales: { '%': { auto: false, range: [0, 100] }, rps: { range: (u, min, max) => [0, Math.max(1, max * 1.1)] } },
    },
    {
      id: 'chart-latency',
      series: [
        { label: 'p50', value: (s) => positive(s.p50_ms), scale: 'ms', color: '--s3', fmt: fmtMs },
        { label: 'p95', value: (s) => positive(s.p95_ms), scale: 'ms', color: '--s2', dash: [7, 4], fmt: fmtMs },
        { label: 'p99', value: (s) => positive(s.p99_ms), scale: 'ms', color: '--s4', dash: [2, 3], fmt: fmtMs },
      ],
      // Logarithmic: hits take microseconds and misses the origin's hundreds of milliseconds,
      // and both must stay readable on one chart.
      axes: [{ scale: 'ms', side: 3, fmt: (v) => +v.toPrecision(2) + ' ms' }],
      scales: { ms: { distr: 3, log: 10 } },
    },
    {
      id: 'chart-origin',
      series: [
        { label: 'Origin requests', value: (s) => s.origin_rate, scale: 'rps', color: '--s1', fmt: fmtRate },
        { label: 'Origin errors', value: perSec('origin_errors'), scale: 'rps', color: '--s4', dash: [7, 4], fmt: fmtRate },
        { label: 'Stale serves', value: perSec('stale_served'), scale: 'rps', color: '--s2', dash: [2, 3], fmt: fmtRate },
        { label: 'Coalesced', value: perSec('coalesced'), scale: 'rps', color: '--s5', dash: [10, 3, 2, 3], fmt: fmtRate },
      ],
      axes: [{ scale: 'rps', side: 3, fmt: (v) => v + '/s' }],
      scales: { rps: { range: (u, min, max) => [0, Math.max(1, max * 1.1)] } },
    },
    {
      id: 'chart-memory',
      series: [
        { label: 'Memory tier', value: (s) => s.memory_bytes, scale: 'bytes', color: '--s1', fmt: fmtBytes },
        { label: 'Near cache', value: (s) => s.near_bytes, scale: 'bytes', color: '--s3', dash: [7, 4], fmt: fmtBytes },
      ],
      axes: [{ scale: 'bytes', side: 3, fmt: fmtBytes }],
      scales: { bytes: { range: (u, min, max) => [0, Math.max(1024, max * 1.1)] } },
    },
  ];

  function cssVar(name) {
    return getComputedStyle(document.documentElement).getPropertyValue(name).trim();
  }

  function plotSize(node) {
    const width = Math.max(240, Math.floor(node.clientWidth || node.parentElement.clientWidth - 32));
    return { width, height: width < 500 ? 200 : 240 };
  }

  function makeChart(def) {
    const fig = document.getElementById(def.id);
    const node = fig.querySelector('.plot');
    const text = cssVar('--text');
    const grid = cssVar('--grid');
    const axis = (a) => ({
      scale: a.scale,
      side: a.side,
      stroke: text,
      grid: { stroke: grid, width: 1 },
      ticks: { stroke: grid, width: 1 },
      size: 72,
      values: (u, vals) => vals.map((v) => (v == null ? '' : a.fmt(v))),
    });
    const opts = {
      ...plotSize(node),
      scales: { x: { time: true }, ...def.scales },
      series: [
        { value: (u, v) => (v == null ? '–' : fmtTime(v * 1000)) },
        ...def.series.map((s) => ({
          label: s.label,
          scale: s.scale,
          stroke: cssVar(s.color),
          width: 2,
          dash: s.dash,
          spanGaps: false,
          points: { show: false },
          value: (u, v) => s.fmt(v),
        })),
      ],
      axes: [{
        stroke: text,
        grid: { stroke: grid, width: 1 },
        ticks: { stroke: grid, width: 1 },
        space: 70,
        values: (u, vals) => vals.map((v) => fmtTick(v * 1000)),
      }, ...def.axes.map(axis)],
      legend: { live: true },
      cursor: { drag: { x: false, y: false } },
    };
    const plot = new uPlot(opts, dataFor(def), node);
    const ro = new ResizeObserver(() => plot.setSize(plotSize(node)));
    ro.observe(node);
    return { def, fig, plot, ro };
  }

  // A missed sample (the instance was down or stalled) is drawn as a gap, not a straight line.
  function dataFor(def) {
    const xs = [];
    const ys = def.series.map(() => []);
    let prev = null;
    for (const s of samples) {
      if (prev && s.t_ms - prev.t_ms > 2.5 * intervalMs) {
        xs.push((prev.t_ms + intervalMs) / 1000);
        ys.forEach((y) => y.push(null));
      }
      xs.push(s.t_ms / 1000);
      def.series.forEach((ser, i) => ys[i].push(ser.value(s)));
      prev = s;
    }
    return [xs, ...ys];
  }

  function drawCharts() {
    if (typeof uPlot === 'undefined') return;
    if (!charts.length) charts = CHARTS.map(makeChart);
    for (const c of charts) {
      c.plot.setData(dataFor(c.def));
      summarise(c);
    }
  }

  // A text version of each chart's latest point, for screen readers and for tests.
  function summarise(c) {
    const last = samples[samples.length - 1];
    c.fig.dataset.points = String(samples.length);
    if (!last) {
      c.fig.querySelector('[data-summary]').textContent = 'No sample yet.';
      return;
    }
    const values = {};
    const parts = c.def.series.map((s) => {
      const v = s.value(last);
      values[s.label] = v;
      return s.label + ' ' + s.fmt(v);
    });
    c.fig.dataset.last = JSON.stringify(values);
    c.fig.querySelector('[data-summary]').textContent =
      'Latest (' + fmtTime(last.t_ms) + '): ' + parts.join(', ') + '.';
  }

  function destroyCharts() {
    for (const c of charts) {
      c.ro.disconnect();
      c.plot.destroy();
    }
    charts = [];
  }

  // Dark mode follows the system: the charts are redrawn in the new colours.
  window.matchMedia('(prefers-color-scheme: dark)').addEventListener('change', () => {
    if (!charts.length) return;
    destroyCharts();
    drawCharts();
  });

  // ---- actions -------------------------------------------------------------------------
  function confirmDialog(text, okLabel) {
    const dialog = $('#confirm');
    $('#confirm-text').textContent = text;
    $('#confirm-ok').textContent = okLabel;
    return new Promise((resolve) => {
      const finish = (answer) => {
        $('#confirm-ok').onclick = null;
        $('#confirm-cancel').onclick = null;
        dialog.oncancel = null;
        dialog.close();
        resolve(answer);
      };
      $('#confirm-ok').onclick = () => finish(true);
      $('#confirm-cancel').onclick = () => finish(false);
      dialog.oncancel = (e) => {
        e.preventDefault();
        finish(false);
      };
      dialog.showModal();
    });
  }

  function result(text, failed) {
    const r = $('#result');
    r.textContent = text;
    r.classList.toggle('failed', !!failed);
    r.dataset.outcome = failed ? 'error' : 'ok';
  }

  function action(formId, run) {
    const form = document.getElementById(formId);
    form.addEventListener('submit', async (ev) => {
      ev.preventDefault();
      const button = form.querySelector('button[type="submit"]');
      button.disabled = true;
      result('Working…');
      try {
        await run(form);
      } catch (e) {
        if (e.status === 401) {
          signOut('The token is no longer accepted (401). Enter the current one.');
          return;
        }
        result(explain(e), true);
      } finally {
        button.disabled = false;
        // A disabled button loses the focus (and a closed dialog returns it to nothing):
        // give it back, so that keyboard users carry on where they were.
        if (!document.activeElement || document.activeElement === document.body) button.focus();
        refresh();
      }
    });
  }

  action('form-clear', async (form) => {
    const pattern = form.pattern.value.trim();
    const q = 'cache/clear?pattern=' + encodeURIComponent(pattern);
    const dry = await api('DELETE', q + '&dry_run=true');
    const n = dry.deleted_count;
    if (n === 0) {
      result('No entry matches ' + pattern + ': nothing to clear.');
      return;
    }
    result(fmtInt(n) + ' entries match ' + pattern + '.');
    const ok = await confirmDialog('Delete the ' + fmtInt(n) + ' entries matching ' + pattern +
      ' on every instance? Their next reads go to the origin.', 'Clear ' + fmtInt(n) + ' entries');
    if (!ok) {
      result(fmtInt(n) + ' entries match ' + pattern + '. Nothing was cleared.');
      return;
    }
    const done = await api('DELETE', q);
    result(done.message + '.');
  });

  action('form-invalidate', async (form) => {
    const id = form.run.value.trim();
    const done = await api('POST', 'cache/invalidate', { model_run_id: id });
    result('Invalidated run ' + id + ': ' + fmtInt(done.invalidated) + ' entries dropped.');
  });

  action('form-warm', async (form) => {
    const ids = form.runs.value.split(/[\s,]+/).filter(Boolean);
    const done = await api('POST', 'cache/warm', { model_run_ids: ids });
    const failed = done.failed.length
      ? ' Failed: ' + done.failed.map((f) => f.model_run_id + ' ' + f.view + ' (' + f.error + ')').join('; ') + '.'
      : '';
    result('Warmed ' + fmtInt(done.warmed) + ' entries, ' + fmtInt(done.skipped) + ' already cached.' + failed,
      done.failed.length > 0);
  });

  action('form-version', async (form) => {
    const version = form.version.value.trim();
    const ok = await confirmDialog('Switch every instance from version ' + currentVersion + ' to ' + version +
      '? Every entry of ' + currentVersion + ' is invalidated, and anything stored under ' + version +
      ' earlier is cleared.', 'Switch to ' + version);
    if (!ok) {
      result('Version unchanged (' + currentVersion + ').');
      return;
    }
    const done = await api('POST', 'cache/version', { version });
    result('Switched from ' + done.previous + ' to ' + done.version + '; ' + fmtInt(done.cleared) + ' entries cleared.');
  });

  // ---- start ---------------------------------------------------------------------------
  $('#login-form').addEventListener('submit', (ev) => {
    ev.preventDefault();
    const candidate = $('#token').value.trim();
    if (candidate) signIn(candidate);
  });
  $('#signout').addEventListener('click', () => signOut(null));

  const saved = sessionStorage.getItem(TOKEN_KEY);
  if (saved) signIn(saved);
  else showLogin(null);
})();
