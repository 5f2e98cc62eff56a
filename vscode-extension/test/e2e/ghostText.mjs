// End-to-end: a real VS Code (code-server) in headless Chromium, with the packaged .vsix and the
// real Python server (its fake engine, so that the ghost text is known). Types in a Python file
// and checks the ghost text, cycling (Alt+]), partial accept (Ctrl+Right) and accept (Tab).
//
// Needs what `npm run test:e2e:setup` (test/e2e/setup.sh) installs: Debian chromium, Node 24,
// code-server and playwright-core under .e2e/. Run with `npm run test:e2e` (it packages the .vsix first).
// Env: CODECOMPLETE_PYTHON (default python3), CHROMIUM (default /usr/bin/chromium),
// E2E_KEEP=1 keeps the scratch folder, E2E_SCREENSHOT=path saves the final screen.

import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import { chmodSync, existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), '../..');
const DEPS = join(ROOT, '.e2e');
const NODE24_BIN = join(DEPS, 'node', 'bin');
const CODE_SERVER = join(DEPS, 'node_modules', '.bin', 'code-server');
const VSIX = join(ROOT, 'codecomplete.vsix');
const PYTHON = process.env.CODECOMPLETE_PYTHON || 'python3';
const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';
const TIMEOUT_MS = 90_000;

const results = [];
const extensionLogs = [];

/** The extension's output channel logs that code-server wrote (CodeComplete.log). */
function findLogs(dir) {
  if (!existsSync(dir)) return [];
  return readdirSync(dir, { withFileTypes: true }).flatMap((entry) => {
    const path = join(dir, entry.name);
    if (entry.isDirectory()) return findLogs(path);
    return entry.name === 'CodeComplete.log' ? [{ name: path, text: readFileSync(path, 'utf8') }] : [];
  });
}
let failed = 0;

async function step(name, body) {
  const t0 = Date.now();
  try {
    await body();
    results.push(`ok - ${name} (${Date.now() - t0} ms)`);
  } catch (error) {
    failed++;
    results.push(`not ok - ${name}: ${error.message}`);
    throw error;
  }
}

function need(path, what) {
  if (!existsSync(path)) throw new Error(`${what} not found at ${path}: run npm run test:e2e:setup`);
}

function freePort() {
  return new Promise((resolvePort) => {
    const server = createServer();
    server.listen(0, '127.0.0.1', () => {
      const { port } = server.address();
      server.close(() => resolvePort(port));
    });
  });
}

need(CODE_SERVER, 'code-server');
need(join(NODE24_BIN, 'node'), 'Node 24');
need(CHROMIUM, 'Chromium');
need(VSIX, 'codecomplete.vsix (npm run package)');
const require = createRequire(join(DEPS, 'package.json'));
const { chromium } = require('playwright-core');

const scratch = mkdtempSync(join(tmpdir(), 'codecomplete-e2e-'));
const userData = join(scratch, 'user-data');
const extensions = join(scratch, 'extensions');
const workspace = join(scratch, 'project');
mkdirSync(join(userData, 'User'), { recursive: true });
mkdirSync(workspace);
writeFileSync(join(workspace, 'main.py'), 'def show(value):\n    \n');

// serverPath takes no arguments: wrap the real server with the deterministic fake engine.
const wrapper = join(scratch, 'codecomplete-lsp');
writeFileSync(wrapper, `#!/bin/sh\nexec "${PYTHON}" -m codecomplete.lsp --engine-factory codecomplete.lsp.testing:fake_engine "$@"\n`);
chmodSync(wrapper, 0o755);
const codecompleteSettings = {
  'codecomplete.serverPath': wrapper,
  'codecomplete.candidates': 4,
  // Chromium, code-server and the server share two cores here: leave the fake engine time.
  'codecomplete.deadlineMs': 10_000,
};
const editorSettings = {
  'workbench.startupEditor': 'none',
  'workbench.tips.enabled': false,
  'security.workspace.trust.enabled': false,
  'telemetry.telemetryLevel': 'off',
  'update.mode': 'none',
  'extensions.autoUpdate': false,
  'extensions.ignoreRecommendations': true,
  'chat.disableAIFeatures': true,
  'editor.quickSuggestions': { other: false, comments: false, strings: false },
  'editor.suggestOnTriggerCharacters': false,
};
// code-server is a remote window: machine-scoped settings (serverPath, pythonPath, model) come
// from the remote machine's settings, not the user's. Write both, as a user would.
mkdirSync(join(userData, 'Machine'), { recursive: true });
writeFileSync(join(userData, 'User', 'settings.json'), JSON.stringify({ ...editorSettings, ...codecompleteSettings }));
writeFileSync(join(userData, 'Machine', 'settings.json'), JSON.stringify(codecompleteSettings));

const env = { ...process.env, PATH: `${NODE24_BIN}:${process.env.PATH}` };
const dirs = ['--user-data-dir', userData, '--extensions-dir', extensions];
const install = spawnSync(CODE_SERVER, [...dirs, '--install-extension', VSIX], { env, encoding: 'utf8' });
if (install.status !== 0) throw new Error(`installing the .vsix failed:\n${install.stdout}${install.stderr}`);

const port = await freePort();
let serverLog = '';
const codeServer = spawn(
  CODE_SERVER,
  [...dirs, '--auth', 'none', '--bind-addr', `127.0.0.1:${port}`, '--disable-telemetry', '--disable-update-check', '--disable-workspace-trust', workspace],
  { env, detached: true },
);
codeServer.stdout.on('data', (d) => (serverLog += d));
codeServer.stderr.on('data', (d) => (serverLog += d));

const browser = await chromium.launch({ executablePath: CHROMIUM, args: ['--no-sandbox'] });
const page = await browser.newPage({ viewport: { width: 1400, height: 900 } });
page.setDefaultTimeout(TIMEOUT_MS);

const ghostText = async () =>
  (await page.locator('.monaco-editor .ghost-text-decoration, .monaco-editor .ghost-text').allInnerTexts()).map((t) =>
    t.replace(/\u00a0/g, ' '),
  );
// Monaco keeps its line elements in no particular DOM order: sort them by their offset, and
// leave out the ghost text that is drawn inside them.
const editorLines = () =>
  page.evaluate(() =>
    [...document.querySelectorAll('.monaco-editor .view-lines .view-line')]
      .sort((a, b) => parseFloat(a.style.top) - parseFloat(b.style.top))
      .map((line) => {
        const copy = line.cloneNode(true);
        copy.querySelectorAll('[class*="ghost-text"]').forEach((ghost) => ghost.remove());
        return copy.textContent.replace(/\u00a0/g, ' ');
      }),
  );
const currentLine = async () => (await editorLines())[1];
const statusItem = page.locator('.statusbar-item', { hasText: 'CodeComplete' }).first();

async function waitUntil(probe, what, timeoutMs = 10_000) {
  const t0 = Date.now();
  while (!(await probe())) {
    if (Date.now() - t0 > timeoutMs) throw new Error(`timed out: ${what}; lines ${JSON.stringify(await editorLines())}`);
    await page.waitForTimeout(100);
  }
}

async function waitForGhost(predicate, what) {
  const t0 = Date.now();
  for (;;) {
    const ghost = (await ghostText()).join('');
    if (predicate(ghost)) return ghost;
    if (Date.now() - t0 > 30_000) throw new Error(`${what}: ghost text is ${JSON.stringify(ghost)}`);
    await page.waitForTimeout(100);
  }
}

try {
  await step('code-server serves the workbench', async () => {
    for (let i = 0; ; i++) {
      try {
        await page.goto(`http://127.0.0.1:${port}/`, { timeout: 5000 });
        break;
      } catch (error) {
        if (i > 30) throw error;
        await new Promise((r) => setTimeout(r, 1000));
      }
    }
    await page.locator('.monaco-workbench').waitFor();
  });

  await step('the extension starts the server: status bar reaches ready', async () => {
    await statusItem.locator('.codicon-sparkle').waitFor();
  });

  await step('open main.py and type at the end of the indented line', async () => {
    await page.locator('.explorer-folders-view .monaco-list-row', { hasText: 'main.py' }).click();
    await page.locator('.monaco-editor .view-line').nth(1).waitFor();
    await page.locator('.monaco-editor .view-line').nth(1).click();
    await page.keyboard.press('End');
    await page.keyboard.type('pri', { delay: 80 });
  });

  await step('ghost text shows the first candidate', async () => {
    await waitForGhost((g) => g === 'nt(value)', 'first candidate');
  });

  await step('status bar shows the latency of the last completion', async () => {
    await page.waitForFunction(() => [...document.querySelectorAll('.statusbar-item')].some((e) => /CodeComplete \d+ ms/.test(e.textContent ?? '')));
  });

  await step('Alt+] cycles to the next candidate', async () => {
    await page.keyboard.press('Alt+BracketRight');
    await waitForGhost((g) => g === 'ntf(value)', 'second candidate');
    await page.keyboard.press('Alt+BracketLeft');
    await waitForGhost((g) => g === 'nt(value)', 'back to the first candidate');
  });

  await step('Tab accepts the whole candidate', async () => {
    await page.keyboard.press('Tab');
    await waitUntil(async () => /^\s+print\(value\)$/.test(await currentLine()), 'line reads "print(value)"');
  });

  await step('Ctrl+Right accepts the next word only', async () => {
    await page.keyboard.press('Enter');
    await page.keyboard.type('ret', { delay: 80 });
    await waitForGhost((g) => g === 'urn value', 'candidate after "ret"');
    await page.keyboard.press('Control+ArrowRight');
    await waitUntil(async () => /^\s+return$/.test((await editorLines())[2]), 'line reads "return"');
    await waitForGhost((g) => g.trim() === 'value', 'the rest after a partial accept');
    await page.keyboard.press('Tab');
    await waitUntil(async () => /^\s+return value$/.test((await editorLines())[2]), 'line reads "return value"');
  });

  await step('Disable Completions from the command palette stops ghost text', async () => {
    await page.keyboard.press('Control+Shift+P');
    await page.keyboard.type('CodeComplete: Disable Completions');
    await page.keyboard.press('Enter');
    await statusItem.locator('.codicon-circle-slash').waitFor();
    await page.keyboard.press('Enter');
    await page.keyboard.type('    pri', { delay: 80 });
    await page.waitForTimeout(1500);
    assert.equal((await ghostText()).join(''), '');
  });
} catch {
  // Reported below.
} finally {
  if (process.env.E2E_SCREENSHOT) await page.screenshot({ path: process.env.E2E_SCREENSHOT }).catch(() => undefined);
  await browser.close();
  try {
    process.kill(-codeServer.pid, 'SIGTERM');
  } catch {
    // already gone
  }
  if (failed) extensionLogs.push(...findLogs(join(userData, 'logs')));
  if (!process.env.E2E_KEEP) rmSync(scratch, { recursive: true, force: true });
}

for (const line of results) console.log(line);
if (failed) {
  console.log(`--- code-server log (tail) ---\n${serverLog.slice(-3000)}`);
  for (const log of extensionLogs) console.log(`--- ${log.name} ---\n${log.text.slice(-4000)}`);
}
console.log(`${results.length - failed} passed, ${failed} failed`);
process.exit(failed ? 1 : 0);
