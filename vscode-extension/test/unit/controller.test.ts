import assert from 'node:assert/strict';
import { test } from 'node:test';
import { State } from 'vscode-languageclient';
import { DID_CHANGE_CONFIGURATION, ServerController, type CompletionClient } from '../../src/controller';
import { readSettings, type Settings } from '../../src/settings';
import { StatusBar } from '../../src/statusBar';
import type { ServerCommand } from '../../src/serverCommand';
import { mock } from '../mock/vscode';

/** A LanguageClient double that records what the controller does with it. */
class FakeClient implements CompletionClient {
  sent: { method: string; params: unknown }[] = [];
  started = false;
  stopped = false;
  failStart: Error | undefined;
  private notificationHandlers = new Map<string, (params: unknown) => void>();
  private stateListeners: ((e: { oldState: State; newState: State }) => void)[] = [];

  async start(): Promise<void> {
    if (this.failStart) throw this.failStart;
    this.started = true;
    this.changeState(State.Running);
  }
  async stop(): Promise<void> {
    this.stopped = true;
  }
  async sendNotification(method: string, params: unknown): Promise<void> {
    this.sent.push({ method, params });
  }
  onNotification(method: string, handler: (params: unknown) => void) {
    this.notificationHandlers.set(method, handler);
    return { dispose: () => this.notificationHandlers.delete(method) };
  }
  onDidChangeState(listener: (e: { oldState: State; newState: State }) => void) {
    this.stateListeners.push(listener);
    return { dispose: () => undefined };
  }
  notify(method: string, params: unknown): void {
    this.notificationHandlers.get(method)?.(params);
  }
  changeState(newState: State): void {
    for (const listener of this.stateListeners) listener({ oldState: State.Starting, newState });
  }
}

function setup(initial: Record<string, unknown> = {}, startError?: Error) {
  mock.reset();
  let values: Record<string, unknown> = { serverPath: '/bin/fake-lsp', ...initial };
  const clients: { client: FakeClient; command: ServerCommand; settings: Settings }[] = [];
  const errors: string[] = [];
  const status = new StatusBar(true, 'menu');
  const controller = new ServerController({
    createClient: (command, settings) => {
      const client = new FakeClient();
      client.failStart = startError;
      clients.push({ client, command, settings });
      return client;
    },
    readSettings: () => readSettings({ get: <T>(key: string) => values[key] as T | undefined }),
    activePython: async () => undefined,
    status,
    log: () => undefined,
    showError: (message) => errors.push(message),
    env: { PATH: '' },
    platform: 'linux',
  });
  const change = (update: Record<string, unknown>) => {
    values = { ...values, ...update };
    return controller.onSettingsChanged((key) => key in update);
  };
  return { controller, clients, errors, status, change };
}

test('start launches the configured server and shows loading until the server reports', async () => {
  const { controller, clients, status } = setup();
  await controller.start();
  assert.equal(clients.length, 1);
  assert.equal(clients[0].command.command, '/bin/fake-lsp');
  assert.equal(status.current.state, 'loading');
  clients[0].client.notify('codecomplete/status', { state: 'ready', latencyMs: 12 });
  assert.equal(status.current.state, 'ready');
  assert.equal(status.current.latencyMs, 12);
});

test('server setting changes are pushed live without a restart', async () => {
  const { controller, clients, change } = setup();
  await controller.start();
  await change({ model: '/models/tiny', candidates: 2 });
  assert.equal(clients.length, 1);
  assert.deepEqual(clients[0].client.sent, [
    {
      method: DID_CHANGE_CONFIGURATION,
      params: {
        settings: {
          codecomplete: {
            model: '/models/tiny',
            runtime: 'onnx',
            device: 'cpu',
            candidates: 2,
            maxTokens: 48,
            deadlineMs: 1000,
            multiline: 'auto',
            enable: { '*': true, markdown: false, plaintext: false },
            isolate: true,
            server: '',
            apiKey: '',
          },
        },
      },
    },
  ]);
});

test('global switch is applied client side and not sent to the server', async () => {
  const { controller, clients, change, status } = setup();
  await controller.start();
  assert.equal(controller.shouldComplete('python'), true);
  assert.equal(controller.shouldComplete('markdown'), false);
  await change({ enabled: false });
  assert.equal(controller.shouldComplete('python'), false);
  assert.equal(status.current.enabled, false);
  assert.deepEqual(clients[0].client.sent, []);
});

test('changing the server location restarts the server', async () => {
  const { controller, clients, change } = setup();
  await controller.start();
  await change({ serverPath: '/other/codecomplete-lsp' });
  assert.equal(clients.length, 2);
  assert.equal(clients[0].client.stopped, true);
  assert.equal(clients[1].command.command, '/other/codecomplete-lsp');
  assert.equal(clients[1].client.started, true);
});

test('a server that fails to start leaves an error status and a message', async () => {
  const { controller, errors, status } = setup({}, new Error('spawn ENOENT'));
  await controller.start();
  assert.equal(status.current.state, 'error');
  assert.match(status.current.message ?? '', /spawn ENOENT/);
  assert.equal(errors.length, 1);
  assert.equal(controller.running, false);
});

test('no server anywhere is reported instead of spawning nothing', async () => {
  const { controller, clients, errors, status } = setup({ serverPath: '' });
  await controller.start();
  assert.equal(clients.length, 0);
  assert.equal(status.current.state, 'error');
  assert.match(errors[0], /codecomplete.serverPath/);
});

test('a server that dies shows the last error it reported', async () => {
  const { controller, clients, status } = setup();
  await controller.start();
  clients[0].client.notify('codecomplete/status', { state: 'error', message: 'CUDA not available' });
  clients[0].client.changeState(State.Stopped);
  assert.equal(status.current.state, 'error');
  assert.equal(status.current.message, 'CUDA not available');
});

test('stop, then restart, run in order even when called back to back', async () => {
  const { controller, clients, status } = setup();
  await controller.start();
  const stop = controller.stop();
  const restart = controller.restart();
  await Promise.all([stop, restart]);
  assert.equal(clients.length, 2);
  assert.equal(clients[0].client.stopped, true);
  assert.equal(controller.running, true);
  assert.equal(status.current.state, 'loading');
});
