import assert from 'node:assert/strict';
import { test } from 'node:test';
import { applyServerStatus, describeStatus, StatusBar } from '../../src/statusBar';
import { parseStatus } from '../../src/protocol';
import { mock, ThemeColor } from '../mock/vscode';

test('ready status shows the last latency in the text', () => {
  const { text, tooltip, isError } = describeStatus({ state: 'ready', enabled: true, latencyMs: 123.4 });
  assert.equal(text, '$(sparkle) CodeComplete 123 ms');
  assert.match(tooltip, /Last completion: 123 ms/);
  assert.equal(isError, false);
});

test('loading and error states are spelled out, error marked', () => {
  assert.match(describeStatus({ state: 'loading', enabled: true }).text, /loading~spin/);
  const error = describeStatus({ state: 'error', enabled: true, message: 'no model at /x' });
  assert.equal(error.isError, true);
  assert.match(error.tooltip, /no model at \/x/);
});

test('a crashed engine restarting spins and forgets the old latency; the message says why', () => {
  const view = applyServerStatus(
    { state: 'ready', enabled: true, latencyMs: 80 },
    { state: 'restarting', message: 'the model runtime crashed (SIGFPE); restarting the engine' },
  );
  assert.equal(view.latencyMs, undefined);
  const shown = describeStatus(view);
  assert.match(shown.text, /sync~spin/);
  assert.match(shown.tooltip, /restarting the engine/);
  assert.match(shown.tooltip, /SIGFPE/);
  assert.equal(shown.isError, false);
  assert.deepEqual(parseStatus({ state: 'restarting', message: 'x' }), { state: 'restarting', message: 'x', latencyMs: undefined });
});

test('disabled completions show a slashed icon whatever the server does', () => {
  const view = describeStatus({ state: 'ready', enabled: false, latencyMs: 5 });
  assert.match(view.text, /circle-slash/);
  assert.match(view.tooltip, /completions disabled/);
});

test('a model reload forgets the old latency, a bare ready keeps it', () => {
  let view = applyServerStatus({ state: 'ready', enabled: true }, { state: 'ready', latencyMs: 80 });
  view = applyServerStatus(view, { state: 'ready' });
  assert.equal(view.latencyMs, 80);
  view = applyServerStatus(view, { state: 'loading', message: 'loading model' });
  assert.equal(view.latencyMs, undefined);
  assert.equal(view.message, 'loading model');
});

test('malformed status notifications are rejected', () => {
  assert.equal(parseStatus(null), undefined);
  assert.equal(parseStatus({ state: 'busy' }), undefined);
  assert.deepEqual(parseStatus({ state: 'ready', latencyMs: 'fast', message: 3 }), {
    state: 'ready',
    message: undefined,
    latencyMs: undefined,
  });
});

test('status bar item follows the server and turns red on error', () => {
  mock.reset();
  const bar = new StatusBar(true, 'codecomplete.showMenu');
  const item = mock.statusBarItems[0];
  assert.equal(item.visible, true);
  assert.equal(item.command, 'codecomplete.showMenu');
  bar.onServerStatus({ state: 'ready', latencyMs: 31 });
  assert.equal(item.text, '$(sparkle) CodeComplete 31 ms');
  bar.onServerStatus({ state: 'error', message: 'boom' });
  assert.ok(item.backgroundColor instanceof ThemeColor);
  bar.setState('starting');
  assert.equal(item.backgroundColor, undefined);
  bar.dispose();
  assert.equal(item.visible, false);
});
