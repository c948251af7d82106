// End-to-end test of /dashboard in Debian's headless Chromium, driven by playwright-core.
//
// Run by tests/api/dashboard.rs, which starts a real redis-server, the sample origin and
// runcache, then this script with:
//   RUNCACHE_URL     the running runcache (e.g. http://127.0.0.1:41234)
//   RUNCACHE_TOKEN   its admin token
//   SCREENSHOT_DIR   where to save screenshots (their paths are printed)
//   CHROMIUM         the browser (default /usr/bin/chromium)
// The harness does what a browser cannot: this script writes `STOP_REDIS` on stdout and waits
// for `ok` on stdin. Progress goes to stderr. Exit status 0 means every check passed.
import { chromium } from 'playwright-core';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import readline from 'node:readline';

const base = need('RUNCACHE_URL');
const token = need('RUNCACHE_TOKEN');
const shots = process.env.SCREENSHOT_DIR || fs.mkdtempSync(path.join(os.tmpdir(), 'runcache-dashboard-'));
const executablePath = process.env.CHROMIUM || '/usr/bin/chromium';
const RUNS = ['dash-1', 'dash-2', 'dash-3', 'dash-4', 'dash-5'];

function need(name) {
  const v = process.env[name];
  if (!v) {
    console.error(`${name} is not set`);
    process.exit(2);
  }
  return v;
}

const log = (...a) => console.error('[dashboard]', ...a);
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

// The whole run is bounded: a hung browser must fail the test, not hang CI.
const watchdog = setTimeout(() => {
  console.error('[dashboard] FAILED: no result within 240 s');
  process.exit(1);
}, 240_000);

const lines = readline.createInterface({ input: process.stdin })[Symbol.asyncIterator]();
async function harness(command) {
  process.stdout.write(command + '\n');
  const { value, done } = await lines.next();
  if (done || value.trim() !== 'ok') throw new Error(`the harness did not ${command}: ${value}`);
}

function check(cond, what) {
  if (!cond) throw new Error('check failed: ' + what);
}

async function api(method, p, tok = token) {
  const resp = await fetch(base + p, { method, headers: { Authorization: 'Bearer ' + tok } });
  const body = await resp.json();
  check(resp.ok, `${method} ${p} answered ${resp.status}: ${JSON.stringify(body)}`);
  return body;
}

async function view(p) {
  const resp = await fetch(base + p);
  await resp.arrayBuffer();
  return resp;
}

async function waitFor(what, fn, ms = 30_000) {
  const deadline = Date.now() + ms;
  let last;
  for (;;) {
    try {
      const v = await fn();
      if (v) return v;
    } catch (e) {
      last = e;
    }
    if (Date.now() > deadline) {
      throw new Error(`timed out after ${ms} ms waiting for ${what}` + (last ? `: ${last.message}` : ''));
    }
    await sleep(150);
  }
}

let refusalExpected = false;

const metricsPath = (id) => `/api/v1/models/train/${id}/metrics`;

async function main() {
  const profile = fs.mkdtempSync(path.join(os.tmpdir(), 'runcache-chromium-'));
  const context = await chromium.launchPersistentContext(profile, {
    executablePath,
    headless: true,
    args: ['--no-sandbox', '--disable-gpu', '--disable-background-networking',
      '--disable-component-update', '--disable-sync', '--no-first-run'],
    viewport: { width: 1280, height: 900 },
    colorScheme: 'light',
  });
  const errors = [];
  // The browser reports the 401 that the wrong-token step provokes on purpose.
  const expected = (text) => refusalExpected && text.includes('status of 401');
  const page = context.pages()[0] || (await context.newPage());
  page.on('pageerror', (e) => errors.push('page error: ' + e.message));
  page.on('console', (m) => {
    if (m.type() === 'error' && !expected(m.text())) errors.push('console error: ' + m.text());
  });
  try {
    await run(page);
    check(errors.length === 0, 'the page logged errors:\n' + errors.join('\n'));
  } finally {
    await context.close();
    fs.rmSync(profile, { recursive: true, force: true });
  }
}

async function tiles(page) {
  return page.evaluate(() => Object.fromEntries(
    [...document.querySelectorAll('#tiles [data-stat]')].map((n) => [n.dataset.stat, { value: n.dataset.value, text: n.textContent }])));
}

async function chart(page, id) {
  return page.evaluate((id) => {
    const f = document.getElementById(id);
    return { points: Number(f.dataset.points || 0), last: JSON.parse(f.dataset.last || '{}') };
  }, id);
}

async function shot(page, name, width) {
  await page.setViewportSize({ width, height: 900 });
  await sleep(400); // the charts follow their container's width through a ResizeObserver
  const file = path.join(shots, name);
  await page.screenshot({ path: file, fullPage: true });
  console.error(`[dashboard] screenshot (${width} px): ${file}`);
}

async function run(page) {
  // 1. The page loads without a token and asks for one.
  await page.goto(base + '/dashboard');
  await page.waitForSelector('#login:not([hidden])');
  check(await page.isHidden('#board'), 'the board is hidden before sign-in');

  // 2. The token, from the keyboard: the field has the focus, Enter submits.
  check(await page.evaluate(() => document.activeElement.id) === 'token', 'the token field has the focus');
  await page.keyboard.type(token);
  await page.keyboard.press('Enter');
  await page.waitForSelector('#board:not([hidden])');
  const storage = await page.evaluate(() => [sessionStorage.getItem('runcache.adminToken'), localStorage.length]);
  check(storage[0] === token && storage[1] === 0, 'the token is in session storage only: ' + JSON.stringify(storage));
  log('signed in');

  // 3. Traffic, then the figures shown match /cache/stats.
  for (const id of RUNS) {
    check((await view(metricsPath(id))).headers.get('x-cache') === 'MISS', `first read of ${id} is a miss`);
    check((await view(metricsPath(id))).headers.get('x-cache') === 'HIT', `second read of ${id} is a hit`);
  }
  const stats = await api('GET', '/cache/stats');
  check(stats.stats.hits >= RUNS.length && stats.stats.misses >= RUNS.length, 'stats counted the traffic');
  const nf = new Intl.NumberFormat('en');
  await waitFor('the tiles to show /cache/stats', async () => {
    const t = await tiles(page);
    const want = {
      total_requests: stats.stats.total_requests,
      hits: stats.stats.hits,
      misses: stats.stats.misses,
      hit_rate_percent: stats.stats.hit_rate_percent,
      backend: stats.backend,
      version: stats.version,
      pending_invalidations: stats.pending_invalidations,
    };
    for (const [k, v] of Object.entries(want)) {
      if (t[k].value !== String(v)) throw new Error(`${k}: shown ${t[k].value}, /cache/stats ${v}`);
    }
    return t.hits.text === nf.format(stats.stats.hits) && t.backend.text === 'Redis';
  });
  const row = await page.evaluate(() => [...document.querySelectorAll('#views tr[data-view="metrics"] td')].map((td) => td.textContent));
  const mv = stats.views.metrics;
  check(row[0] === nf.format(mv.hits) && row[1] === nf.format(mv.misses), `metrics row ${row} matches ${mv.hits}/${mv.misses}`);
  await waitFor('the hottest keys', async () => (await page.textContent('#hot')).includes('model:metrics:dash-'));
  log('figures match /cache/stats');

  // 4. More traffic, and the hit-rate chart moves.
  const before = await chart(page, 'chart-traffic');
  const pixelsBefore = await page.locator('#chart-traffic .plot').screenshot();
  let traffic = true;
  const load = (async () => {
    while (traffic) {
      await Promise.all(RUNS.map((id) => view(metricsPath(id))));
      await sleep(20); // leave the browser some of the two cores
    }
  })();
  const moved = await waitFor('the hit-rate chart to show a sample with hits', async () => {
    const c = await chart(page, 'chart-traffic');
    return c.points > before.points && c.last['Hit rate'] > 50 && c.last.Requests > 0 ? c : null;
  });
  traffic = false;
  await load;
  await sleep(300);
  const pixelsAfter = await page.locator('#chart-traffic .plot').screenshot();
  check(!pixelsBefore.equals(pixelsAfter), 'the chart was redrawn');
  check((await page.textContent('#chart-traffic [data-summary]')).includes('Hit rate'), 'the chart has a text summary');
  log(`hit-rate chart moved: ${before.points} -> ${moved.points} points, last hit rate ${moved.last['Hit rate']} %`);

  // 5. Clear: a dry run first (counts, deletes nothing), Escape cancels, then a real clear.
  const pattern = 'model:metrics:dash-*';
  const expected = (await api('DELETE', `/cache/clear?pattern=${pattern}&dry_run=true`)).deleted_count;
  check(expected === RUNS.length, `dry run through the API counts ${RUNS.length}: ${expected}`);
  await page.fill('#clear-pattern', pattern);
  await page.click('#form-clear button[type="submit"]');
  await page.waitForSelector('#confirm[open]');
  check((await page.textContent('#result')).includes(`${expected} entries match ${pattern}`), 'the count is shown');
  check((await page.textContent('#confirm-text')).includes(`${expected} entries`), 'the confirmation names the count');
  await page.keyboard.press('Escape');
  await waitFor('the cancelled clear', async () => (await page.textContent('#result')).includes('Nothing was cleared'));
  check((await api('DELETE', `/cache/clear?pattern=${pattern}&dry_run=true`)).deleted_count === expected, 'the dry run and the cancel deleted nothing');
  await page.click('#form-clear button[type="submit"]');
  await page.waitForSelector('#confirm[open]');
  await page.click('#confirm-ok');
  await waitFor('the clear result', async () => (await page.textContent('#result')).includes(`Cleared ${expected} cache entries matching pattern: ${pattern}`));
  check((await api('DELETE', `/cache/clear?pattern=${pattern}&dry_run=true`)).deleted_count === 0, 'nothing matches after the clear');
  await waitFor('the clear in the recent actions', async () => (await page.textContent('#recent')).includes(pattern));
  log(`dry run counted ${expected}, the clear deleted them`);

  // The other actions, each with its result.
  await page.fill('#warm-runs', 'dash-8, dash-9');
  await page.click('#form-warm button[type="submit"]');
  await waitFor('the warm result', async () => (await page.textContent('#result')).includes('Warmed 4 entries'));
  await page.fill('#invalidate-run', 'dash-9');
  await page.click('#form-invalidate button[type="submit"]');
  await waitFor('the invalidation result', async () => /Invalidated run dash-9: [1-9]/.test(await page.textContent('#result')));
  log('warm and invalidate work');

  await shot(page, 'dashboard-1280.png', 1280);
  await shot(page, 'dashboard-390.png', 390);
  await page.emulateMedia({ colorScheme: 'dark' });
  await shot(page, 'dashboard-390-dark.png', 390);
  await page.emulateMedia({ colorScheme: 'light' });
  await page.setViewportSize({ width: 1280, height: 900 });

  await page.fill('#version-new', 'v2');
  await page.click('#form-version button[type="submit"]');
  await page.waitForSelector('#confirm[open]');
  await page.click('#confirm-ok');
  await waitFor('the version switch', async () => (await page.textContent('#result')).includes('Switched from v1 to v2'));
  await waitFor('the version tile', async () => (await tiles(page)).version.value === 'v2');
  log('version switched');

  // 6. Redis stops: the page shows the fallback.
  await harness('STOP_REDIS');
  await waitFor('the memory fallback', async () => {
    await view(metricsPath('dash-1'));
    const t = await tiles(page);
    const banner = await page.locator('#banner');
    return t.backend.value === 'memory' && t.circuit.value === 'open' && t.redis.value === 'false' &&
      (await banner.isVisible()) &&
      (await banner.textContent()).includes('memory tier');
  });
  const after = await api('GET', '/cache/stats');
  check(after.backend === 'memory', '/cache/stats agrees: ' + after.backend);
  await shot(page, 'dashboard-fallback-1280.png', 1280);
  log('fallback shown');

  // 7. A wrong token gets a clear message, and is not kept.
  await page.click('#signout');
  await page.waitForSelector('#login:not([hidden])');
  check(await page.evaluate(() => sessionStorage.getItem('runcache.adminToken')) === null, 'signing out forgets the token');
  refusalExpected = true;
  await page.fill('#token', 'not-the-token');
  await page.keyboard.press('Enter');
  await page.waitForSelector('#login-error:not([hidden])');
  const msg = await page.textContent('#login-error');
  check(msg.includes('refused') && msg.includes('401') && msg.includes('admin.token'), 'the wrong-token message is clear: ' + msg);
  check(await page.isHidden('#board'), 'a wrong token shows no figures');
  check(await page.evaluate(() => sessionStorage.getItem('runcache.adminToken')) === null, 'a wrong token is not kept');
  log('wrong token refused with: ' + msg);
}

main().then(
  () => {
    clearTimeout(watchdog);
    console.error(`[dashboard] PASSED; screenshots in ${shots}`);
    process.exit(0);
  },
  (e) => {
    console.error('[dashboard] FAILED: ' + (e && e.stack ? e.stack : e));
    process.exit(1);
  },
);
