// The real MLflow UI through runcache, in Debian's headless Chromium (playwright-core from
// tests/browser/node_modules). Run by tests/mlflow/run.sh with:
//   GATEWAY_URL     runcache in front of MLflow (config/mlflow.toml)
//   SCREENSHOT_DIR  where the 1280 px screenshots go (their paths are printed, never committed)
//   CHROMIUM        the browser (default /usr/bin/chromium)
// It makes an experiment with two runs through the gateway's REST API, opens the experiments
// list, the experiment's runs table and a run page with its metric chart, then logs a new
// metric through the gateway, reloads the run page and must see it. Exit 0: every check passed.
import { createRequire } from 'node:module';
import fs from 'node:fs';
import path from 'node:path';
import os from 'node:os';

const require = createRequire(new URL('../browser/package.json', import.meta.url));
const { chromium } = require('playwright-core');

const base = process.env.GATEWAY_URL;
if (!base) {
  console.error('GATEWAY_URL is not set');
  process.exit(2);
}
const shots = process.env.SCREENSHOT_DIR || fs.mkdtempSync(path.join(os.tmpdir(), 'runcache-mlflow-ui-'));
const executablePath = process.env.CHROMIUM || '/usr/bin/chromium';
const log = (...a) => console.error('[mlflow-ui]', ...a);
const watchdog = setTimeout(() => {
  console.error('[mlflow-ui] FAILED: no result within 240 s');
  process.exit(1);
}, 240_000);

async function api(p, body) {
  const resp = await fetch(base + '/api/2.0/mlflow/' + p, {
    method: body ? 'POST' : 'GET',
    headers: { 'Content-Type': 'application/json' },
    body: body ? JSON.stringify(body) : undefined,
  });
  const text = await resp.text();
  if (!resp.ok) throw new Error(`${p} answered ${resp.status}: ${text}`);
  return { json: JSON.parse(text || '{}'), headers: resp.headers };
}

const stamp = Date.now().toString(36);
const experimentName = `runcache-ui-${stamp}`;
const { json: created } = await api('experiments/create', { name: experimentName });
const experimentId = created.experiment_id;
const runs = [];
for (const name of ['ui-alpha', 'ui-beta']) {
  const { json } = await api('runs/create', { experiment_id: experimentId, run_name: name, start_time: Date.now() });
  const runId = json.run.info.run_id;
  const metrics = [];
  for (let step = 0; step < 20; step++) {
    metrics.push({ key: 'loss', value: 1 / (step + 1) + (name === 'ui-beta' ? 0.1 : 0), timestamp: Date.now(), step });
  }
  await api('runs/log-batch', { run_id: runId, metrics, params: [{ key: 'lr', value: '0.01' }] });
  runs.push({ name, runId });
}
log(`experiment ${experimentId} (${experimentName}), runs`, runs.map((r) => r.runId).join(', '));

const browser = await chromium.launch({ executablePath, args: ['--no-sandbox'] });
const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
const seen = { requests: 0, hits: 0, passed: 0 };
page.on('response', (resp) => {
  seen.requests++;
  const status = resp.headers()['cache-status'] || '';
  if (process.env.UI_DEBUG && !resp.url().includes('/static-files/')) {
    console.error('[mlflow-ui]', resp.request().method(), resp.url().replace(base, ''), resp.status(), status);
  }
  if (status.includes('hit')) seen.hits++;
  if (status.includes('detail=pass')) seen.passed++;
});
const failures = [];
page.on('pageerror', (e) => failures.push(e.message));

async function shot(name) {
  const file = path.join(shots, `${name}.png`);
  await page.screenshot({ path: file, fullPage: false });
  console.log(`screenshot: ${file}`);
}

async function see(text, what) {
  await page.getByText(text, { exact: false }).first().waitFor({ state: 'visible', timeout: 60_000 });
  log(`saw ${what}`);
}

try {
  await page.goto(base + '/#/experiments', { waitUntil: 'domcontentloaded' });
  await see(experimentName, 'the experiment in the experiments list');
  await shot('1-experiments');

  await page.goto(`${base}/#/experiments/${experimentId}/runs`, { waitUntil: 'domcontentloaded' });
  await see('ui-alpha', 'run ui-alpha in the runs table');
  await see('ui-beta', 'run ui-beta in the runs table');
  await shot('2-runs-table');

  const alpha = runs[0];
  await page.goto(`${base}/#/experiments/${experimentId}/runs/${alpha.runId}/model-metrics`, { waitUntil: 'domcontentloaded' });
  await see('loss', 'the loss chart on the run page');
  await page.waitForTimeout(1500);
  await shot('3-run-metrics');

  // The same page again, with nothing written: the gateway answers it from the cache.
  const before = seen.hits;
  await page.reload({ waitUntil: 'domcontentloaded' });
  await see('loss', 'the loss chart again');
  await page.waitForTimeout(1500);
  const reloadHits = seen.hits - before;
  log(`the reload was served with ${reloadHits} cache hits`);
  if (reloadHits === 0) throw new Error('a reload of an unchanged run page got no cache hit');

  // A write through the gateway, then a reload: the new metric must be on the page.
  await api('runs/log-metric', { run_id: alpha.runId, key: 'accuracy_after_write', value: 0.93, timestamp: Date.now(), step: 0 });
  await page.reload({ waitUntil: 'domcontentloaded' });
  await see('accuracy_after_write', 'the metric logged after the page was cached');
  await page.waitForTimeout(1500);
  await shot('4-run-after-write');

  // The REST view the run page's history comes from, read twice: the second is a hit.
  const q = `metrics/get-history?run_uuid=${alpha.runId}&metric_key=loss&max_results=25000`;
  await api(q);
  const again = await api(q);
  const status = again.headers.get('cache-status') || '';
  if (!status.includes('hit')) throw new Error(`a repeated history read was not a hit: ${status}`);
  log(`browser: ${seen.requests} responses, ${seen.hits} cache hits, ${seen.passed} passed through`);
  if (failures.length) log('page errors (not failures of the gateway):', failures.slice(0, 3).join(' | '));
  console.log('mlflow-ui: passed');
  await browser.close();
  clearTimeout(watchdog);
} catch (e) {
  console.error('[mlflow-ui] FAILED:', e.message);
  try {
    await shot('failure');
  } catch {}
  await browser.close();
  process.exit(1);
}
