// Drives the real Python server (`python -m codecomplete.lsp`) over stdio with vscode-jsonrpc,
// the way the extension's language client does: initialize -> didOpen -> inlineCompletion ->
// cancel -> shutdown. Env: CODECOMPLETE_PYTHON (interpreter, default python3),
// CODECOMPLETE_TEST_MODEL (passed as --model; default: the shipped model).

import assert from 'node:assert/strict';
import { spawn, spawnSync, type ChildProcessWithoutNullStreams } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import {
  CancellationTokenSource,
  createMessageConnection,
  ResponseError,
  StreamMessageReader,
  StreamMessageWriter,
  type MessageConnection,
} from 'vscode-jsonrpc/node';

const PYTHON = process.env.CODECOMPLETE_PYTHON || 'python3';
const MODEL = process.env.CODECOMPLETE_TEST_MODEL;
const REQUEST_TIMEOUT_MS = 120_000;
const REQUEST_CANCELLED = -32800;
const URI = 'file:///tmp/codecomplete-integration/example.py';

const SETTINGS = {
  model: MODEL ?? '',
  runtime: 'onnx',
  device: 'cpu',
  candidates: 2,
  maxTokens: 16,
  deadlineMs: 10_000,
  enable: { '*': true, markdown: false, plaintext: false },
};

// Mid-token cursor: token alignment always lets even a random model continue `pri`.
const TEXT = 'import os\n\n\ndef show(value):\n    pri';

interface Position {
  line: number;
  character: number;
}
interface InlineItem {
  insertText: string | { value: string };
  range?: { start: Position; end: Position };
}
interface Status {
  state: string;
  message?: string;
  latencyMs?: number;
}

/** Why the test cannot run here, or undefined when the server module imports. */
function missingServer(): string | undefined {
  const probe = spawnSync(PYTHON, ['-c', 'import codecomplete.lsp.server'], { encoding: 'utf8' });
  if (probe.error) return `cannot run ${PYTHON} (${probe.error.message}); set CODECOMPLETE_PYTHON`;
  if (probe.status !== 0) {
    const reason = probe.stderr.trim().split('\n').at(-1);
    return `codecomplete.lsp.server is not importable with ${PYTHON}: ${reason}`;
  }
  return undefined;
}

// Which model the server loads: CODECOMPLETE_TEST_MODEL, else the shipped one, else (while no
// model ships yet) a tiny random-weight model made on the spot: gibberish, but the real engine.
const CHOOSE_MODEL = `
import json, sys
from codecomplete.models.folder import DEFAULT_MODEL_DIR, is_model_folder
if is_model_folder(DEFAULT_MODEL_DIR):
    print(json.dumps({"args": [], "what": "the shipped model"}))
else:
    from codecomplete.models.testing import make_test_model
    make_test_model(sys.argv[1])
    print(json.dumps({"args": ["--model", sys.argv[1]], "what": "a tiny random model (no shipped model found)"}))
`;

function chooseModel(scratch: string): { args: string[]; what: string } | string {
  if (MODEL) return { args: ['--model', MODEL], what: `CODECOMPLETE_TEST_MODEL=${MODEL}` };
  const probe = spawnSync(PYTHON, ['-c', CHOOSE_MODEL, join(scratch, 'tiny-model')], { encoding: 'utf8' });
  if (probe.status !== 0) return `no model to load: ${probe.stderr.trim().split('\n').at(-1)}`;
  return JSON.parse(probe.stdout.trim().split('\n').at(-1)!);
}

const scratch = mkdtempSync(join(tmpdir(), 'codecomplete-integration-'));
const model = missingServer() ?? chooseModel(scratch);
const skipReason = typeof model === 'string' ? model : undefined;
if (skipReason) console.log(`# skipping the Python server integration test: ${skipReason}`);
else console.log(`# Python server integration test with ${PYTHON} and ${(model as { what: string }).what}`);

let server: ChildProcessWithoutNullStreams;
let connection: MessageConnection;
let stderr = '';
const statuses: Status[] = [];
let exited: Promise<number | null>;

function withTimeout<T>(what: string, promise: Promise<T>, ms = REQUEST_TIMEOUT_MS): Promise<T> {
  let timer: NodeJS.Timeout;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what} took over ${ms} ms; server stderr:\n${stderr.slice(-4000)}`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

function itemsOf(result: unknown): InlineItem[] {
  if (result === null || result === undefined) return [];
  if (Array.isArray(result)) return result as InlineItem[];
  return (result as { items: InlineItem[] }).items;
}

function textOf(item: InlineItem): string {
  return typeof item.insertText === 'string' ? item.insertText : item.insertText.value;
}

function before_or_equal(a: Position, b: Position): boolean {
  return a.line < b.line || (a.line === b.line && a.character <= b.character);
}

function inlineParams(position: Position) {
  return { textDocument: { uri: URI }, position, context: { triggerKind: 1 } };
}

function endOf(text: string): Position {
  const lines = text.split('\n');
  return { line: lines.length - 1, character: lines[lines.length - 1].length };
}

before(() => {
  if (skipReason) return;
  const args = ['-m', 'codecomplete.lsp', ...(model as { args: string[] }).args];
  server = spawn(PYTHON, args, { env: { ...process.env, PYTHONUNBUFFERED: '1' } });
  server.stderr.on('data', (chunk) => (stderr += chunk.toString()));
  exited = new Promise((resolve) => server.on('exit', (code) => resolve(code)));
  connection = createMessageConnection(new StreamMessageReader(server.stdout), new StreamMessageWriter(server.stdin));
  connection.onNotification('codecomplete/status', (params: Status) => void statuses.push(params));
  connection.onNotification('window/logMessage', () => undefined);
  connection.onNotification('$/progress', () => undefined);
  connection.onRequest('window/workDoneProgress/create', () => null);
  connection.onRequest('client/registerCapability', () => null);
  connection.onRequest('workspace/configuration', (params: { items: { section?: string }[] }) =>
    params.items.map((item) => (item.section === 'codecomplete' ? SETTINGS : null)),
  );
  connection.listen();
});

after(async () => {
  rmSync(scratch, { recursive: true, force: true });
  if (skipReason || !server) return;
  if (server.exitCode === null) server.kill();
  connection.dispose();
});

/** Resolve with the first status for which `accept` holds (already received ones count). */
function statusWhere(accept: (status: Status) => boolean, from = 0): Promise<Status> {
  return new Promise((resolve) => {
    const poll = () => {
      const found = statuses.slice(from).find(accept);
      if (found) resolve(found);
      else setTimeout(poll, 20);
    };
    poll();
  });
}

test('initialize advertises inline completion and incremental sync', { skip: skipReason }, async () => {
  const result: any = await withTimeout(
    'initialize',
    connection.sendRequest('initialize', {
      processId: process.pid,
      rootUri: null,
      capabilities: {
        textDocument: {
          synchronization: { dynamicRegistration: false },
          inlineCompletion: { dynamicRegistration: false },
          completion: { completionItem: { snippetSupport: false } },
        },
        window: { workDoneProgress: true },
        workspace: { configuration: true, didChangeConfiguration: { dynamicRegistration: false } },
      },
      initializationOptions: { codecomplete: SETTINGS },
    }),
  );
  const capabilities = result.capabilities;
  assert.ok(capabilities.inlineCompletionProvider, 'inlineCompletionProvider');
  assert.ok(capabilities.completionProvider, 'completionProvider');
  const sync = typeof capabilities.textDocumentSync === 'number' ? capabilities.textDocumentSync : capabilities.textDocumentSync.change;
  assert.equal(sync, 2, 'incremental text document sync');
  await connection.sendNotification('initialized', {});
});

test('the server loads the model and reports ready', { skip: skipReason }, async () => {
  const loaded = await withTimeout('model load', statusWhere((s) => s.state === 'ready' || s.state === 'error'));
  assert.equal(loaded.state, 'ready', `model load failed: ${loaded.message}`);
  assert.ok(statuses[0].state === 'loading', 'a loading status comes first');
});

test('inline completion at the cursor returns items with insertText and range', { skip: skipReason }, async () => {
  await connection.sendNotification('textDocument/didOpen', {
    textDocument: { uri: URI, languageId: 'python', version: 1, text: TEXT },
  });
  const position = endOf(TEXT);
  const seen = statuses.length;
  const result = await withTimeout('inlineCompletion', connection.sendRequest('textDocument/inlineCompletion', inlineParams(position)));
  const items = itemsOf(result);
  assert.ok(items.length >= 1, `expected at least one candidate, got ${JSON.stringify(result)}`);
  assert.ok(items.length <= SETTINGS.candidates, `at most ${SETTINGS.candidates} candidates: ${JSON.stringify(items)}\n${stderr}`);
  for (const item of items) {
    assert.equal(typeof textOf(item), 'string');
    assert.ok(item.range, 'each item carries a range');
    assert.ok(before_or_equal(item.range!.start, position), 'range starts at or before the cursor');
    assert.ok(before_or_equal(position, item.range!.end), 'range ends at or after the cursor');
  }
  const after = await withTimeout('status after completion', statusWhere((s) => s.latencyMs !== undefined, seen), 5000);
  assert.equal(after.state, 'ready');
  assert.ok(after.latencyMs! >= 0, 'status after a completion carries latencyMs');
});

test('a cancelled request is answered or cancelled and the server keeps serving', { skip: skipReason }, async (t) => {
  // Type one more character (incremental change), then ask and cancel at once.
  const end = endOf(TEXT);
  await connection.sendNotification('textDocument/didChange', {
    textDocument: { uri: URI, version: 2 },
    contentChanges: [{ range: { start: end, end }, text: 'e' }],
  });
  const position = { line: end.line, character: end.character + 1 };
  const source = new CancellationTokenSource();
  const cancelled = connection.sendRequest('textDocument/inlineCompletion', inlineParams(position), source.token);
  source.cancel();
  try {
    const result = await withTimeout('cancelled inlineCompletion', cancelled);
    assert.ok(result === null || Array.isArray(itemsOf(result)), 'a late answer is still well formed');
    t.diagnostic('the answer came before the cancellation took effect');
  } catch (error) {
    assert.ok(error instanceof ResponseError, `expected a ResponseError, got ${error}`);
    assert.equal(error.code, REQUEST_CANCELLED);
    t.diagnostic('the server answered RequestCancelled (-32800)');
  }
  const next = await withTimeout('inlineCompletion after cancel', connection.sendRequest('textDocument/inlineCompletion', inlineParams(position)));
  assert.ok(Array.isArray(itemsOf(next)));
});

test('settings pushed with didChangeConfiguration are accepted live', { skip: skipReason }, async () => {
  await connection.sendNotification('workspace/didChangeConfiguration', {
    settings: { codecomplete: { ...SETTINGS, candidates: 1 } },
  });
  const result = await withTimeout(
    'inlineCompletion after settings change',
    connection.sendRequest('textDocument/inlineCompletion', inlineParams(endOf(TEXT))),
  );
  assert.ok(itemsOf(result).length <= 1, 'candidates: 1 is honoured');
});

test('shutdown and exit end the server process cleanly', { skip: skipReason }, async () => {
  await withTimeout('shutdown', connection.sendRequest('shutdown'), 10_000);
  await connection.sendNotification('exit');
  const code = await withTimeout('process exit', exited, 10_000);
  assert.equal(code, 0);
});
