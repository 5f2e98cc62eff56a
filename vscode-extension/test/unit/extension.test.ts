// Activates the real extension (real vscode-languageclient, mocked `vscode`) against a fake
// server process that speaks the codecomplete contract and records what it receives.

import assert from 'node:assert/strict';
import { chmodSync, existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { after, before, test } from 'node:test';
import { activate, COMMANDS, deactivate, type CodeCompleteApi } from '../../src/extension';
import { CancellationTokenSource, InlineCompletionList, InlineCompletionTriggerKind, mock, Position } from '../mock/vscode';

const FAKE_SERVER = resolve(__dirname, '../../fixtures/fakeServer.js');

interface Recorded {
  pid: number;
  method: string;
  params: any;
}

let dir: string;
let logFile: string;
let api: CodeCompleteApi;
const subscriptions: { dispose(): unknown }[] = [];

function recorded(method?: string): Recorded[] {
  if (!existsSync(logFile)) return [];
  const lines = readFileSync(logFile, 'utf8').trim().split('\n').filter(Boolean);
  return lines.map((line) => JSON.parse(line) as Recorded).filter((r) => !method || r.method === method);
}

async function waitFor<T>(what: string, probe: () => T | undefined | false, timeoutMs = 10_000): Promise<T> {
  const start = Date.now();
  for (;;) {
    const value = probe();
    if (value) return value;
    if (Date.now() - start > timeoutMs) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

function inlineProvider(): any {
  const providers = mock.providers('registerInlineCompletionItemProvider');
  assert.equal(providers.length, 1, 'exactly one inline completion provider is registered');
  return providers[0];
}

async function requestInline(document: unknown, line: number, character: number) {
  const context = { triggerKind: InlineCompletionTriggerKind.Automatic, selectedCompletionInfo: undefined };
  const token = new CancellationTokenSource().token;
  return inlineProvider().provideInlineCompletionItems(document, new Position(line, character), context, token);
}

before(async () => {
  mock.reset();
  dir = mkdtempSync(join(tmpdir(), 'codecomplete-ext-'));
  logFile = join(dir, 'server.jsonl');
  process.env.FAKE_SERVER_LOG = logFile;
  // serverPath takes no arguments, so wrap node + script in an executable.
  const wrapper = join(dir, 'codecomplete-lsp');
  writeFileSync(wrapper, `#!/bin/sh\nexec "${process.execPath}" "${FAKE_SERVER}" "$@"\n`);
  chmodSync(wrapper, 0o755);
  mock.settings.set('codecomplete.serverPath', wrapper);
  mock.settings.set('codecomplete.candidates', 3);
  api = activate({ subscriptions } as any);
  await waitFor('server ready', () => api.status.current.state === 'ready');
});

after(async () => {
  await deactivate();
  for (const subscription of subscriptions) subscription.dispose();
  rmSync(dir, { recursive: true, force: true });
});

test('client advertises inline completion and sends the settings at initialize', () => {
  const [initialize] = recorded('initialize');
  assert.ok(initialize, 'the server got initialize');
  assert.ok(initialize.params.capabilities.textDocument.inlineCompletion, 'inlineCompletion capability');
  assert.deepEqual(initialize.params.initializationOptions, {
    codecomplete: {
      model: '',
      runtime: 'onnx',
      device: 'cpu',
      candidates: 3,
      maxTokens: 48,
      deadlineMs: 1000,
      multiline: 'auto',
      enable: { '*': true, markdown: false, plaintext: false },
      isolate: true,
      server: '',
      apiKey: '',
    },
  });
});

test('status bar reaches ready once the server says so', () => {
  const item = mock.statusBarItems[0];
  assert.match(item.text, /sparkle/);
  assert.match(String(item.tooltip), /fake model/);
});

test('inline completion reaches the server and comes back as ghost text items', async () => {
  const document = mock.openDocument('/work/a.py', 'python', 'def hel\n');
  await waitFor('didOpen', () => recorded('textDocument/didOpen').length > 0);
  const result = await requestInline(document, 0, 7);
  const items = result instanceof InlineCompletionList ? result.items : result;
  assert.deepEqual(
    items.map((item: any) => item.insertText),
    ['hello()', 'help()'],
  );
  assert.deepEqual(items[0].range.start, new Position(0, 7));
  const [request] = recorded('textDocument/inlineCompletion');
  assert.equal(request.params.textDocument.uri, 'file:///work/a.py');
  assert.deepEqual(request.params.position, { line: 0, character: 7 });
  await waitFor('latency in the status bar', () => api.status.current.latencyMs === 42);
  assert.match(mock.statusBarItems[0].text, /42 ms/);
});

test('languages switched off never reach the server', async () => {
  const before = recorded('textDocument/inlineCompletion').length;
  const document = mock.openDocument('/work/notes.md', 'markdown', '# Notes\n');
  assert.equal(await requestInline(document, 0, 7), null);
  assert.equal(recorded('textDocument/inlineCompletion').length, before);
});

test('suggestion menu requests stay off unless completionMenu is set', async () => {
  const document = mock.openDocument('/work/menu.py', 'python', 'pri\n');
  const provider: any = mock.providers('registerCompletionItemProvider')[0];
  const context = { triggerKind: 0, triggerCharacter: undefined };
  const ask = () => provider.provideCompletionItems(document, new Position(0, 3), new CancellationTokenSource().token, context);
  assert.equal(await ask(), null);
  assert.equal(recorded('textDocument/completion').length, 0);
  mock.setSettings({ 'codecomplete.completionMenu': true });
  const result = await ask();
  assert.equal((result.items ?? result)[0].label, 'hello');
  assert.equal(recorded('textDocument/completion').length, 1);
  mock.setSettings({ 'codecomplete.completionMenu': undefined });
});

test('settings changes reach the running server without a restart', async () => {
  mock.setSettings({ 'codecomplete.maxTokens': 16, 'codecomplete.enable': { '*': true, go: false } });
  const change = await waitFor('didChangeConfiguration', () => recorded('workspace/didChangeConfiguration').at(-1));
  assert.equal(change.params.settings.codecomplete.maxTokens, 16);
  assert.deepEqual(change.params.settings.codecomplete.enable, { '*': true, go: false });
  assert.equal(recorded('initialize').length, 1);
});

test('disable command stops requests and enable brings them back', async () => {
  const document = mock.openDocument('/work/b.py', 'python', 'x = \n');
  await mock.commands.get(COMMANDS.disable)!();
  assert.equal(await requestInline(document, 0, 4), null);
  assert.match(mock.statusBarItems[0].text, /circle-slash/);
  await mock.commands.get(COMMANDS.enable)!();
  const result = await requestInline(document, 0, 4);
  assert.equal((result.items ?? result).length, 2);
});

test('restart command starts a fresh server process', async () => {
  const firstPid = recorded('initialize')[0].pid;
  await mock.commands.get(COMMANDS.restart)!();
  await waitFor('second initialize', () => recorded('initialize').length === 2);
  assert.notEqual(recorded('initialize')[1].pid, firstPid);
  assert.ok(recorded('shutdown').some((r) => r.pid === firstPid), 'the old server was shut down');
  await waitFor('ready after restart', () => api.status.current.state === 'ready');
  // The provider of the new client works as before.
  const document = mock.openDocument('/work/c.py', 'python', 'pri\n');
  const result = await requestInline(document, 0, 3);
  assert.equal((result.items ?? result).length, 2);
});

test('show log command reveals the output channel with the server log', async () => {
  await mock.commands.get(COMMANDS.showLog)!();
  const channel = mock.outputChannels.find((c) => c.name === 'CodeComplete');
  assert.ok(channel?.shown);
  assert.ok(channel!.lines.some((line) => line.includes('Starting')));
});

test('deactivate shuts the server down', async () => {
  const pid = recorded('initialize').at(-1)!.pid;
  await deactivate();
  await waitFor('exit', () => recorded('exit').some((r) => r.pid === pid));
  assert.equal(api.controller.running, false);
});
